"""Where GPU time goes: kernel-level profiles of one decode step and one training step.

    python bench/gpu_profile.py --decode-batch 1 64 --train-context 2048 --out bench/results/profile.json

decode: FastBackend of `--preset` (bf16, random weights), eager (no CUDA graph, so every kernel is
visible to the profiler), `--steps` profiled steps after a warm-up; plus the graph-replay ms/step of the
same bucket for reference. train: one forward+backward of `--train-preset` at `--train-context` tokens
(bf16 autocast, gradient checkpointing), as in bench/train_step.py. Prints the top kernels by total CUDA
time and writes them (with launch counts) to JSON. Numbers only mean something on the GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.config import BitMambaConfig  # noqa: E402
from model.lm import BitMambaLM  # noqa: E402
from rollout.backends.triton_backend import FastBackend  # noqa: E402


def kernel_table(prof, steps: int, top: int) -> list[dict]:
    agg: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            a = agg[ev.name[:90]]
            a[0] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
            a[1] += 1
    total = sum(v[0] for v in agg.values())
    rows = [{"kernel": k, "us_per_step": v[0] / steps, "launches_per_step": v[1] / steps,
             "share": v[0] / total if total else 0.0} for k, v in agg.items()]
    rows.sort(key=lambda r: -r["us_per_step"])
    print(f"  total kernel time {total / steps:.1f} us/step, {sum(v[1] for v in agg.values()) / steps:.0f} launches/step")
    for r in rows[:top]:
        print(f"  {r['us_per_step']:9.1f} us {r['launches_per_step']:6.0f}x {100 * r['share']:5.1f}%  {r['kernel']}")
    return rows[:top] + [{"kernel": "TOTAL", "us_per_step": total / steps,
                          "launches_per_step": sum(v[1] for v in agg.values()) / steps}]


def decode_profile(preset: str, batch: int, steps: int, top: int) -> dict:
    cfg = BitMambaConfig.preset(preset)
    torch.manual_seed(0)
    model = BitMambaLM(cfg).to("cuda", torch.bfloat16).eval()
    out = {}
    for graphs in (False, True):
        be = FastBackend(model, use_graphs=graphs)
        be.allocate(batch, 256)
        tok = torch.randint(0, cfg.vocab_size, (batch,), device="cuda")
        for _ in range(3):
            be.step(tok)
        torch.cuda.synchronize()
        if graphs:
            t0 = time.perf_counter()
            for _ in range(50):
                be.step(tok)
            torch.cuda.synchronize()
            out["graph_ms_per_step"] = (time.perf_counter() - t0) / 50 * 1e3
            print(f"decode {preset} b{batch}: graph replay {out['graph_ms_per_step']:.3f} ms/step")
        else:
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(steps):
                    be.step(tok)
                torch.cuda.synchronize()
            print(f"decode {preset} b{batch} eager kernels:")
            out["kernels"] = kernel_table(prof, steps, top)
        del be
    return out


def train_profile(preset: str, context: int, top: int) -> dict:
    cfg = BitMambaConfig.preset(preset)
    torch.manual_seed(0)
    model = BitMambaLM(cfg).cuda().train()
    model.gradient_checkpointing = True
    ids = torch.randint(0, cfg.vocab_size, (1, context), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) * 1e3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(f"train {preset} {context}: {ms:.1f} ms/step; kernels:")
    return {"ms_per_step": ms, "kernels": kernel_table(prof, 1, top)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="bitmamba2-1b")
    ap.add_argument("--decode-batch", type=int, nargs="*", default=[1, 64])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--train-preset", default="mini-agent-parent")
    ap.add_argument("--train-context", type=int, nargs="*", default=[2048])
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", default="bench/results/profile.json")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench/gpu_profile.py needs a CUDA GPU")
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "decode": {}, "train": {}}
    for b in a.decode_batch:
        res["decode"][f"{a.preset}/b{b}"] = decode_profile(a.preset, b, a.steps, a.top)
    for c in a.train_context:
        res["train"][f"{a.train_preset}/{c}"] = train_profile(a.train_preset, c, a.top)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print("wrote", a.out)


if __name__ == "__main__":
    main()
