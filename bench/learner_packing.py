"""Learner tokens/s: packed micro-batches (`learner.packing: true`) against right-padded rows.

    python bench/learner_packing.py                                  # GPU defaults: mini-agent-scout, 64 x 8 samples
    python bench/learner_packing.py --cpu-small                      # the committed CPU result (small model)
    python bench/learner_packing.py --lengths lengths.json           # measured lengths instead of the synthetic ones

One rollout batch of `prompts x group` samples with random tokens (throughput does not depend on their
values) goes through `Learner.update` (DeepSpeed; bf16 on GPU, fp32 on CPU) again and again, the modes taking
turns so that a busy machine slows them alike:
- packed: samples end to end in one row per micro-batch, `seq_idx` boundaries, no padding;
- padded: the rows right-padded to the longest of their micro-batch, samples in rollout order (the learner's
  path without packing);
- padded-sorted: the same with the batch sorted by length first (the best a padded learner could do by
  reordering; reported for context, the learner does not sort).
Tokens/s counts real tokens (prompt + completion of every sample) over `learn/seconds` (wall clock: plan,
old log-probs with minibatches > 1, forward, backward, optimizer steps), median over `--repeats` updates
after one warm-up update per mode. The process's CPU time per update is reported too (`cpu_tokens_per_s`):
on a CPU shared with other jobs it measures the work itself, where wall time also counts the waiting.

Length distribution (default; `--lengths FILE` replaces it with a JSON {"prompt": [...], "completion": [...]}
of measured per-sample token counts, e.g. from a trained policy's rollouts): long-tailed like a trained
policy's completions, most short, a few long:
- completion tokens ~ LogNormal(log(median), sigma) rounded, clipped to [1, max_new]; with the GPU
  defaults (median 96, sigma 0.9, max_new 512) the mean is ~144, p90 ~300, and ~3% hit max_new (truncated);
- prompt tokens: one length per prompt (its group of samples shares it), uniform in [prompt_min, prompt_max].
Writes a table to stdout and JSON (machine, command, distribution statistics, per-mode results) to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rl.grpo.config import load_grpo_config  # noqa: E402
from rl.grpo.learner import Learner, TrainBatch, micro_batches  # noqa: E402

MODES = ("packed", "padded", "padded-sorted")
CPU_SMALL = {"preset": "tiny", "overrides": {"d_model": 128, "n_layers": 4, "vocab_size": 512, "chunk_size": 64},
             "prompts": 16, "group": 8, "prompt_min": 16, "prompt_max": 96, "median": 48, "sigma": 0.9,
             "max_new": 384, "micro_batch_tokens": 4096, "repeats": 5, "threads": 1}


def sample_lengths(args, g: torch.Generator) -> tuple[list[int], list[int]]:
    """(prompt lengths, completion lengths) per sample: see the module docstring."""
    if args.lengths:
        data = json.loads(Path(args.lengths).read_text())
        P, C = [int(x) for x in data["prompt"]], [int(x) for x in data["completion"]]
        if len(P) != len(C) or not P or min(P) < 1 or min(C) < 1:
            raise SystemExit(f"{args.lengths}: 'prompt' and 'completion' must be equal-length lists of counts >= 1")
        return P, C
    n = args.prompts * args.group
    prompt = torch.randint(args.prompt_min, args.prompt_max + 1, (args.prompts,), generator=g)
    P = prompt.repeat_interleave(args.group).tolist()
    z = torch.randn(n, generator=g)
    C = torch.exp(math.log(args.median) + args.sigma * z).round().clamp(1, args.max_new).long().tolist()
    return P, C


def stats(xs: list[int]) -> dict[str, float]:
    t = torch.tensor(xs, dtype=torch.float64)
    q = lambda p: float(torch.quantile(t, p))  # noqa: E731
    return {"mean": float(t.mean()), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": float(t.max()),
            "min": float(t.min())}


def make_batch(P: list[int], C: list[int], vocab: int, g: torch.Generator) -> TrainBatch:
    prompts = [torch.randint(0, vocab, (p,), generator=g).tolist() for p in P]
    comps = [torch.randint(0, vocab, (c,), generator=g).tolist() for c in C]
    return TrainBatch(prompts, comps, [[-3.0] * c for c in C], [[1.0] * c for c in C],
                      [1.0 if i % 2 else -1.0 for i in range(len(C))])


def sorted_by_length(b: TrainBatch) -> TrainBatch:
    order = sorted(range(len(b)), key=b.num_tokens)
    return TrainBatch(*([getattr(b, f)[i] for i in order] for f in
                        ("prompt_ids", "completion_ids", "rollout_logprobs", "loss_mask", "advantages")))


def layout(b: TrainBatch, budget: int, packing: bool) -> dict[str, float]:
    """Micro-batches and computed positions (rows x row length, padding included) over the whole batch."""
    mbs = micro_batches(b, list(range(len(b))), budget, packing)
    computed = sum(mb.input_ids.numel() for mb in mbs)
    real = sum(b.num_tokens(i) - 1 for i in range(len(b)))
    return {"micro_batches": len(mbs), "positions_computed": computed, "padding_frac": 1.0 - real / computed}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-small", action="store_true", help="the committed CPU configuration (small model)")
    ap.add_argument("--preset", default="mini-agent-scout")
    ap.add_argument("--overrides", default="{}", help="model overrides as JSON")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompt-min", type=int, default=32)
    ap.add_argument("--prompt-max", type=int, default=256)
    ap.add_argument("--median", type=float, default=96.0, help="median completion tokens")
    ap.add_argument("--sigma", type=float, default=0.9, help="log-normal sigma of completion tokens")
    ap.add_argument("--max-new", type=int, default=512)
    ap.add_argument("--lengths", default=None, help='JSON {"prompt": [...], "completion": [...]} per sample')
    ap.add_argument("--micro-batch-tokens", type=int, default=16384)
    ap.add_argument("--minibatches", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--note", default="", help="a line about the machine for the JSON (e.g. shared with other jobs)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/learner_packing.json"))
    args = ap.parse_args()
    if args.cpu_small:
        for k, v in CPU_SMALL.items():
            setattr(args, k, json.dumps(v) if k == "overrides" else v)
    return args


def main() -> int:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    on_gpu = torch.cuda.is_available()
    g = torch.Generator().manual_seed(args.seed)
    P, C = sample_lengths(args, g)
    cfg = load_grpo_config(data={
        "model": {"preset": args.preset, "overrides": json.loads(args.overrides),
                  "max_seq_len": max(p + c for p, c in zip(P, C)) + 1},
        "group_size": args.group, "prompts_per_step": max(1, len(P) // args.group),
        "learner": {"lr": 1.0e-7, "micro_batch_tokens": args.micro_batch_tokens, "minibatches": args.minibatches,
                    "num_gpus": 1 if on_gpu else 0, "gradient_checkpointing": args.gradient_checkpointing}})
    learner = Learner(cfg)
    batch = make_batch(P, C, learner.model.config.vocab_size, g)
    batches = {"packed": batch, "padded": batch, "padded-sorted": sorted_by_length(batch)}
    real_tokens = sum(batch.num_tokens(i) for i in range(len(batch)))
    seconds: dict[str, list[float]] = {m: [] for m in MODES}
    cpu: dict[str, list[float]] = {m: [] for m in MODES}
    for rep in range(args.repeats + 1):                      # round 0 warms every mode up (not timed)
        for mode in MODES:
            learner.sec.packing = mode == "packed"
            c0 = time.process_time()
            s = learner.update(batches[mode])["learn/seconds"]
            c = time.process_time() - c0
            if rep:
                seconds[mode].append(s)
                cpu[mode].append(c)
            print(f"  round {rep} {mode:14s} {s:8.3f} s wall {c:8.3f} s CPU{'  (warm-up)' if not rep else ''}",
                  flush=True)
    results = {}
    for mode in MODES:
        med, cmed = statistics.median(seconds[mode]), statistics.median(cpu[mode])
        results[mode] = {"seconds_median": med, "seconds": seconds[mode], "tokens_per_s": real_tokens / med,
                         "cpu_seconds_median": cmed, "cpu_seconds": cpu[mode], "cpu_tokens_per_s": real_tokens / cmed,
                         **layout(batches[mode], args.micro_batch_tokens, mode == "packed")}
    speedup = results["packed"]["tokens_per_s"] / results["padded"]["tokens_per_s"]
    speedup_sorted = results["packed"]["tokens_per_s"] / results["padded-sorted"]["tokens_per_s"]
    cpu_speedup = results["packed"]["cpu_tokens_per_s"] / results["padded"]["cpu_tokens_per_s"]
    cpu_speedup_sorted = results["packed"]["cpu_tokens_per_s"] / results["padded-sorted"]["cpu_tokens_per_s"]
    n_params = sum(p.numel() for p in learner.model.parameters())
    print(f"\n{args.preset} {args.overrides} ({n_params / 1e6:.1f}M params), {len(P)} samples, "
          f"{real_tokens} tokens, micro_batch_tokens {args.micro_batch_tokens}, {learner.device}")
    print(f"completion tokens: {stats(C)}\nprompt tokens:     {stats(P)}\n")
    print(f"{'mode':14s} {'tokens/s':>10s} {'s/update':>9s} {'tok/CPU-s':>10s} {'CPU-s/upd':>9s} {'micro-b.':>8s} "
          f"{'computed':>9s} {'padding':>8s}")
    for mode, r in results.items():
        print(f"{mode:14s} {r['tokens_per_s']:10.0f} {r['seconds_median']:9.3f} {r['cpu_tokens_per_s']:10.0f} "
              f"{r['cpu_seconds_median']:9.3f} {r['micro_batches']:8d} {r['positions_computed']:9d} "
              f"{100 * r['padding_frac']:7.1f}%")
    print(f"\npacked / padded: {speedup:.2f}x wall, {cpu_speedup:.2f}x CPU time   "
          f"packed / padded-sorted: {speedup_sorted:.2f}x wall, {cpu_speedup_sorted:.2f}x CPU time")
    device = torch.cuda.get_device_name(0) if on_gpu else f"CPU ({platform.processor() or platform.machine()})"
    out = {
        "command": " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS",) if k in os.environ)
                   + " python " + shlex.join(sys.argv),
        "machine": {"device": device, "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                    "note": args.note},
        "model": {"preset": args.preset, "overrides": json.loads(args.overrides), "parameters": n_params},
        "learner": {"micro_batch_tokens": args.micro_batch_tokens, "minibatches": args.minibatches,
                    "backend": cfg.learner.backend, "bf16": learner.ds_config["bf16"]["enabled"],
                    "gradient_checkpointing": args.gradient_checkpointing},
        "distribution": {"source": args.lengths or "synthetic",
                         **({} if args.lengths else {
                             "completion": f"round(LogNormal(log {args.median}, {args.sigma})) clipped to "
                                           f"[1, {args.max_new}]",
                             "prompt": f"uniform [{args.prompt_min}, {args.prompt_max}] per prompt, shared by "
                                       f"its group of {args.group}"}),
                         "samples": len(P), "real_tokens": real_tokens,
                         "truncated_frac": sum(c >= args.max_new for c in C) / len(C),
                         "completion_tokens": stats(C), "prompt_tokens": stats(P)},
        "results": results,
        "speedup_packed_vs_padded": speedup,
        "speedup_packed_vs_padded_sorted": speedup_sorted,
        "cpu_time_speedup_packed_vs_padded": cpu_speedup,
        "cpu_time_speedup_packed_vs_padded_sorted": cpu_speedup_sorted,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
