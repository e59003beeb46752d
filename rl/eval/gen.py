"""Generation evals: sample n completions per prompt, score them with a reward, report pass@k.

    rows = load_prompt_rows("heldout.jsonl")                  # [{"prompt": ..., "answer": ..., ...}]
    with RewardPool("math", num_workers=2) as pool:
        m = evaluate_generation(engine, tok, rows, pool, n_samples=8, k_values=[1, 4],
                                params=SamplingParams(temperature=0.8, max_new_tokens=256))
    m["pass@1"], m["pass@4"], m["reward_mean"]

A sample is correct when its reward is >= `correct_threshold` (None rewards, i.e. excluded samples,
count as wrong). pass@k per prompt is the unbiased estimator 1 - C(n-c, k) / C(n, k) (`rl.grpo.algo.pass_at_k`),
averaged over prompts. This is the function `bitmamba eval --gen` runs and the GRPO driver can call
for its held-out eval.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from model.errors import ConfigError, DataError
from model.jsonl import read_jsonl
from model.seeds import index_seed
from rl.args import GEN_EVAL_MAX_NEW_TOKENS
from rl.grpo.algo import pass_at_k
from rollout.types import GenRequest, SamplingParams


def load_prompt_rows(path: str | Path, prompt_key: str = "prompt") -> list[dict[str, Any]]:
    """JSONL of objects with a `prompt_key` string -> rows (the other keys are the reward's fields)."""
    rows = read_jsonl(path, {prompt_key: str}, allow_empty=False)
    for row in rows:
        row["prompt"] = row[prompt_key]
    return rows


def pass_at_k_summary(correct_counts: Sequence[int], n_samples: int, k_values: Sequence[int]) -> dict[str, float]:
    """Mean unbiased pass@k over prompts, from each prompt's number of correct samples."""
    out = {}
    for k in k_values:
        if k < 1 or k > n_samples:
            raise ConfigError(f"k: pass@{k} needs 1 <= k <= n_samples ({n_samples})")
        vals = [pass_at_k(n_samples, c, k) for c in correct_counts]
        out[f"pass@{k}"] = sum(vals) / max(len(vals), 1)
    return out


def evaluate_generation(engine, tokenizer, rows: Sequence[Mapping[str, Any]], reward_pool, n_samples: int,
                        k_values: Sequence[int] = (1,), params: SamplingParams | None = None,
                        correct_threshold: float = 1.0, seed: int = 0,
                        return_samples: bool = False) -> dict[str, Any]:
    """Sample `n_samples` completions per row's "prompt" with `engine` (`rollout.Engine`), score them
    with `reward_pool` (`rewards.RewardPool`; the row's other keys are the reward's fields).

    params: sampling parameters (its `n` and `seed` are replaced: n = n_samples, seed = `model.seeds.index_seed(seed,
      row index)`, so the eval replays exactly). The prompt is encoded with add_special_tokens=False.
    Returns {"n_prompts", "n_samples", "reward_mean", "correct_rate", "pass@k" for each k, "seconds",
    "reward_status": counts} (+ "samples": per-row completions/rewards if return_samples).
    """
    if n_samples < 1:
        raise ConfigError(f"n_samples: must be >= 1, got {n_samples}")
    if not rows:
        raise DataError("evaluate_generation: no rows")
    base = params if params is not None else SamplingParams(temperature=1.0, max_new_tokens=GEN_EVAL_MAX_NEW_TOKENS)
    if base.eos_token_id is None and getattr(tokenizer, "eos_token_id", None) is not None:
        base = replace(base, eos_token_id=tokenizer.eos_token_id)
    t0 = time.perf_counter()
    requests = []
    for i, row in enumerate(rows):
        ids = tokenizer.encode(row["prompt"], add_special_tokens=False)
        if not ids:
            raise DataError(f"row {i}: the prompt encodes to zero tokens")
        requests.append(GenRequest(ids, replace(base, n=n_samples, seed=index_seed(seed, i)), request_id=i))
    results = engine.generate(requests)
    results = sorted(results, key=lambda r: (r.request_id, r.sample_index))
    completions = [r.text if r.text is not None else tokenizer.decode(r.token_ids) for r in results]
    prompts = [rows[r.request_id]["prompt"] for r in results]
    fields = [{k: v for k, v in rows[r.request_id].items() if k != "prompt"} | {"completion_tokens": len(r.token_ids)}
              for r in results]
    scored = reward_pool.score(prompts, completions, fields)
    per_row: list[list[float | None]] = [[] for _ in rows]
    for r, rew in zip(results, scored.rewards):
        per_row[r.request_id].append(rew)
    correct = [sum(1 for v in rs if v is not None and v >= correct_threshold) for rs in per_row]
    vals = [v for v in scored.rewards if v is not None]
    out: dict[str, Any] = {
        "n_prompts": len(rows), "n_samples": n_samples,
        "reward_mean": sum(vals) / max(len(vals), 1),
        "correct_rate": sum(correct) / (len(rows) * n_samples),
        **pass_at_k_summary(correct, n_samples, k_values),
        "completion_tokens_mean": sum(len(r.token_ids) for r in results) / max(len(results), 1),
        "reward_status": dict(scored.counts),
        "seconds": time.perf_counter() - t0,
    }
    if return_samples:
        out["samples"] = [{"row": i, "completions": completions[i * n_samples:(i + 1) * n_samples],
                           "rewards": per_row[i], "correct": correct[i]} for i in range(len(rows))]
    return out
