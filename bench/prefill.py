"""Prefill time per prompt length, first call vs a repeat: finds per-length warm-up (compiles, autotuning).

    TRITON_PRINT_AUTOTUNING=1 python bench/prefill.py --preset mini-agent-scout --lengths 17 18 19 33 64
    python bench/prefill.py --preset tiny --lengths 5 6            # CPU smoke run

Then `--prompts` distinct prompts (lengths drawn from `--lengths`) are prefilled one by one (what the
engine did per refill before batching) and with one `prefill_many`, and the two times compared.

Each length is prefilled three times through the decode backend (`make_backend(model).prefill`, what the
engine calls for every distinct prompt) with different random ids: the first call pays whatever is keyed
by the length, the later ones are the steady state. With TRITON_PRINT_AUTOTUNING=1 Triton names every
kernel it tunes, so the log shows which kernel re-tunes for a new length.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.config import BitMambaConfig  # noqa: E402
from model.lm import BitMambaLM  # noqa: E402
from rollout.backends import make_backend  # noqa: E402


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="mini-agent-scout")
    p.add_argument("--lengths", type=int, nargs="+", default=[17, 18, 19, 24, 33, 47, 64])
    p.add_argument("--prompts", type=int, default=64, help="distinct prompts of the batched comparison")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "prefill.json"))
    a = p.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    cfg = BitMambaConfig.preset(a.preset)
    model = BitMambaLM(cfg).to(dev).eval()
    if dev == "cuda" and a.dtype == "bf16":
        model = model.to(torch.bfloat16)
    model.requires_grad_(False)
    be = make_backend(model)
    be.allocate(8, max(a.lengths) + 64)
    rows = []
    for L in a.lengths:
        ts = [timed(lambda: be.prefill(torch.randint(0, cfg.vocab_size, (L,), device=dev))) for _ in range(3)]
        rows.append({"length": L, "first_ms": 1e3 * ts[0], "repeat_ms": 1e3 * min(ts[1:])})
        print(f"length {L:5d}: first {1e3 * ts[0]:9.1f} ms   repeat {1e3 * min(ts[1:]):7.1f} ms", flush=True)
    # one refill's distinct prompts: one prefill per prompt (the engine before batching) vs prefill_many
    g = torch.Generator().manual_seed(1)
    lens = [a.lengths[int(i)] for i in torch.randint(0, len(a.lengths), (a.prompts,), generator=g)]
    prompts = [torch.randint(0, cfg.vocab_size, (L,), generator=g).tolist() for L in lens]
    one = [timed(lambda: [be.prefill(torch.tensor(x, device=dev)) for x in prompts]) for _ in range(3)]
    many = [timed(lambda: be.prefill_many(prompts)) for _ in range(3)]
    batch = {"prompts": a.prompts, "tokens": sum(lens), "one_by_one_first_s": one[0], "one_by_one_s": min(one[1:]),
             "prefill_many_first_s": many[0], "prefill_many_s": min(many[1:]),
             "speedup": min(one[1:]) / min(many[1:])}
    print(f"{a.prompts} prompts ({sum(lens)} tokens): one by one {1e3 * batch['one_by_one_s']:.1f} ms, "
          f"prefill_many {1e3 * batch['prefill_many_s']:.1f} ms (first {1e3 * many[0]:.1f} ms): "
          f"{batch['speedup']:.1f}x", flush=True)
    res = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "preset": a.preset,
           "backend": type(be).__name__, "dtype": a.dtype if dev == "cuda" else "fp32", "rows": rows,
           "batch": batch}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
