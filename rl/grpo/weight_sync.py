"""Learner -> generation-worker weight sync.

The learner exports its policy once per update as `PolicyWeights`: every ternary BitLinear travels
packed (2-bit codes + fp32 scales, `BitLinear.pack()`; 16x smaller than fp32), everything else
(embedding, norms, conv, A_log, D, dt_bias, fp heads) as is. The learner actor's return value lands in the
Ray object store once and the driver hands that same reference to every worker, which loads it with
`load_into(model, weights)` (`sync_to_workers` does the Ray part).

A worker on the learner's own GPU (same device UUID; e.g. learner and worker at 0.5 GPU each) skips
the object store with `workers.weight_sync: auto` (the default): the learner copies the same tensors
(packed codes and scales, the rest in its own dtype) into one CUDA buffer and sends a CUDA IPC handle
to it (`SharedPolicy`, a few hundred bytes); the worker maps the buffer and loads from it on the GPU,
with no host copy on either side. The learner keeps the buffer until its next export. A worker that
cannot map it falls back to the object store with a warning (`sync/ipc_workers` counts the IPC loads).

Loading a packed matrix writes a latent weight `W = codes * a` (per scale group,
`a = n / (nnz * s)`) into the worker's QAT model: quantizing W reproduces the same codes exactly and
the same scale up to fp32 rounding of the mean, so the worker's eval forward computes the learner's
eval forward (tested). A fast backend re-packs from that model in `refresh_weights()`.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import ray
import torch
from torch import Tensor, nn

from model.bitlinear import BitLinear, expand_scale, unpack_ternary
from model.errors import CheckpointError

log = logging.getLogger("rl.grpo.weight_sync")

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
def collect_policy(model: nn.Module, version: int) -> PolicyWeights:
    """The ternary matrices of `model` packed, the rest as is (the model's tensors, on its device)."""
    out = PolicyWeights(version=version)
    for name, m in model.named_modules():
        if isinstance(m, BitLinear) and m.ternary:
            p = m.pack(to_cpu=False)
            out.packed[f"{name}.weight" if name else "weight"] = (p.codes, p.scale)
    out.dense = {k: t.detach() for k, t in model.state_dict().items() if k not in out.packed}
    return out


def to_host(w: PolicyWeights) -> PolicyWeights:
    """A CPU copy of `w`, float tensors in fp32 (what goes into the object store)."""
    dense = {}
    for k, t in w.dense.items():
        t = t.to("cpu")
        dense[k] = t.float().clone() if t.is_floating_point() else t.clone()
    return PolicyWeights(w.version, {k: (c.cpu(), s.cpu()) for k, (c, s) in w.packed.items()}, dense)


def export_policy(model: nn.Module, version: int) -> PolicyWeights:
    """Pack the ternary matrices of `model`, copy the rest to CPU (fp32 for float tensors)."""
    return to_host(collect_policy(model, version))


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


def gpu_uuid() -> str | None:
    """UUID of this process's current CUDA device (None without CUDA): equal UUIDs = the same GPU."""
    if not torch.cuda.is_available():
        return None
    return str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)


Entry = tuple[int, torch.dtype, tuple[int, ...]]     # byte offset in the flat buffer, dtype, shape


@dataclass
class SharedPolicy:
    """One policy version in a flat uint8 CUDA buffer of the learner, passed by CUDA IPC handle.

    `handle` is the argument tuple of torch's `rebuild_cuda_tensor` for the buffer; `packed` and
    `dense` give each tensor's place in it (same names as `PolicyWeights`)."""

    version: int
    gpu: str
    handle: tuple
    packed: dict[str, tuple[Entry, Entry]]
    dense: dict[str, Entry]
    nbytes: int


def flatten_policy(weights: PolicyWeights, device: torch.device) -> tuple[Tensor, dict, dict]:
    """Copy every tensor of `weights` into one uint8 buffer on `device` (16-byte aligned slots)."""
    order = [t for c, s in weights.packed.values() for t in (c, s)] + list(weights.dense.values())
    offsets, total = [], 0
    for t in order:
        offsets.append(total)
        total += -(-t.numel() * t.element_size() // 16) * 16
    buf = torch.empty(max(total, 16), dtype=torch.uint8, device=device)
    entries = []
    for t, off in zip(order, offsets):
        nb = t.numel() * t.element_size()
        if nb:
            buf[off:off + nb].copy_(t.detach().contiguous().reshape(-1).view(torch.uint8), non_blocking=True)
        entries.append((off, t.dtype, tuple(t.shape)))
    it = iter(entries)
    packed = {k: (next(it), next(it)) for k in weights.packed}
    dense = {k: next(it) for k in weights.dense}
    return buf, packed, dense


def _view(buf: Tensor, e: Entry) -> Tensor:
    off, dtype, shape = e
    nb = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return buf[off:off + nb].view(dtype).reshape(shape)


def policy_views(version: int, buf: Tensor, packed: dict, dense: dict) -> PolicyWeights:
    """`PolicyWeights` whose tensors are views into `buf` (the inverse of `flatten_policy`)."""
    return PolicyWeights(version=version, packed={k: (_view(buf, c), _view(buf, s)) for k, (c, s) in packed.items()},
                         dense={k: _view(buf, e) for k, e in dense.items()})


@torch.no_grad()
def export_shared(model: nn.Module, version: int) -> tuple[SharedPolicy, Tensor]:
    """Pack `model` (on a CUDA device) into one buffer there; returns the handle and the buffer, which
    the caller keeps alive until every worker has loaded it."""
    from torch.multiprocessing.reductions import reduce_tensor

    device = next(model.parameters()).device
    buf, packed, dense = flatten_policy(collect_policy(model, version), device)
    torch.cuda.current_stream(device).synchronize()        # the worker reads it from another process
    _, handle = reduce_tensor(buf)
    return SharedPolicy(version, gpu_uuid(), tuple(handle), packed, dense, buf.numel()), buf


def open_shared(sp: SharedPolicy) -> PolicyWeights:
    """Map a `SharedPolicy` from a process on the same GPU (views into the learner's buffer)."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    here = gpu_uuid()
    if here != sp.gpu:
        raise RuntimeError(f"shared policy lives on GPU {sp.gpu}, this process uses {here}")
    args = list(sp.handle)
    args[6] = torch.cuda.current_device()       # storage_device: the same GPU under this process's numbering
    return policy_views(sp.version, rebuild_cuda_tensor(*args), sp.packed, sp.dense)


def plan_sync(method: str, learner_gpu: str | None, worker_gpus: list[str | None]) -> list[bool]:
    """Per worker: True = CUDA IPC (on the learner's GPU and `method` is auto), False = object store."""
    if method == "object_store" or learner_gpu is None:
        return [False] * len(worker_gpus)
    return [g == learner_gpu for g in worker_gpus]


def sync_to_workers(learner, workers, method: str = "auto", learner_gpu: str | None = None) -> dict[str, float]:
    """Learner actor -> workers: CUDA IPC for workers on the learner's GPU, else the object store.

    `learner.export_weights.remote()` returns a reference to the `PolicyWeights` it produced, stored
    once in the object store; every such worker receives that same reference (Ray resolves it in the
    worker), so the bytes leave the learner once however many workers there are. Workers on
    `learner_gpu` get a `SharedPolicy` instead (see the module docstring). Returns seconds, bytes and
    the number of IPC loads for the metrics.
    """
    t0 = time.perf_counter()
    ipc = plan_sync(method, learner_gpu, workers.gpus())
    shared = ray.get(learner.export_shared.remote()) if any(ipc) else None   # handle + layout, a few KB
    packed = learner.export_weights.remote() if not all(ipc) else None
    workers.load_weights([shared if i else packed for i in ipc], fallback=learner.last_shared_as_weights.remote)
    stats = ray.get(learner.last_export_stats.remote())
    out = {"sync/seconds": time.perf_counter() - t0, "sync/bytes": stats["bytes"],
           "sync/export_s": stats["seconds"], "sync/ipc_workers": float(sum(workers.ipc_loads))}
    if hasattr(workers, "load_stats"):      # the slowest worker's load: unpack into the model, re-pack kernels
        out.update(workers.load_stats())
    return out
