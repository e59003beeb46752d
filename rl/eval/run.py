"""`bitmamba eval DIR ...`: zero-shot benchmarks through lm-eval, or pass@k generation evals.

    bitmamba eval runs/ckpt --tasks arc_easy,piqa,boolq,hellaswag,wikitext      # hub tasks (network)
    bitmamba eval runs/ckpt --task-file my_task.yaml --limit 100 --out results.json   # local task YAML
    bitmamba eval runs/ckpt --gen heldout.jsonl --reward math --samples 8 --k 1,4

Benchmarks run `lm_eval.simple_evaluate` with the "bitmamba" adapter (`rl/eval/lm.py`) and print each
task's metrics beside the published BitMamba-2 numbers (`--reference 1b|255m|none`). A local task YAML
(`dataset_path: json`, `dataset_kwargs: {data_files: ...}`) runs offline; relative `data_files` paths in
it are taken relative to the YAML file. Generation evals use `rl.eval.gen.evaluate_generation`, the
function the GRPO driver's held-out eval can call.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import torch

from model.errors import BitMambaError, ConfigError
from rl.args import eval_parser

log = logging.getLogger(__name__)

# Published BitMamba-2 zero-shot numbers (shared/reference/ANCHORS.md): task -> (metric, value).
# Accuracies in percent; wikitext is perplexity (lower is better).
PUBLISHED: dict[str, dict[str, tuple[str, float]]] = {
    "1b": {"arc_easy": ("acc", 63.3), "piqa": ("acc", 68.8), "boolq": ("acc", 62.4),
           "hellaswag": ("acc_norm", 45.6), "wikitext": ("word_perplexity", 29.6)},
    "255m": {"arc_easy": ("acc", 55.5), "wikitext": ("word_perplexity", 51.7)},
}
_PERCENT = ("acc", "acc_norm", "exact_match")


# ---- local task files ------------------------------------------------------------------------
def load_task_file(path: str | Path) -> dict[str, Any]:
    """Read a local lm-eval task YAML into a task config dict; relative `dataset_kwargs.data_files`
    paths are resolved against the YAML's directory (lm-eval itself would resolve them against the cwd)."""
    from model.typed import read_mapping

    p = Path(path)
    cfg = read_mapping(p)          # errors name the file (and line) as for every config
    if not isinstance(cfg.get("task"), str):
        raise ConfigError(f"{p}: expected a mapping with a 'task' name")
    if "include" in cfg:
        raise ConfigError(f"{p}: 'include' is not supported in --task-file YAMLs; inline the settings")
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if files is not None:
        def fix(x):
            if isinstance(x, str):
                q = Path(x)
                r = q if q.is_absolute() or "://" in x else (p.parent / q)
                if "://" not in x and not r.exists():
                    raise ConfigError(f"{p}: data_files entry {x!r}: no such file ({r})")
                return str(r)
            if isinstance(x, list):
                return [fix(v) for v in x]
            if isinstance(x, dict):
                return {k: fix(v) for k, v in x.items()}
            raise ConfigError(f"{p}: dataset_kwargs.data_files: expected a path, list or mapping, got {x!r}")
        cfg["dataset_kwargs"] = dict(cfg["dataset_kwargs"], data_files=fix(files))
    return cfg


def run_lm_eval(lm, tasks: list[str | dict], *, limit: float | None = None, num_fewshot: int | None = None,
                seed: int = 0, include_defaults: bool = True, chat: bool = False) -> dict[str, Any]:
    """`lm_eval.simple_evaluate` on the adapter `lm` -> lm-eval's results dict (without samples)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_defaults=include_defaults)
    if limit is not None and limit >= 1:
        limit = int(limit)
    try:
        res = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, num_fewshot=num_fewshot,
                                      task_manager=tm, log_samples=False, random_seed=seed,
                                      numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                                      bootstrap_iters=1000, apply_chat_template=chat)
    except ConnectionError as e:   # hub datasets without network (datasets raises the builtin ConnectionError)
        raise BitMambaError(f"lm-eval could not download a task's dataset ({e}); without network, use "
                            "--task-file with a local dataset (dataset_path: json), see docs/eval.md") from e
    except KeyError as e:
        raise BitMambaError(f"lm-eval: unknown task or group {e}") from e
    if res is None:
        raise BitMambaError("lm-eval returned no results")
    return res


def result_rows(results: dict[str, Any], reference: str = "1b") -> list[dict[str, Any]]:
    """lm-eval results -> rows {task, metric, value, stderr, published} (accuracies in percent)."""
    pub = PUBLISHED.get(reference, {})
    rows = []
    for task, metrics in results.get("results", {}).items():
        for key, val in metrics.items():
            if "," not in key or key.startswith("alias") or "_stderr" in key:
                continue
            name = key.split(",")[0]
            if not isinstance(val, (int, float)) or isinstance(val, bool):
                continue
            stderr = metrics.get(f"{name}_stderr,{key.split(',', 1)[1]}")
            scale = 100.0 if name in _PERCENT else 1.0
            ref = pub.get(task)
            rows.append({"task": task, "metric": name, "value": val * scale,
                         "stderr": stderr * scale if isinstance(stderr, (int, float)) else None,
                         "published": ref[1] if ref and ref[0] == name else None})
    return rows


def format_table(rows: list[dict[str, Any]], reference: str = "1b") -> str:
    head = f"{'task':<24} {'metric':<16} {'ours':>10} {'stderr':>8} {'BitMamba-2 ' + reference:>16}"
    lines = [head, "-" * len(head)]
    for r in rows:
        se = f"{r['stderr']:.2f}" if r["stderr"] is not None and math.isfinite(r["stderr"]) else ""
        pub = f"{r['published']:.1f}" if r["published"] is not None else ""
        lines.append(f"{r['task']:<24} {r['metric']:<16} {r['value']:>10.2f} {se:>8} {pub:>16}")
    return "\n".join(lines)


# ---- the command -------------------------------------------------------------------------------
def _write(path: str | None, obj: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(obj, indent=2, default=str) + "\n")
        print(f"wrote {path}")


def _run_gen(args, device: str) -> int:
    from model.lm import BitMambaLM
    from rewards import RewardPool
    from rl.eval.gen import evaluate_generation, load_prompt_rows
    from rollout.backends import make_backend
    from rollout.engine import Engine
    from rollout.tokenizer import load_tokenizer
    from rollout.types import SamplingParams

    if not args.reward:
        raise BitMambaError("--gen needs --reward SPEC")
    try:
        ks = [int(k) for k in args.k.split(",") if k.strip()]
    except ValueError:
        raise BitMambaError(f"--k: expected comma-separated integers, got {args.k!r}") from None
    if not ks or any(k < 1 or k > args.samples for k in ks):
        raise BitMambaError(f"--k {args.k}: each k must be in 1..--samples ({args.samples})")
    rows = load_prompt_rows(args.gen, args.prompt_key)
    if args.limit is not None:
        rows = rows[:int(args.limit) if args.limit >= 1 else max(1, int(len(rows) * args.limit))]
    model = BitMambaLM.from_pretrained(args.model_dir, device=device).eval()
    tok = load_tokenizer(args.tokenizer or args.model_dir)
    engine = Engine(make_backend(model, kind=args.backend), tokenizer=tok,
                    slots=max(1, min(args.batch_size * args.samples, 256)))
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens)
    with RewardPool(args.reward, num_workers=args.reward_workers) as pool:
        m = evaluate_generation(engine, tok, rows, pool, args.samples, ks, params,
                                correct_threshold=args.correct_threshold, seed=args.seed)
    print(f"{'metric':<24} {'value':>10}")
    for key in ["reward_mean", "correct_rate"] + [f"pass@{k}" for k in ks] + ["completion_tokens_mean"]:
        print(f"{key:<24} {m[key]:>10.4f}")
    print(f"{m['n_prompts']} prompts x {m['n_samples']} samples in {m['seconds']:.1f}s")
    _write(args.out, {"kind": "generation", "model_dir": args.model_dir, "data": args.gen,
                      "rewards": args.reward, **m})
    return 0


def main(argv: list[str]) -> int:
    args = eval_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise BitMambaError("--device cuda: CUDA is not available")
    if args.gen:
        return _run_gen(args, device)

    from rl.eval.lm import BitMambaEvalLM

    if args.task_file:
        tasks: list = [load_task_file(f) for f in args.task_file]
    else:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        if not tasks:
            raise BitMambaError("--tasks: no task names")
    lm = BitMambaEvalLM(args.model_dir, tokenizer=args.tokenizer, device=device, batch_size=args.batch_size,
                        max_length=args.max_length, dtype=args.dtype, reuse_prefix=not args.no_prefix_reuse,
                        backend=args.backend)
    res = run_lm_eval(lm, tasks, limit=args.limit, num_fewshot=args.num_fewshot, seed=args.seed,
                      include_defaults=not args.task_file, chat=args.chat)
    rows = result_rows(res, args.reference)
    print(format_table(rows, args.reference))
    _write(args.out, {"kind": "lm-eval", "model_dir": args.model_dir, "rows": rows,
                      "results": res.get("results", {}), "n_samples": res.get("n-samples", {}),
                      "adapter_stats": lm.scorer.stats})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
