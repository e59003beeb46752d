"""Full optimizer steps of the training stages: tokens/s and peak GPU memory.

    python bench/train.py                       # mini-agent-parent and bitmamba2-1b at 8K and 16K context
    python bench/train.py --quick               # smoke run: 2 layers, 1K context, 1 timed step
    python bench/train.py --offload none,cpu    # also measure the CPU-offloaded optimizer

Each row runs `rl.train.loop.Trainer.step` (the step every stage uses): batch 1, bf16 autocast over
fp32 parameters, gradient checkpointing over blocks, chunked cross-entropy, gradient clipping 1.0,
and the routed optimizer of `rl.train.optim` (Muon for the ternary matrices, AdamW for the rest, the SSM
group), optionally with `cpu_offload` (fp32 masters + optimizer state on the CPU). One warm-up step
(Triton autotune, optimizer state allocation) is excluded from the timing; then `--steps` timed steps
with torch.cuda.synchronize. Peak memory = torch.cuda.max_memory_allocated / max_memory_reserved over
all steps of the row (parameters, gradients, optimizer state, activations). `fits_24gb`: peak
reserved below 24e9 bytes. OOM rows are recorded as "OOM".
Writes a table to stdout and bench/results/train.json (or --out).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.config import BitMambaConfig  # noqa: E402
from model.lm import BitMambaLM  # noqa: E402
from rl.train.optim import OptimConfig, build_optimizer  # noqa: E402
from rl.train.schedule import Schedule, ScheduleConfig  # noqa: E402
from rl.train.loop import LossOut, TrainConfig, Trainer  # noqa: E402

GB = 1e9
BUDGET = 24e9


@dataclass
class _Batch:
    input_ids: torch.Tensor   # [1, T]
    labels: torch.Tensor      # [1, T]

    @property
    def n_tokens(self) -> int:
        return self.labels.numel()

    def to(self, device):
        return _Batch(self.input_ids.to(device), self.labels.to(device))


def _loss(model, b: _Batch) -> LossOut:
    out = model(b.input_ids, labels=b.labels, return_logits=False)
    return LossOut(out.loss_sum, out.n_tokens)


def run_row(preset: str, seq_len: int, offload: bool, steps: int, device: str, n_layers: int | None,
            grad_ckpt: bool = True) -> dict:
    row = {"preset": preset, "seq_len": seq_len, "optimizer_offload": "cpu" if offload else "none",
           "gradient_checkpointing": grad_ckpt, "batch": 1}
    cfg = BitMambaConfig.preset(preset, **({"n_layers": n_layers} if n_layers else {}))
    row["n_layers"] = cfg.n_layers
    cuda = device.startswith("cuda")
    model = opt = None
    try:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        torch.manual_seed(0)
        model = BitMambaLM(cfg).to(device)
        row["params"] = sum(p.numel() for p in model.parameters())
        opt = build_optimizer(model, OptimConfig(lr=1e-4, cpu_offload=offload), verbose=False)
        tcfg = TrainConfig(max_steps=steps + 1, batch_size=1, precision="bf16" if cuda else "fp32",
                           device=device, gradient_checkpointing=grad_ckpt, progress=False)
        trainer = Trainer(model, opt, Schedule(ScheduleConfig(kind="constant"), steps + 1), tcfg)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, cfg.vocab_size, (1, seq_len + 1), generator=g)
        batch = _Batch(ids[:, :-1], ids[:, 1:])
        res = trainer.step(0, [batch], _loss, grad_clip=1.0)  # warm-up
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(steps):
            res = trainer.step(i + 1, [batch], _loss, grad_clip=1.0)
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        row.update(loss=round(res.loss, 4), step_s=round(dt / steps, 3), tokens_per_s=round(steps * seq_len / dt, 1))
        if cuda:
            row["peak_allocated_gb"] = round(torch.cuda.max_memory_allocated() / GB, 2)
            row["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved() / GB, 2)
            row["fits_24gb"] = torch.cuda.max_memory_reserved() < BUDGET
    except torch.OutOfMemoryError:
        row["result"] = "OOM"
        row["fits_24gb"] = False
    finally:
        del model, opt
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="mini-agent-parent,bitmamba2-1b")
    ap.add_argument("--seq-lens", default="8192,16384")
    ap.add_argument("--offload", default="none", help="comma list of none,cpu")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--layers", type=int, default=None, help="override n_layers (smoke runs)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="2 layers, 1K context, 1 timed step")
    ap.add_argument("--no-grad-ckpt", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "train.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.layers, args.seq_lens, args.steps = args.layers or 2, "1024", 1
    presets = [p for p in args.presets.split(",") if p]
    seq_lens = [int(s) for s in args.seq_lens.split(",") if s]
    offloads = [o.strip() == "cpu" for o in args.offload.split(",") if o.strip()]
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": args.device,
           "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor(),
           "quick": args.quick, "command": "python bench/train.py " + " ".join(argv or sys.argv[1:])}
    rows = []
    hdr = f"{'preset':<18} {'ctx':>6} {'offload':>7} {'params':>14} {'tok/s':>9} {'step s':>7} {'peak alloc':>10} {'peak resv':>9} {'24GB':>5}"
    print(hdr)
    for preset in presets:
        for seq in seq_lens:
            for off in offloads:
                r = run_row(preset, seq, off, args.steps, args.device, args.layers, not args.no_grad_ckpt)
                rows.append(r)
                if r.get("result") == "OOM":
                    print(f"{preset:<18} {seq:>6} {r['optimizer_offload']:>7} {'':>14} {'OOM':>9}", flush=True)
                else:
                    print(f"{preset:<18} {seq:>6} {r['optimizer_offload']:>7} {r['params']:>14,} {r['tokens_per_s']:>9.0f} "
                          f"{r['step_s']:>7.2f} {r.get('peak_allocated_gb', float('nan')):>10.2f} "
                          f"{r.get('peak_reserved_gb', float('nan')):>9.2f} {str(r.get('fits_24gb', '-')):>5}",
                          flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"env": env, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
