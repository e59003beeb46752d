"""Row kernels of the learner head (model/head_logprob.py): the element-wise tails over fp32 [c, V] logits.

    lp, lse, ent = row_stats(z, tg, want_entropy)    # one read of z, z unchanged
    grad_logits_(z, lse, g, tg)                      # z <- g * (onehot(tg) - exp(z - lse)), one read + write
    row_stats_ref_ / grad_logits_ref_                # the torch twins (CPU path, fp64, test oracle)

`row_stats` keeps per-lane online accumulators over blocks of the row: m (running max), S = sum e^(z-m) and
T = sum e^(z-m) (z-m), rescaled by a = e^(m-m') when the max grows (S' = a S, T' = a (T + (m-m') S)); then
lse = m + log S and the entropy H = lse - sum p z = log S - T / S. `grad_logits_` skips reading rows with
g == 0 (their gradient is 0). One program per row. Triton is imported and the kernels defined on first use
(never at import: a CPU process importing the model leaves triton alone), so TRITON_INTERPRET=1 set any time
before the first forced call runs them on CPU in Triton's interpreter.
`use_triton(device, dtype, impl)`: impl (or env BITMAMBA_HEAD) "auto" | "torch" | "triton"; auto = Triton
on CUDA for fp32; fp64 always goes to torch; "triton" where it cannot run raises.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger("model.head")

BLOCK = 2048          # elements per loop step (8 fp32 per thread at 8 warps)
NUM_WARPS = 8
IMPLS = ("auto", "torch", "triton")
_said: set[tuple[str, str]] = set()


def interpreting() -> bool:
    """True when Triton runs kernels on CPU tensors (TRITON_INTERPRET=1 when the kernels are defined)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None       # without importing it


def use_triton(device: torch.device, dtype: torch.dtype, impl: str | None = None) -> bool:
    """Triton kernels (True) or the torch twins for logits of `dtype` on `device`; see the module doc."""
    impl = impl or os.environ.get("BITMAMBA_HEAD", "").strip().lower() or "auto"
    if impl not in IMPLS:
        raise ValueError(f"head kernel impl must be one of {IMPLS}, got {impl!r} (argument or BITMAMBA_HEAD)")
    has_triton = _has_triton()
    if dtype != torch.float32 or impl == "torch":
        tk = False
    else:
        tk = impl == "triton" or (device.type == "cuda" and has_triton)
    if tk and not (has_triton and (device.type == "cuda" or interpreting())):
        raise RuntimeError(f"head kernels: Triton asked for on {device} but cannot run (needs triton and CUDA, "
                           "or TRITON_INTERPRET=1 before the first call)")
    key = (device.type, "triton" if tk else "torch")
    if key not in _said:
        _said.add(key)
        log.info("learner head row kernels on %s: %s", *key)
    return tk


# ---- torch twins (the previous in-place code, unchanged numerics) ----

def row_stats_ref_(z: Tensor, tg: Tensor, want_entropy: bool) -> tuple[Tensor, Tensor, Tensor]:
    """z [c, V] (fp32/fp64; overwritten: scratch), tg [c] int64 -> lp [c], lse [c], ent [c] (or [0])."""
    m = z.amax(-1, keepdim=True)
    zt = z.gather(-1, tg[:, None])
    z.sub_(m).exp_()                                             # exp(z - m)
    tot = z.sum(-1, keepdim=True)
    lse_s = tot.log()                                            # lse - m
    lp = (zt - m - lse_s).squeeze(-1)
    lse = (m + lse_s).squeeze(-1)
    if not want_entropy:
        return lp, lse, z.new_empty(0)
    ent = lse_s + torch.special.entr(z, out=z).sum(-1, keepdim=True) / tot   # H = log S + sum(-e log e) / S
    return lp, lse, ent.squeeze(-1)


def grad_logits_ref_(z: Tensor, lse: Tensor, g: Tensor, tg: Tensor) -> Tensor:
    """In place: z [c, V] logits -> g * (onehot(tg) - exp(z - lse)); lse, g [c], tg [c] int64. Returns z."""
    z.sub_(lse[:, None]).exp_().mul_(-g[:, None])               # -g * softmax
    return z.scatter_add_(-1, tg[:, None], g[:, None])           # + g at the target


# ---- Triton ----

def _rows(z: Tensor, *vecs: Tensor) -> None:
    c, _ = z.shape
    if z.dtype != torch.float32 or z.stride(1) != 1:
        raise ValueError(f"head kernels need fp32 logits with unit column stride, got {z.dtype} {z.stride()}")
    if any(t.shape != (c,) or not t.is_contiguous() or t.device != z.device for t in vecs):
        raise ValueError(f"head kernels: per-row inputs must be contiguous [{c}] on {z.device}")


def row_stats(z: Tensor, tg: Tensor, want_entropy: bool, block: int = BLOCK) -> tuple[Tensor, Tensor, Tensor]:
    """Triton twin of `row_stats_ref_`: z [c, V] fp32 read once (not modified), tg [c] int64
    -> lp [c], lse [c], ent [c] (or [0]) fp32."""
    tg = tg.long().contiguous()
    _rows(z, tg)
    c, V = z.shape
    lp, lse, ent = (torch.empty(k, dtype=torch.float32, device=z.device) for k in (c, c, c * want_entropy))
    if c:
        _kernels()[0][(c,)](z, z.stride(0), tg, lp, lse, ent if want_entropy else lse, V,
                            WANT_ENT=want_entropy, BLOCK=block, num_warps=NUM_WARPS)
    return lp, lse, ent


def grad_logits_(z: Tensor, lse: Tensor, g: Tensor, tg: Tensor, block: int = BLOCK) -> Tensor:
    """Triton twin of `grad_logits_ref_`: z [c, V] fp32 in place (one read + one write; rows with g == 0
    only written), lse, g [c] fp32, tg [c] int64. Returns z."""
    lse, g, tg = lse.float().contiguous(), g.float().contiguous(), tg.long().contiguous()
    _rows(z, lse, g, tg)
    if z.shape[0]:
        _kernels()[1][(z.shape[0],)](z, z.stride(0), lse, g, tg, z.shape[1], BLOCK=block, num_warps=NUM_WARPS)
    return z


@functools.cache
def _kernels() -> tuple[Any, Any]:
    """Import triton and define (row_stats kernel, grad_logits kernel), once; under TRITON_INTERPRET=1 if set."""
    global triton, tl
    import triton
    import triton.language as tl

    @triton.jit
    def _row_stats_kernel(z_ptr, stride, tg_ptr, lp_ptr, lse_ptr, ent_ptr, V,
                          WANT_ENT: tl.constexpr, BLOCK: tl.constexpr):
        """One row: per-lane online max m, S = sum e^(z-m), T = sum e^(z-m) (z-m); lanes merged at the end."""
        row = tl.program_id(0).to(tl.int64)
        base = z_ptr + row * stride
        lane = tl.arange(0, BLOCK)
        m = tl.full([BLOCK], -1e30, tl.float32)              # finite: m - m' stays finite for empty lanes
        s = tl.zeros([BLOCK], tl.float32)
        t = tl.zeros([BLOCK], tl.float32)
        for start in range(0, V, BLOCK):
            v = start + lane
            ok = v < V
            x = tl.load(base + v, mask=ok, other=float("-inf"))
            nm = tl.maximum(m, x)
            a = tl.exp(m - nm)
            d = tl.where(ok, x - nm, -1e30)                  # finite: e * d is 0, not nan, off the row
            e = tl.exp(d)
            if WANT_ENT:
                t = a * (t + (m - nm) * s) + e * d
            s = s * a + e
            m = nm
        mx = tl.max(m, 0)
        a = tl.exp(m - mx)
        tot = tl.sum(s * a, 0)
        lse = mx + tl.log(tot)
        zt = tl.load(base + tl.load(tg_ptr + row))
        tl.store(lp_ptr + row, zt - lse)
        tl.store(lse_ptr + row, lse)
        if WANT_ENT:
            tt = tl.sum(a * (t + (m - mx) * s), 0)
            tl.store(ent_ptr + row, tl.log(tot) - tt / tot)

    @triton.jit
    def _grad_logits_kernel(z_ptr, stride, lse_ptr, g_ptr, tg_ptr, V, BLOCK: tl.constexpr):
        """One row in place: z <- -g exp(z - lse), + g at the target; g == 0 rows are not read (-> 0)."""
        row = tl.program_id(0).to(tl.int64)
        base = z_ptr + row * stride
        lse = tl.load(lse_ptr + row)
        g = tl.load(g_ptr + row)
        tgt = tl.load(tg_ptr + row)
        lim = tl.where(g != 0.0, V, 0)                       # columns to read: none when g == 0
        lane = tl.arange(0, BLOCK)
        for start in range(0, V, BLOCK):
            v = start + lane
            ok = v < V
            x = tl.load(base + v, mask=v < lim, other=float("-inf"))
            y = tl.exp(x - lse) * -g
            tl.store(base + v, tl.where(v == tgt, y + g, y), mask=ok)

    return _row_stats_kernel, _grad_logits_kernel
