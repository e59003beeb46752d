"""Learner head log-probs: the fused autograd Function against the checkpointed chunk path it replaced.

    python bench/head_logprob.py                       # GPU: n 65536 tokens, D 512, V 50257 -> bench/results/head_logprob.json
    python bench/head_logprob.py --quick               # CPU, small (checks the script)

The fused Function runs with its torch tails and (on CUDA) its Triton tails (model/kernels_head.py). All
compute log p(target) and the entropy of `x @ w^T` (fp32 head, as the GRPO learner does) for n
tokens and backpropagate a random upstream gradient into x and w. Baseline: the previous code (per
1024-token chunk: torch.utils.checkpoint around log_softmax + gather + entropy). Prints ms per
forward+backward (median of --iters), peak memory, the speed-up and the largest gradient difference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.head_logprob import head_chunk, head_logprobs  # noqa: E402


def _old_chunk(xc, w, tg):
    logp_all = torch.log_softmax(torch.nn.functional.linear(xc.float(), w), dim=-1)
    return logp_all.gather(-1, tg[:, None]).squeeze(-1), -(logp_all.exp() * logp_all).sum(-1)


def baseline(x, w, tg, chunk: int = 1024):
    """The checkpointed path, the baseline of the fused head (model/lm.py, CE_CHUNK 1024)."""
    lps, ents = [], []
    for s in range(0, x.shape[0], chunk):
        lp, ent = checkpoint(_old_chunk, x[s:s + chunk], w, tg[s:s + chunk], use_reentrant=False)
        lps.append(lp)
        ents.append(ent)
    return torch.cat(lps), torch.cat(ents)


def fused_torch(x, w, tg):
    return head_logprobs(x, w, tg, want_entropy=True, impl="torch")


def fused_triton(x, w, tg):
    return head_logprobs(x, w, tg, want_entropy=True, impl="triton")


def run(fn, x, w, tg, g, iters: int, dev: torch.device) -> tuple[float, float, tuple]:
    times = []
    for i in range(iters + 2):
        xg = x.detach().requires_grad_(True)
        wg = w.detach().requires_grad_(True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        lp, ent = fn(xg, wg, tg)
        (lp * g).sum().backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")
    return statistics.median(times), peak, (lp.detach(), ent.detach(), xg.grad, wg.grad)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.quick:
        a.tokens, a.vocab, a.iters = 2048, 4096, 2
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        torch.set_float32_matmul_precision("high")          # as the bf16 GRPO learner sets it
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(a.tokens, a.dim, generator=g).to(dev, torch.bfloat16)
    w = (torch.randn(a.vocab, a.dim, generator=g) * 0.05).to(dev)
    tg = torch.randint(0, a.vocab, (a.tokens,), generator=g).to(dev)
    up = torch.randn(a.tokens, generator=g).to(dev)
    rows = {}
    outs = {}
    paths = [("checkpointed chunks (before)", baseline), ("fused, torch tails", fused_torch)]
    if dev.type == "cuda":
        paths.append(("fused, Triton tails", fused_triton))
    for name, fn in paths:
        ms, peak, outs[name] = run(fn, x, w, tg, up, a.iters, dev)
        rows[name] = {"ms": ms, "peak_gib": peak}
    (lb, eb, xb, wb), (lf, ef, xf, wf) = outs[paths[0][0]], outs[paths[-1][0]]
    diff = {"lp": float((lb - lf).abs().max()), "entropy": float((eb - ef).abs().max()),
            "grad_x_rel": float((xb.float() - xf.float()).abs().max() / xb.float().abs().max()),
            "grad_w_rel": float((wb - wf).abs().max() / wb.abs().max())}
    speedup = rows[paths[0][0]]["ms"] / rows[paths[-1][0]]["ms"]
    print(f"head log-probs + entropy, forward+backward: n {a.tokens} D {a.dim} V {a.vocab}, {dev}"
          f" (fused chunk {head_chunk(a.vocab)})")
    print(f"{'path':32s} {'ms':>9s} {'peak GiB':>9s}")
    for k, r in rows.items():
        print(f"{k:32s} {r['ms']:9.1f} {r['peak_gib']:9.2f}")
    print(f"speed-up of '{paths[-1][0]}' over the baseline {speedup:.2f}x; max differences {diff}")
    res = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
           "command": "python bench/head_logprob.py" + (" --quick" if a.quick else ""),
           "shape": {"tokens": a.tokens, "dim": a.dim, "vocab": a.vocab, "chunk": head_chunk(a.vocab)},
           "rows": rows, "speedup": speedup, "max_diff": diff}
    out = Path(a.out or ROOT / "bench" / "results" / ("head_logprob_quick.json" if a.quick else "head_logprob.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
