"""Per-step sampling cost at RL batch sizes: the hash noise (Triton kernel vs its torch reference) and a
whole `sample()` call, on the GPU machine.

    python bench/sampling.py                          # B 64 512, V 50257 -> bench/results/sampling.json
    python bench/sampling.py --quick                  # CPU, small, seconds (checks the script)

Rows: hash uniforms by the Triton kernel and by the torch reference (the ratio is the kernel's gain),
`hash_exponential_noise` (what the engine calls), `sample()` with that noise at temperature 1
(log-softmaxes, argmaxes, gathers), and `sample(keys=, counters=)`: the fused kernel
(rollout/kernels/sample_fused.py, one read of the logits; `fused_x` = sample ms / fused ms), in ms per
call (CUDA events, median of --iters after warm-up). On CUDA also its agreement with the torch reference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rollout.kernels.hash_noise import hash_uniform, hash_uniform_ref  # noqa: E402
from rollout.kernels.sample_fused import sample_hash_fused, sample_hash_fused_ref  # noqa: E402
from rollout.sampling import SamplingTensors, hash_exponential_noise, sample  # noqa: E402
from rollout.types import SamplingParams  # noqa: E402


def time_ms(fn, iters: int, dev: str) -> float:
    for _ in range(3):
        fn()
    out = []
    for _ in range(iters):
        if dev == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            out.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t) * 1e3)
    return statistics.median(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[64, 512])
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.quick:
        a.batch, a.vocab, a.iters = [8], 2048, 3
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    impl = "triton" if dev == "cuda" else "ref"
    rows = []
    for B in a.batch:
        keys = torch.arange(B, device=dev, dtype=torch.int64) * 7919 + 11
        counters = torch.full((B,), 100, device=dev, dtype=torch.int64)
        logits = torch.randn(B, a.vocab, device=dev)
        st = SamplingTensors.from_params([SamplingParams(temperature=1.0)] * B, dev)
        gens = [torch.Generator(device=dev)] * B           # not drawn from: the noise is given
        row = {"batch": B, "vocab": a.vocab,
               "hash_uniform_ms": time_ms(lambda: hash_uniform(keys, counters, a.vocab, impl=impl), a.iters, dev),
               "hash_uniform_torch_ms": time_ms(lambda: hash_uniform_ref(keys, counters, a.vocab), a.iters, dev),
               "hash_exponential_noise_ms": time_ms(lambda: hash_exponential_noise(keys, counters, a.vocab),
                                                    a.iters, dev),
               "sample_with_noise_ms": time_ms(
                   lambda: sample(logits, st, gens, noise=hash_exponential_noise(keys, counters, a.vocab)),
                   a.iters, dev),
               "sample_fused_ms": time_ms(lambda: sample(logits, st, gens, keys=keys, counters=counters),
                                          a.iters, dev)}
        row["kernel_speedup"] = row["hash_uniform_torch_ms"] / row["hash_uniform_ms"]
        row["fused_speedup"] = row["sample_with_noise_ms"] / row["sample_fused_ms"]
        if dev == "cuda":
            assert torch.equal(hash_uniform(keys, counters, a.vocab), hash_uniform_ref(keys, counters, a.vocab))
            temp = torch.tensor([0.7, 1.0, 1.3, 0.0], device=dev).repeat(B // 4 + 1)[:B]
            greedy = torch.arange(B, device=dev) % 5 == 4
            for lg in (logits, logits.bfloat16()):   # the kernel vs the torch reference, mixed rows
                t, lp, mlp = sample_hash_fused(lg, temp, greedy, keys, counters)
                rt, rlp, rmlp = sample_hash_fused_ref(lg, temp, greedy, keys, counters)
                row[f"fused_token_match_{str(lg.dtype)[6:]}"] = float((t == rt).float().mean())
                row[f"fused_logprob_maxdiff_{str(lg.dtype)[6:]}"] = float(
                    torch.maximum((lp - rlp).abs().max(), (mlp - rmlp).abs().max()))
        rows.append(row)
    print(f"{'B':>5} {'V':>7} {'kernel ms':>10} {'torch ms':>9} {'x':>6} {'noise ms':>9} {'sample ms':>10} "
          f"{'sample fused ms':>16} {'fused_x':>8}")
    for r in rows:
        print(f"{r['batch']:>5} {r['vocab']:>7} {r['hash_uniform_ms']:>10.3f} {r['hash_uniform_torch_ms']:>9.3f} "
              f"{r['kernel_speedup']:>6.1f} {r['hash_exponential_noise_ms']:>9.3f} {r['sample_with_noise_ms']:>10.3f} "
              f"{r['sample_fused_ms']:>16.3f} {r['fused_speedup']:>8.1f}")
    out = Path(a.out or ROOT / "bench" / "results" / ("sampling_quick.json" if a.quick else "sampling.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    res = {"device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu", "torch": torch.__version__,
           "impl": impl, "rows": rows}
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
