"""``bitmamba reward-check``: run reward functions over a small dataset and summarize.

    bitmamba reward-check SPEC [SPEC ...] --data rows.jsonl [--completions completions.jsonl]
                          [--out scored.jsonl] [--workers 2] [--timeout 10] [--kwargs JSON]
    bitmamba reward-check --config train.yaml --data rows.jsonl ...   # the config's `rewards:` list

Data rows are JSON objects with ``prompt`` and any other fields (``answer``, ``schema``, ...).
Completion rows are ``{"completion": ...}``, aligned with the data by line; without
``--completions`` each data row's own ``completion`` field is used. Prints n, mean, std, min/max,
the share of None / errors / timeouts / crashes / invalid values, the slowest call and a few
examples; ``--out`` writes one row per sample with its reward, per-function scores and status.
With the built-in ``math`` reward, each shown sample (and each ``--out`` row, key ``math``) also
says which answer was read, by which method, against which reference, and why it matched or not.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any

from rewards.api import CompositeReward, RewardSpec, parse_reward_specs
from rewards.builtin.math_answer import MathReward
from rewards.errors import RewardDataError, RewardError
from rewards.pool import RewardPool, ScoreResult


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """JSON object per non-empty line; errors name the file and the line number, in the wording of
    `model.jsonl` ("rows.jsonl:7: not valid JSON (...)"), which this standalone package does not import."""
    if not os.path.isfile(path):
        raise RewardDataError(f"{path}: file not found")
    rows = []
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise RewardDataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}): "
                                      f"{line.strip()[:80]!r}") from None
            if not isinstance(row, dict):
                raise RewardDataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def _text(v: Any, where: str) -> str:
    if not isinstance(v, str):
        raise RewardDataError(f"{where}: expected a string, got {type(v).__name__}")
    return v


def load_samples(data: str, completions: str | None) -> tuple[list[str], list[str], list[dict]]:
    rows = read_jsonl(data)
    if completions is not None:
        comp_rows = read_jsonl(completions)
        if len(comp_rows) != len(rows):
            raise RewardDataError(f"{data} has {len(rows)} rows but {completions} has {len(comp_rows)}; "
                                  "completions are aligned with the data by line")
        comps = []
        for k, r in enumerate(comp_rows, 1):
            if "completion" not in r:
                raise RewardDataError(f"{completions}: row {k} has no 'completion' field")
            comps.append(_text(r["completion"], f"{completions}: row {k} 'completion'"))
    else:
        comps = []
        for k, r in enumerate(rows, 1):
            if "completion" not in r:
                raise RewardDataError(f"{data}: row {k} has no 'completion' field (or pass --completions)")
            comps.append(_text(r["completion"], f"{data}: row {k} 'completion'"))
    prompts = []
    for k, r in enumerate(rows, 1):
        if "prompt" not in r:
            raise RewardDataError(f"{data}: row {k} has no 'prompt' field")
        prompts.append(_text(r["prompt"], f"{data}: row {k} 'prompt'"))
    fields = [{k: v for k, v in r.items() if k not in ("prompt", "completion")} for r in rows]
    return prompts, comps, fields


def summarize(res: ScoreResult, completions: list[str], n_examples: int = 3) -> str:
    n = len(res.status)
    vals = [v for v in res.rewards if v is not None]
    lines = [f"samples: {n}   wall: {res.seconds:.2f} s"]
    if vals:
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
        lines.append(f"reward: mean {mean:.4f}  std {std:.4f}  min {min(vals):.4f}  max {max(vals):.4f}"
                     f"  (over {len(vals)} scored)")
    else:
        lines.append("reward: no sample was scored")
    if len(res.per_function) > 1:
        for name, fv in res.per_function.items():
            v = [x for x in fv if x is not None]
            m = sum(v) / len(v) if v else float("nan")
            lines.append(f"  {name}: mean {m:.4f}")
    shares = "  ".join(f"{st} {res.counts.get(st, 0)} ({100 * res.counts.get(st, 0) / max(n, 1):.1f}%)"
                       for st in ("ok", "none", "error", "timeout", "crash", "invalid"))
    lines.append(f"status: {shares}")
    i, secs = res.slowest()
    if i >= 0:
        lines.append(f"slowest call: sample {i} ({secs:.3f} s)")
    for st, ex in res.examples.items():
        lines.append(f"example {st}: {ex}")
    shown = 0
    for k in range(n):
        if shown >= n_examples:
            break
        r = res.rewards[k]
        lines.append(f"sample {k}: reward {r if r is None else round(r, 4)} [{res.status[k]}] "
                     f"completion {completions[k][:100]!r}")
        shown += 1
    return "\n".join(lines)


def math_explanations(specs: list[RewardSpec], completions: list[str],
                      fields: list[dict]) -> list[dict] | None:
    """Per sample, what the (first) built-in ``math`` reward read and why it matched or not; None
    without one. Computed here, in this process, with the spec's options."""
    spec = next((s for s in specs if s.spec == "math"), None)
    if spec is None:
        return None
    fn = MathReward(**spec.kwargs)
    out = []
    for c, f in zip(completions, fields):
        try:
            out.append(fn.explain(c, **f))
        except KeyError as e:
            out.append({"error": str(e).strip("'\"")})
    return out


def format_explanation(k: int, e: dict) -> str:
    if "error" in e:
        return f"sample {k}: math: {e['error']}"
    read = "nothing" if e["answer"] is None else f"{e['answer']!r} ({e['method']})"
    verdict = "equal" if e["equal"] else "not equal"
    return f"sample {k}: math read {read[:120]} vs reference {e['reference'][:80]!r}: {verdict}: {e['reason']}"


def _specs_from_yaml(path: str) -> list[RewardSpec]:
    import yaml

    if not os.path.isfile(path):
        raise RewardDataError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise RewardDataError(f"{path}: invalid YAML ({e})") from None
    if not isinstance(doc, dict) or "rewards" not in doc:
        raise RewardDataError(f"{path}: no top-level `rewards:` list")
    return parse_reward_specs(doc["rewards"], where=f"{path}: rewards")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bitmamba reward-check",
                                description="Run reward functions over a small JSONL dataset and summarize.")
    p.add_argument("spec", nargs="*", help="built-in name, path/to/file.py:function or module:function")
    p.add_argument("--config", help="YAML file whose `rewards:` list (with weights and options) is checked "
                                    "instead of SPECs; file paths in it are relative to the working directory")
    p.add_argument("--data", required=True, help="JSONL rows with 'prompt' and other fields")
    p.add_argument("--completions", help="JSONL rows {'completion': ...} aligned with --data by line")
    p.add_argument("--out", help="write one JSON row per sample with reward and status")
    p.add_argument("--workers", type=int, default=2, help="worker processes (0: in this process)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per call")
    p.add_argument("--kwargs", default=None,
                   help='JSON object of options for the (single) spec, e.g. \'{"max_len": 512, "buffer": 64}\'')
    p.add_argument("--examples", type=int, default=3, help="samples to print")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.workers < 0:
            raise RewardDataError(f"--workers must be >= 0, got {args.workers}")
        if args.timeout <= 0:
            raise RewardDataError(f"--timeout must be > 0, got {args.timeout}")
        if bool(args.spec) == bool(args.config):
            raise RewardDataError("give either reward SPECs or --config FILE.yaml")
        kwargs = {}
        if args.kwargs:
            try:
                kwargs = json.loads(args.kwargs)
            except ValueError as e:
                raise RewardDataError(f"--kwargs: invalid JSON ({e})") from None
            if not isinstance(kwargs, dict) or len(args.spec) != 1:
                raise RewardDataError("--kwargs: expected a JSON object, with exactly one spec")
        if args.config:
            if args.kwargs:
                raise RewardDataError("--kwargs applies to SPECs; with --config put options under `kwargs:`")
            specs = _specs_from_yaml(args.config)
        else:
            specs = [RewardSpec(spec=s, kwargs=dict(kwargs)) for s in args.spec]
        composite = CompositeReward(specs)   # every spec is checked before the data is read
        prompts, comps, fields = load_samples(args.data, args.completions)
        with RewardPool(composite, num_workers=args.workers, timeout_s=args.timeout) as pool:
            res = pool.score(prompts, comps, fields)
        why = math_explanations(specs, comps, fields)
    except RewardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summarize(res, comps, args.examples))
    for k, e in enumerate((why or [])[:args.examples]):
        print(format_explanation(k, e))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            for i in range(len(comps)):
                row = {"index": i, "reward": res.rewards[i], "status": res.status[i],
                       "scores": {k: v[i] for k, v in res.per_function.items()},
                       "seconds": round(res.durations[i], 6)}
                if res.messages[i]:
                    row["message"] = res.messages[i]
                if why is not None:
                    row["math"] = why[i]
                f.write(json.dumps(row) + "\n")
        print(f"wrote {len(comps)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
