"""Mamba-2 SSD scan: dispatch between mamba-ssm's Triton kernel (CUDA) and a pure-torch reference.

Shapes follow mamba-ssm's `mamba_chunk_scan_combined`:
    x [b, l, h, p]   dt [b, l, h]   A [h] (negative)   B, C [b, l, g, n]   (h % g == 0)
    D [h] or [h, p]  z [b, l, h, p]  dt_bias [h]  initial_states [b, h, p, n]  seq_idx [b, l] int32
Recurrence per head h, channel p, state n (t = time):
    dt_t = softplus(dt_t + dt_bias) (if dt_softplus), clamped to dt_limit
    S_t  = exp(A * dt_t) * S_{t-1} + dt_t * x_t B_t^T        (S reset to 0 where seq_idx changes)
    y_t  = S_t C_t + D * x_t;   y_t *= silu(z_t) if z is given
Returns y [b, l, h, p] (x.dtype) and, if return_final_states, S_last [b, h, p, n] (fp32).

Backend: CUDA tensors -> Triton (`model/_mamba_ssm.py`), else `ssd_scan_ref`. `BITMAMBA_SSD=ref|triton`
forces one. The choice is logged once; CUDA without mamba-ssm is a loud warning (once).
"""

from __future__ import annotations

import logging
import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from model import _mamba_ssm

log = logging.getLogger(__name__)
_logged: set[str] = set()


def _once(level: int, key: str, msg: str) -> None:
    if key not in _logged:
        _logged.add(key)
        log.log(level, msg)


def _prep_dt(dt: Tensor, dt_bias: Tensor | None, dt_softplus: bool, dt_limit) -> Tensor:
    dtf = dt.float()
    if dt_bias is not None:
        dtf = dtf + dt_bias.float()
    if dt_softplus:
        dtf = F.softplus(dtf)
    lo, hi = dt_limit
    if lo > 0.0 or hi != math.inf:
        dtf = dtf.clamp(min=lo, max=hi)
    return dtf


def _resets(seq_idx: Tensor) -> Tensor:
    """[b, l] bool: True where a new document starts (not at t = 0)."""
    r = torch.zeros(seq_idx.shape, dtype=torch.bool, device=seq_idx.device)
    r[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return r


def canonical_seq_idx(seq_idx: Tensor) -> Tensor:
    """[b, l] document ids -> int32 0, 1, 2, ... per row, a new id at every change.

    mamba-ssm's kernels compare ids for equality and apply the initial state to id 0, so they need ids
    that start at 0 and never repeat a finished document's id; this makes any labelling safe.
    """
    return torch.cumsum(_resets(seq_idx).to(torch.int32), dim=1, dtype=torch.int32)


def _finish(y: Tensor, x: Tensor, D: Tensor | None, z: Tensor | None) -> Tensor:
    if D is not None:
        Df = D.float()
        y = y + x.float() * (Df[:, None] if Df.dim() == 1 else Df)
    if z is not None:
        y = y * F.silu(z.float())
    return y


def ssd_scan_ref(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int,
                 D: Tensor | None = None, z: Tensor | None = None, dt_bias: Tensor | None = None,
                 initial_states: Tensor | None = None, seq_idx: Tensor | None = None,
                 dt_softplus: bool = False, dt_limit=(0.0, math.inf), return_final_states: bool = False):
    """Pure-torch chunked SSD (the ssd_minimal algorithm), fp32 inside. See the module docstring.

    Document resets set the log-decay at a document's first token to -inf. Segment sums are built
    by masked cumsums (never as differences of cumsums), so no inf - inf appears and gradients stay
    finite.
    """
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    dtf = _prep_dt(dt, dt_bias, dt_softplus, dt_limit)  # [b, l, h]
    Bh = B.float().repeat_interleave(h // g, dim=2)  # [b, l, h, n]
    Ch = C.float().repeat_interleave(h // g, dim=2)
    a = dtf * A.float()  # [b, l, h] log-decay per step
    if seq_idx is not None:
        a = a.masked_fill(_resets(seq_idx)[..., None], -math.inf)
    Xdt = x.float() * dtf[..., None]  # [b, l, h, p]

    L = chunk_size
    pad = (-l) % L
    if pad:
        a = F.pad(a, (0, 0, 0, pad))
        Xdt = F.pad(Xdt, (0, 0, 0, 0, 0, pad))
        Bh = F.pad(Bh, (0, 0, 0, 0, 0, pad))
        Ch = F.pad(Ch, (0, 0, 0, 0, 0, pad))
    c = (l + pad) // L
    a = a.reshape(b, c, L, h).permute(0, 3, 1, 2)  # [b, h, c, L]
    Xdt = Xdt.reshape(b, c, L, h, p)
    Bh = Bh.reshape(b, c, L, h, n)
    Ch = Ch.reshape(b, c, L, h, n)

    tri_strict = torch.tril(torch.ones(L, L, dtype=torch.bool, device=x.device), -1)  # i > j
    tri = torch.tril(torch.ones(L, L, dtype=torch.bool, device=x.device))  # i >= j
    # seg[i, j] = sum_{k=j+1..i} a_k (i >= j), -inf above the diagonal
    rep = a[..., :, None].expand(b, h, c, L, L).masked_fill(~tri_strict, 0.0)
    seg = torch.cumsum(rep, dim=-2).masked_fill(~tri, -math.inf)
    a_cs = torch.cumsum(a, dim=-1)  # [b, h, c, L]: decay from chunk start through t
    # decay from t to chunk end: sum_{k>t} a_k (reverse cumsum shifted by one, no subtraction)
    rev_incl = torch.flip(torch.cumsum(torch.flip(a, (-1,)), -1), (-1,))
    rev_excl = F.pad(rev_incl[..., 1:], (0, 1))

    y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", Ch, Bh, torch.exp(seg), Xdt)
    chunk_states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bh, torch.exp(rev_excl), Xdt)
    chunk_decay = torch.exp(a_cs[..., -1])  # [b, h, c]

    S = (initial_states.float() if initial_states is not None
         else torch.zeros(b, h, p, n, dtype=torch.float32, device=x.device))
    states_in = []
    for ci in range(c):
        states_in.append(S)
        S = chunk_decay[:, :, ci, None, None] * S + chunk_states[:, ci]
    states_in = torch.stack(states_in, dim=1)  # [b, c, h, p, n]
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", Ch, states_in, torch.exp(a_cs))
    y = (y_diag + y_off).reshape(b, c * L, h, p)[:, :l]
    y = _finish(y, x, D, z).to(x.dtype)
    return (y, S) if return_final_states else y


def ssd_sequential_ref(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int = 0,
                       D: Tensor | None = None, z: Tensor | None = None, dt_bias: Tensor | None = None,
                       initial_states: Tensor | None = None, seq_idx: Tensor | None = None,
                       dt_softplus: bool = False, dt_limit=(0.0, math.inf), return_final_states: bool = False):
    """Plain loop over time (test oracle only; slow). Same contract as ssd_scan_ref."""
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    dtf = _prep_dt(dt, dt_bias, dt_softplus, dt_limit)
    Bh = B.float().repeat_interleave(h // g, dim=2)
    Ch = C.float().repeat_interleave(h // g, dim=2)
    resets = _resets(seq_idx) if seq_idx is not None else None
    S = (initial_states.float().clone() if initial_states is not None
         else torch.zeros(b, h, p, n, dtype=torch.float32, device=x.device))
    ys = []
    for t in range(l):
        decay = torch.exp(dtf[:, t] * A.float())[..., None, None]  # [b, h, 1, 1]
        if resets is not None:
            decay = decay * (~resets[:, t]).float()[:, None, None, None]
        S = decay * S + (dtf[:, t, :, None] * x[:, t].float())[..., None] * Bh[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", S, Ch[:, t]))
    y = _finish(torch.stack(ys, dim=1), x, D, z).to(x.dtype)
    return (y, S) if return_final_states else y


def _backend(x: Tensor) -> str:
    forced = os.environ.get("BITMAMBA_SSD", "").strip().lower()
    if forced not in ("", "ref", "triton"):
        raise ValueError(f"BITMAMBA_SSD must be 'ref' or 'triton', got {forced!r}")
    if forced == "ref":
        _once(logging.INFO, "ref-forced", "SSD scan: pure-torch reference (forced by BITMAMBA_SSD=ref)")
        return "ref"
    if forced == "triton":
        _mamba_ssm.mamba_chunk_scan_combined()  # ImportError propagates: asked for, not available
        _once(logging.INFO, "triton-forced", "SSD scan: mamba-ssm Triton kernel (forced by BITMAMBA_SSD=triton)")
        return "triton"
    if x.is_cuda:
        if _mamba_ssm.available():
            _once(logging.INFO, "triton", "SSD scan: mamba-ssm Triton kernel (CUDA)")
            return "triton"
        _once(logging.WARNING, "no-mamba",
              "SSD scan: CUDA tensors but mamba-ssm is not importable; using the SLOW pure-torch reference. "
              "Install it: MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE pip install --no-build-isolation "
              "--no-deps mamba-ssm==2.3.2.post1")
        return "ref"
    _once(logging.INFO, "ref", f"SSD scan: pure-torch reference ({x.device.type})")
    return "ref"


def ssd_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int,
             D: Tensor | None = None, z: Tensor | None = None, dt_bias: Tensor | None = None,
             initial_states: Tensor | None = None, seq_idx: Tensor | None = None,
             return_final_states: bool = False, dt_softplus: bool = False, dt_limit=(0.0, math.inf)):
    """Dispatching SSD scan (see module docstring for shapes and semantics)."""
    if _backend(x) == "triton":
        fn = _mamba_ssm.mamba_chunk_scan_combined()
        if seq_idx is not None:
            seq_idx = canonical_seq_idx(seq_idx).contiguous()
        # strided views (splits of in_proj's output) are fine: the wrapper copies only if stride(-1) != 1
        out = fn(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states,
                 seq_idx=seq_idx, dt_softplus=dt_softplus, dt_limit=dt_limit,
                 return_final_states=return_final_states)
        if return_final_states:
            y, S = out
            return y, S.float()
        return out
    return ssd_scan_ref(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states,
                        seq_idx=seq_idx, dt_softplus=dt_softplus, dt_limit=dt_limit,
                        return_final_states=return_final_states)
