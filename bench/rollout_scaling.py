"""Rollout scaling of the GRPO generation workers over 1, 2 and 4 GPUs (throughput and efficiency per worker count).

    python bench/rollout_scaling.py --workers 1 2 4      # on a 4x H200 machine -> bench/results/rollout_scaling.json
    python bench/rollout_scaling.py --quick              # tiny model, CPU workers, about a minute
                                                         # -> bench/results/rollout_scaling_quick.json

What runs: local Ray is started the way `rl.grpo.driver` starts it (`rl.grpo.driver.local_ray_kwargs`: dashboard
off and bound to 127.0.0.1) with `num_gpus` = the visible GPU count. For each worker count k, k
generation actors are created exactly as `rl.grpo.driver.Driver` creates them (`rl.grpo.driver.worker_class`,
`ray.remote(num_cpus=workers.num_cpus, num_gpus=workers.num_gpus)`, `rl.grpo.workers.WorkerGroup`), with
num_gpus=1 each (so each gets its own GPU); they all load the same exported policy
(`rl.grpo.weight_sync.export_policy` of a randomly initialised `--preset`, default `mini-agent-scout`, put
into the object store once, as the learner's weights are). The same prompts (default 64 prompts of
`--prompt-len` random tokens, a group of 8 completions each, 512 new tokens) go through
`WorkerGroup.generate`, the driver's own path, which shards them round-robin (`jobs[w::k]`) over the
workers. k must divide the prompt count, so every worker gets the same number of prompts; prompts all
have the same length and EOS is disabled (`eos_token_id=None`, no stop strings), so every sample runs
to exactly `--new` tokens and every worker does the same work. Each worker's engine decodes its whole
shard in one batch (`engine_slots` = prompts * group / k, unless `--slots` fixes it): this is strong
scaling of one fixed rollout batch, as a GRPO step would see it.

Measured per k: one warm-up round (CUDA graph capture, Triton autotune), then `--repeat` timed rounds
(default 1) of the whole `WorkerGroup.generate` call as the driver sees it (dispatch, generation,
result transfer); the median is reported. Per k: seconds, generated tokens/s, speedup vs k=1
(tokens/s ratio) and efficiency = speedup / k. Worker counts above the visible GPU count are skipped
and the skip is recorded. The JSON (written after every k) has the command, device names, versions.

`--quick` (tiny preset with vocab_size 384, CPU workers with num_gpus=0, workers 1 2, 8 prompts x 8 x
32 tokens) only checks the script end to end. On CPU the efficiency number means nothing: this
machine has 2 cores shared with other jobs, the workers run with one thread each, and Ray's own
processes compete for the same cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import ray
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rl.grpo.driver import job_seed, local_ray_kwargs, worker_class  # noqa: E402
from rl.grpo.config import GRPOConfig, build_model, build_tokenizer, load_grpo_config  # noqa: E402
from rl.grpo.weight_sync import export_policy  # noqa: E402
from rl.grpo.workers import PromptJob, WorkerGroup  # noqa: E402
from rollout.types import SamplingParams  # noqa: E402


def make_config(args, k: int, slots: int, gpu: bool) -> GRPOConfig:
    """The GRPO config of a run with k generation workers (only the model and workers sections matter)."""
    data = {
        "model": {"preset": args.preset, "overrides": {"vocab_size": 384} if args.quick else {},
                  "tokenizer": "tiny", "max_seq_len": args.prompt_len + args.new + 1, "backend": args.backend,
                  "init_seed": args.seed},
        "group_size": args.group, "prompts_per_step": args.prompts,
        "sampling": {"max_new_tokens": args.new, "temperature": 1.0},
        "workers": {"num_workers": k, "num_gpus": 1.0 if gpu else 0.0, "num_cpus": 1, "engine_slots": slots},
        "wandb": False,
    }
    return load_grpo_config(data=data)


def make_workers(cfg: GRPOConfig, model_config: dict) -> WorkerGroup:
    """The generation actors, created as `rl.grpo.driver.Driver._setup` creates them (same class, options, kwargs)."""
    worker_cls, worker_kwargs = worker_class(cfg)
    RemoteWorker = ray.remote(num_cpus=cfg.workers.num_cpus, num_gpus=cfg.workers.num_gpus)(worker_cls)
    return WorkerGroup(RemoteWorker, {"model_config": model_config, "model_section": cfg.model,
                                      "slots": cfg.workers.engine_slots, **worker_kwargs},
                       cfg.workers.num_workers, cfg.workers.max_restarts)


def make_jobs(args, vocab: int) -> list[PromptJob]:
    """`--prompts` prompts of `--prompt-len` random token ids (< `vocab`), fixed seed."""
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, vocab, (args.prompts, args.prompt_len), generator=g).tolist()
    return [PromptJob(f"bench-{i:05d}", p, job_seed(args.seed, i)) for i, p in enumerate(ids)]


def device_names() -> list[str]:
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "ray": ray.__version__}
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    try:
        out["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                           text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        out["git_commit"] = None
    return out


def run_k(args, k: int, gpu: bool, model_config: dict, weights_ref, jobs: list[PromptJob],
          params: SamplingParams) -> dict:
    rows = args.prompts * args.group // k
    slots = args.slots or rows
    cfg = make_config(args, k, slots, gpu)
    t0 = time.perf_counter()
    group = make_workers(cfg, model_config)
    try:
        start_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        group.load_weights([weights_ref] * k)
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        group.generate(jobs, params)                            # warm-up: graph capture, autotune
        warmup_s = time.perf_counter() - t0
        times, tokens = [], None
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            results, stats = group.generate(jobs, params)
            times.append(time.perf_counter() - t0)
            if stats["workers/restarts"]:
                raise RuntimeError(f"k={k}: a worker died during the timed round ({stats})")
            n = sum(r.num_tokens for r in results)
            if tokens is not None and n != tokens:
                raise RuntimeError(f"k={k}: rounds generated different token counts ({tokens} vs {n})")
            tokens = n
        workers = group.ping()
    finally:
        group.shutdown()
    sec = statistics.median(times)
    return {"k": k, "prompts_per_worker": args.prompts // k, "rows_per_worker": rows, "engine_slots": slots,
            "seconds": sec, "seconds_all": times, "tokens": tokens, "tokens_per_s": tokens / sec,
            "warmup_s": warmup_s, "actor_start_s": start_s, "weight_load_s": load_s, "workers": workers}


def print_table(rows: list[dict]) -> None:
    print(f"{'k':>3} {'seconds':>9} {'tokens':>9} {'tokens/s':>11} {'speedup':>8} {'efficiency':>10}")
    for r in rows:
        if "skipped" in r:
            print(f"{r['k']:>3}  skipped: {r['skipped']}")
            continue
        sp = "-" if r["speedup"] is None else f"{r['speedup']:.2f}"
        ef = "-" if r["efficiency"] is None else f"{100 * r['efficiency']:.1f}%"
        print(f"{r['k']:>3} {r['seconds']:>9.3f} {r['tokens']:>9d} {r['tokens_per_s']:>11.1f} {sp:>8} {ef:>10}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model, CPU workers; checks the script")
    p.add_argument("--workers", type=int, nargs="+", default=None, help="worker counts (default 1 2 4; quick 1 2)")
    p.add_argument("--preset", default=None, help="model preset (default mini-agent-scout; quick tiny)")
    p.add_argument("--prompts", type=int, default=None, help="prompts per round (default 64; quick 8)")
    p.add_argument("--group", type=int, default=None, help="completions per prompt (default 8)")
    p.add_argument("--new", type=int, default=None, help="new tokens per completion (default 512; quick 32)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 64; quick 16)")
    p.add_argument("--slots", type=int, default=0, help="engine slots per worker (default: its whole shard)")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "fast"), help="decode backend")
    p.add_argument("--repeat", type=int, default=1, help="timed rounds per k after the warm-up (median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    q = args.quick
    for name, full, quick in (("workers", [1, 2, 4], [1, 2]), ("preset", "mini-agent-scout", "tiny"),
                              ("prompts", 64, 8), ("group", 8, 8), ("new", 512, 32), ("prompt_len", 64, 16)):
        if getattr(args, name) is None:
            setattr(args, name, quick if q else full)
    ks = sorted(set(args.workers))
    bad = [k for k in ks if k < 1 or args.prompts % k]
    if bad:
        p.error(f"every worker count must divide --prompts {args.prompts} (equal work per worker); bad: {bad}")
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    out = Path(args.out or ROOT / "bench" / "results" / ("rollout_scaling_quick.json" if q else "rollout_scaling.json"))

    gpu = not q
    n_gpus = torch.cuda.device_count() if gpu else 0
    if gpu and n_gpus == 0:
        print("no GPU visible: this benchmark places one generation worker per GPU; use --quick to check "
              "the script on CPU", file=sys.stderr)
        return 2

    cfg = make_config(args, max(ks), args.slots or 1, gpu)
    tokenizer = build_tokenizer(cfg.model)
    model = build_model(cfg.model)                      # random init of the preset (init_seed = --seed)
    model_config = model.config.to_dict()
    t0 = time.perf_counter()
    weights = export_policy(model, version=0)
    export_s = time.perf_counter() - t0
    del model
    jobs = make_jobs(args, min(len(tokenizer), model_config["vocab_size"]))
    params = SamplingParams(max_new_tokens=args.new, temperature=1.0, eos_token_id=None, n=args.group, seed=0)

    cmd = "python bench/rollout_scaling.py " + " ".join(sys.argv[1:] if argv is None else argv)
    res: dict = {
        "command": cmd.strip(), "quick": q, "devices": device_names() if gpu else [platform.processor() or "cpu"],
        "visible_gpus": n_gpus, "cpu_count": os.cpu_count(), "versions": versions(),
        "setup": {"preset": args.preset, "vocab_size": model_config["vocab_size"], "prompts": args.prompts,
                  "group": args.group, "new_tokens": args.new, "prompt_len": args.prompt_len,
                  "backend": args.backend, "gpus_per_worker": 1 if gpu else 0, "repeat": args.repeat,
                  "sharding": "rl.grpo.workers.WorkerGroup.generate: round-robin jobs[w::k]; k divides the prompts",
                  "eos": "disabled (every sample runs to new_tokens)", "weights_bytes": weights.nbytes,
                  "export_s": export_s},
        "results": [],
    }
    if q:
        res["note"] = ("CPU check of the script only: 2 shared cores, so speedup/efficiency mean nothing here")

    ray_kwargs = local_ray_kwargs(cfg)
    ray.init(**ray_kwargs, num_gpus=n_gpus)
    res["ray_init"] = {**ray_kwargs, "num_gpus": n_gpus}
    try:
        weights_ref = ray.put(weights)                  # one object-store copy for every worker, as in sync
        base = None
        for k in ks:
            if gpu and k > n_gpus:
                row = {"k": k, "skipped": f"only {n_gpus} GPU(s) visible"}
            else:
                print(f"k={k}: starting {k} worker(s)...", flush=True)
                row = run_k(args, k, gpu, model_config, weights_ref, jobs, params)
                if k == 1:
                    base = row["tokens_per_s"]
                row["speedup"] = None if base is None else row["tokens_per_s"] / base
                row["efficiency"] = None if base is None else row["speedup"] / k
                print(f"k={k}: {row['seconds']:.3f} s, {row['tokens_per_s']:.1f} tokens/s "
                      f"(warm-up {row['warmup_s']:.2f} s)", flush=True)
            res["results"].append(row)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(res, indent=1, default=str))
    finally:
        ray.shutdown()
    print_table(res["results"])
    if q:
        print("(CPU quick check: the efficiency column means nothing on 2 shared cores)")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
