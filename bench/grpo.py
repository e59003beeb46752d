"""GRPO benchmarks for the GPU machine (the lead runs them); `--quick` checks the script on CPU.

    python bench/grpo.py                 # both parts on one GPU -> bench/results/grpo.json
    python bench/grpo.py --quick         # tiny shapes, any device, seconds (writes grpo_quick.json)
    python bench/grpo.py --only step     # or --only memory

1. step: step-time breakdown (generate / score / learn / sync, seconds per phase, tokens/s) of real
   GRPO steps through the Ray driver (`rl.grpo.driver.Driver`) for the `mini-agent-scout` shape: groups of
   8, 64 prompts, 512 new tokens, learner and one generation worker sharing one GPU (0.5 each).
   The policy is randomly initialised (timing only), so completions run to the length limit.
2. memory: learner peak GPU memory of one update of `bitmamba2-1b` at 64 sequences x 1024 tokens
   with DeepSpeed ZeRO-2, AdamW state offloaded to CPU, bf16, gradient checkpointing (target < 20 GB).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rl.grpo.driver import Driver  # noqa: E402
from rl.grpo.config import load_grpo_config  # noqa: E402
from rl.grpo.learner import Learner, TrainBatch  # noqa: E402
from rl.train.metrics import read_metrics  # noqa: E402

PHASES = ("time/generate", "time/score", "time/learn", "time/sync", "time/step", "tokens_per_s",
          "sync/bytes", "learn/tokens", "response_len_mean", "gen/engine_wall_s", "gen/engine_prefill_s",
          "gen/engine_decode_s", "gen/engine_decode_steps", "sync/export_s", "sync/worker_load_s",
          "sync/worker_refresh_s", "sync/ipc_workers", "learn/mismatch_kl", "learn/mismatch_max_ratio")


def step_config(quick: bool, out: Path, gpu: bool, steps: int | None = None, micro_batch_tokens: int = 16384,
                one_step_off: bool = False, weight_sync: str = "auto", ssm_dtype: str = "float32"):
    share = 0.5 if gpu else 0.0
    data = {
        "model": {"preset": "tiny" if quick else "mini-agent-scout",
                  "overrides": {"vocab_size": 384} if quick else {}, "tokenizer": "tiny",
                  "max_seq_len": 64 if quick else 640, "backend": "auto", "ssm_dtype": ssm_dtype},
        "task": {"name": "arithmetic", "kwargs": {"max_operand": 99}, "eval_size": 0},
        "group_size": 8, "prompts_per_step": 8 if quick else 64, "steps": steps or (2 if quick else 4),
        "sampling": {"max_new_tokens": 32 if quick else 512, "temperature": 1.0},
        "learner": {"lr": 1.0e-6, "num_gpus": share, "num_cpus": 1, "micro_batch_tokens": micro_batch_tokens,
                    "gradient_checkpointing": True},
        "workers": {"num_workers": 1, "num_gpus": share, "num_cpus": 1, "engine_slots": 512,
                    "weight_sync": weight_sync},
        "one_step_off_policy": one_step_off,
        "reward_pool": {"num_workers": 2}, "checkpoint_every": 0, "eval_every": 0,
        "output_dir": str(out), "wandb": False,
    }
    return load_grpo_config(data=data)


def bench_step(quick: bool, out: Path, steps: int | None = None, micro_batch_tokens: int = 16384,
               one_step_off: bool = False, weight_sync: str = "auto", ssm_dtype: str = "float32") -> dict:
    cfg = step_config(quick, out, torch.cuda.is_available(), steps, micro_batch_tokens, one_step_off, weight_sync,
                      ssm_dtype)
    driver = Driver(cfg)
    try:
        driver.run()
    finally:
        driver.close()
    recs = read_metrics(out / "metrics.jsonl")[-cfg.steps:]
    timed = recs[1:] or recs                      # the first step includes warm-up (autotune, graphs)
    if cfg.one_step_off_policy:                   # the last step prefetches nothing: not a steady-state step
        timed = timed[:-1] or timed
    if os.environ.get("BITMAMBA_PROFILE_LEARN"):  # the step whose update ran under torch.profiler is not timed
        profiled = int(os.environ.get("BITMAMBA_PROFILE_STEP", "1")) + 1
        timed = [r for r in timed if r.get("step") != profiled] or timed
    avg = {k: sum(r[k] for r in timed) / len(timed) for k in PHASES if all(k in r for r in timed)}
    share = {k: avg[k] / avg["time/step"] for k in ("time/generate", "time/score", "time/learn", "time/sync")}
    return {"shape": cfg.model.preset, "group_size": cfg.group_size, "prompts": cfg.prompts_per_step,
            "one_step_off_policy": cfg.one_step_off_policy, "weight_sync": cfg.workers.weight_sync,
            "ssm_dtype": cfg.model.ssm_dtype,
            "max_new_tokens": cfg.sampling.max_new_tokens, "steps_timed": len(timed), "mean": avg,
            "share_of_step": share, "first_step": {k: recs[0].get(k) for k in PHASES}}


def bench_memory(quick: bool) -> dict:
    faulthandler.dump_traceback_later(60, repeat=True)   # where a slow first update spends its minutes
    seqs, seq_len, prompt = (8, 128, 16) if quick else (64, 1024, 64)
    gpu = torch.cuda.is_available()
    data = {"model": {"preset": "tiny" if quick else "bitmamba2-1b",
                      "overrides": {"vocab_size": 384} if quick else {}, "max_seq_len": seq_len + 1},
            "sampling": {"max_new_tokens": seq_len - prompt},
            "group_size": 8, "prompts_per_step": seqs // 8,
            "learner": {"lr": 1.0e-6, "num_gpus": 1.0 if gpu else 0.0, "micro_batch_tokens": 8192,
                        "gradient_checkpointing": True, "zero_stage": 2, "offload_optimizer": True}}
    cfg = load_grpo_config(data=data)
    t0 = time.perf_counter()
    learner = Learner(cfg)
    init_s = time.perf_counter() - t0
    print(f"memory: learner ready in {init_s:.1f}s", flush=True)
    V = learner.model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    P = [torch.randint(0, V, (prompt,), generator=g).tolist() for _ in range(seqs)]
    C = [torch.randint(0, V, (seq_len - prompt,), generator=g).tolist() for _ in range(seqs)]
    batch = TrainBatch(P, C, [[-3.0] * len(c) for c in C], [[1.0] * len(c) for c in C],
                       [(-1.0) ** i for i in range(seqs)])
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        m = learner.update(batch)
        if gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        print(f"memory: update {len(times)} took {times[-1]:.1f}s, peak so far "
              f"{torch.cuda.max_memory_allocated() / 2**30 if gpu else 0:.2f} GiB", flush=True)
    faulthandler.cancel_dump_traceback_later()
    peak = torch.cuda.max_memory_allocated() / 2**30 if gpu else None
    return {"shape": cfg.model.preset, "seqs": seqs, "seq_len": seq_len, "params": sum(
        p.numel() for p in learner.model.parameters()), "deepspeed": learner.ds_config,
        "optimizer": type(learner.optimizer).__name__, "init_s": init_s, "update_s": times,
        "peak_gpu_gib": peak, "target_gib": 20.0, "grad_norm": m["learn/grad_norm"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", choices=("step", "memory"))
    p.add_argument("--steps", type=int, default=None, help="GRPO steps of the step part, the first is warm-up (default 4)")
    p.add_argument("--micro-batch-tokens", type=int, default=16384,
                   help="learner micro-batch token budget of the step part (fewer, larger micro-batches: fewer launches)")
    p.add_argument("--one-step-off", action="store_true",
                   help="one_step_off_policy: the next batch generates while the learner updates")
    p.add_argument("--weight-sync", choices=("auto", "object_store"), default="auto",
                   help="workers.weight_sync (auto: CUDA IPC to a worker on the learner's GPU)")
    p.add_argument("--ssm-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="model.ssm_dtype of the generation worker")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    out = Path(args.out or ROOT / "bench" / "results" / ("grpo_quick.json" if args.quick else "grpo.json"))
    res: dict = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor()
                 or "cpu", "torch": torch.__version__, "quick": args.quick,
                 "command": "python bench/grpo.py" + (" --quick" if args.quick else "")
                 + (f" --only {args.only}" if args.only else "") + (f" --steps {args.steps}" if args.steps else "")
                 + (f" --micro-batch-tokens {args.micro_batch_tokens}" if args.micro_batch_tokens != 16384 else "")
                 + (" --one-step-off" if args.one_step_off else "")
                 + (f" --weight-sync {args.weight_sync}" if args.weight_sync != "auto" else "")
                 + (f" --ssm-dtype {args.ssm_dtype}" if args.ssm_dtype != "float32" else ""),
                 "env": {k: os.environ[k] for k in ("BITMAMBA_AUTOTUNE", "MAMBA_DETERMINISTIC") if k in os.environ}}
    if args.only in (None, "step"):
        # the run's metrics.jsonl lands beside the JSON, so a run cut off by a time limit still leaves its steps
        run_dir = out.parent / (out.stem + "_run") if out.parent.exists() else Path(tempfile.mkdtemp())
        res["step"] = bench_step(args.quick, run_dir, args.steps, args.micro_batch_tokens, args.one_step_off,
                                 args.weight_sync, args.ssm_dtype)
        print(json.dumps(res["step"]["mean"], indent=1), flush=True)
    if args.only in (None, "memory"):
        res["memory"] = bench_memory(args.quick)
        print(f"learner peak GPU memory: {res['memory']['peak_gpu_gib']} GiB", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
