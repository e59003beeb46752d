"""Learner -> generation-worker weight sync.

The learner exports its policy once per update as `PolicyWeights`: every ternary BitLinear travels
packed (2-bit codes + fp32 scales, `BitLinear.pack()`; 16x smaller than fp32), everything else
(embedding, norms, conv, A_log, D, dt_bias, fp heads) as is. The learner actor's return value lands in the
Ray object store once and the driver hands that same reference to every worker, which loads it with
`load_into(model, weights)` (`sync_to_workers` does the Ray part).

Loading a packed matrix writes a latent weight `W = codes * a` (per scale group,
`a = n / (nnz * s)`) into the worker's QAT model: quantizing W reproduces the same codes exactly and
the same scale up to fp32 rounding of the mean, so the worker's eval forward computes the learner's
eval forward (tested). A fast backend re-packs from that model in `refresh_weights()`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import ray
import torch
from torch import Tensor, nn

from model.bitlinear import BitLinear, expand_scale, unpack_ternary
from model.errors import CheckpointError


@dataclass
class PolicyWeights:
    """One exported policy version. Shapes: codes uint8 [out, in/4], scale fp32 [1,1] or [out, G]."""

    version: int
    packed: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)   # "<module>.weight" -> (codes, scale)
    dense: dict[str, Tensor] = field(default_factory=dict)                   # state_dict name -> tensor (CPU)

    @property
    def nbytes(self) -> int:
        n = sum(c.numel() * c.element_size() + s.numel() * s.element_size() for c, s in self.packed.values())
        return n + sum(t.numel() * t.element_size() for t in self.dense.values())


@torch.no_grad()
def export_policy(model: nn.Module, version: int) -> PolicyWeights:
    """Pack the ternary matrices of `model`, copy the rest to CPU (fp32 for float tensors)."""
    out = PolicyWeights(version=version)
    for name, m in model.named_modules():
        if isinstance(m, BitLinear) and m.ternary:
            p = m.pack()
            out.packed[f"{name}.weight" if name else "weight"] = (p.codes, p.scale)
    for name, t in model.state_dict().items():
        if name in out.packed:
            continue
        t = t.detach().to("cpu")
        out.dense[name] = t.float().clone() if t.is_floating_point() else t.clone()
    return out


def latent_from_packed(codes_u8: Tensor, scale: Tensor, in_features: int) -> Tensor:
    """Latent fp32 [out, in] whose absmean quantization gives the packed codes (exact) and scale."""
    codes = unpack_ternary(codes_u8, in_features).float()                   # [out, in]
    out_f = codes.shape[0]
    if scale.shape == (1, 1):
        frac = (codes != 0).float().mean().reshape(1, 1)                     # [1, 1]
    else:
        g = in_features // scale.shape[1]
        frac = (codes != 0).float().reshape(out_f, -1, g).mean(-1)           # [out, G]
    a = 1.0 / (scale.float() * frac.clamp(min=1e-12))                        # [1,1] or [out, G]
    return codes * expand_scale(a, in_features)                              # [out, in]


@torch.no_grad()
def load_into(model: nn.Module, weights: PolicyWeights) -> None:
    """Write `weights` into `model` (same architecture); raises CheckpointError on any mismatch."""
    state = model.state_dict()
    expected = set(state)
    got = set(weights.dense) | set(weights.packed)
    if expected != got:
        missing, extra = sorted(expected - got), sorted(got - expected)
        raise CheckpointError(f"policy weights do not fit the worker model: missing {missing[:3]}, "
                              f"unexpected {extra[:3]}")
    modules = dict(model.named_modules())
    for name, (codes, scale) in weights.packed.items():
        mod = modules[name.rsplit(".", 1)[0]] if "." in name else model
        if not isinstance(mod, BitLinear) or tuple(mod.weight.shape) != (codes.shape[0], codes.shape[1] * 4):
            raise CheckpointError(f"policy weights: {name} packed {tuple(codes.shape)} does not fit "
                                  f"{type(mod).__name__} {tuple(getattr(mod, 'weight').shape)}")
        dev = mod.weight.device        # unpack where the weight lives (a GPU worker: no host-side float pass)
        lat = latent_from_packed(codes.to(dev), scale.to(dev), mod.in_features)
        mod.weight.copy_(lat.to(mod.weight.dtype))
    for name, t in weights.dense.items():
        dst = state[name]
        if dst.shape != t.shape:
            raise CheckpointError(f"policy weights: {name} has shape {tuple(t.shape)}, model {tuple(dst.shape)}")
        dst.copy_(t.to(dst.device, dst.dtype))


def sync_to_workers(learner, workers) -> dict[str, float]:
    """Learner actor -> object store (once) -> every worker of a `WorkerGroup`.

    `learner.export_weights.remote()` returns a reference to the `PolicyWeights` it produced, stored
    once in the object store; every worker receives that same reference (Ray resolves it in the
    worker), so the bytes leave the learner once however many workers there are. Returns seconds and
    bytes for the metrics.
    """
    t0 = time.perf_counter()
    ref = learner.export_weights.remote()
    workers.load_weights(ref)
    stats = ray.get(learner.last_export_stats.remote())
    out = {"sync/seconds": time.perf_counter() - t0, "sync/bytes": stats["bytes"],
           "sync/export_s": stats["seconds"]}
    if hasattr(workers, "load_stats"):      # the slowest worker's load: unpack into the model, re-pack kernels
        out.update(workers.load_stats())
    return out
