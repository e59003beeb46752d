"""GPU check of the generation worker's OOM backoff (fault 6 of tests/reliability/README.md); run on a CUDA machine:

    python tests/reliability/gpu_oom.py [--slots 1048576] [--memory-gib 2]

Caps this process's CUDA memory (`torch.cuda.set_per_process_memory_fraction`), builds a
`GenerationWorker` of the tiny model with far more engine slots than fit, and generates: the worker
must catch `torch.cuda.OutOfMemoryError`, halve its slots until the batch fits, log one warning, and
return the same samples as a worker with 8 slots. Prints a JSON summary; exit status 0 on success.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
# one config per mamba-ssm Triton kernel instead of ~50 s of autotuning at the first prefill (a test)
os.environ.setdefault("MAMBA_DETERMINISTIC", "1")

import torch  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--slots", type=int, default=1 << 20)
    p.add_argument("--memory-gib", type=float, default=2.0)
    a = p.parse_args(argv)
    assert torch.cuda.is_available(), "needs CUDA"
    from rl.grpo.config import build_model, load_grpo_config
    from rl.grpo.weight_sync import export_policy
    from rl.grpo.workers import GenerationWorker, PromptJob
    from rollout.types import SamplingParams

    cfg = load_grpo_config(data={"model": {"preset": "tiny", "overrides": {"vocab_size": 384}, "backend": "torch"}})
    model = build_model(cfg.model)
    weights = export_policy(model, version=1)
    jobs = [PromptJob(f"p{i}", [5 + i, 6, 7, 8], seed=i) for i in range(4)]
    params = SamplingParams(max_new_tokens=16, temperature=1.0, n=4)

    ref = GenerationWorker(model.config.to_dict(), cfg.model, slots=8)
    ref.load_weights(weights)
    want = [r.token_ids for r in ref.generate(jobs, params)]
    del ref
    torch.cuda.empty_cache()

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(a.memory_gib * 2**30 / total)
    warnings: list[str] = []

    class Count(logging.Handler):
        def emit(self, record):
            warnings.append(record.getMessage())

    logging.getLogger("rl.grpo.workers").addHandler(Count(level=logging.WARNING))
    w = GenerationWorker(model.config.to_dict(), cfg.model, slots=a.slots)
    w.load_weights(weights)
    got = [r.token_ids for r in w.generate(jobs, params)]
    info = w.ping()
    oom_warnings = [m for m in warnings if "out of memory" in m]
    out = {"device": torch.cuda.get_device_name(0), "memory_cap_gib": a.memory_gib, "slots_asked": a.slots,
           "slots_after": info["slots"], "oom_backoffs": info["oom_backoffs"], "oom_warnings": len(oom_warnings),
           "warning": oom_warnings[:1], "same_samples": got == want,
           "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3)}
    print(json.dumps(out, indent=1))
    ok = info["oom_backoffs"] >= 1 and info["slots"] < a.slots and len(oom_warnings) == 1 and got == want
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
