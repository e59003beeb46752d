"""Fused RMSNorm + per-token int8 activation quantization (the input side of every BitLinear).

    x_q, s_x = rmsnorm_quant(x, norm_w, eps, act_quant=True)     # int8 [M, K], fp32 [M]
    x_n, None = rmsnorm_quant(x, norm_w, eps, act_quant=False)   # fp32 [M, K] (W1.58A16)

Math (BitLinear eval, DESIGN.md / ANCHORS.md §1), all in fp32:
    n      = x * rsqrt(mean(x^2 over the norm group) + eps) * norm_w      (skipped when norm_w is None)
    s_x    = 127 / (max|n| + 1e-5)                                       (over the whole row)
    x_q    = clip(round_half_away(n * s_x), -128, 127)
`norm_groups` > 1 normalizes each of `norm_groups` equal slices of the row separately (the gated
RMSNorm of a standard Mamba-2 mixer with ngroups > 1); the absmax for the quant is still per row.
"""

from __future__ import annotations

import torch

from rollout.kernels._dispatch import next_pow2, resolve

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference still works; resolve() refuses "triton"
    triton = None


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """sign(x) * floor(|x| + 0.5): the engine's rounding (torch.round would round half to even)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def rmsnorm_quant_ref(
    x: torch.Tensor,
    norm_w: torch.Tensor | None,
    eps: float,
    act_quant: bool = True,
    norm_groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pure-torch oracle. x [M, K] any float dtype; norm_w [K] or None (no norm).

    Returns (x_q int8 [M, K], s_x fp32 [M]) when act_quant, else (normed x fp32 [M, K], None).
    """
    M, K = x.shape
    h = x.float()
    if norm_w is not None:
        hg = h.view(M, norm_groups, K // norm_groups)
        hg = hg * torch.rsqrt(hg.pow(2).mean(-1, keepdim=True) + eps)
        h = hg.view(M, K) * norm_w.float()
    if not act_quant:
        return h, None
    s_x = 127.0 / (h.abs().amax(-1) + 1e-5)
    x_q = round_half_away(h * s_x[:, None]).clamp_(-128, 127).to(torch.int8)
    return x_q, s_x


if triton is not None:

    @triton.jit
    def _rmsnorm_quant_kernel(
        x_ptr, w_ptr, out_ptr, s_ptr,
        K, GS, NG, stride_xm, stride_om, eps,
        HAS_NORM: tl.constexpr, ACT_QUANT: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """One program per row; loops over the NG norm groups of GS columns (BLOCK >= GS)."""
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < GS
        x_row = x_ptr + row * stride_xm
        o_row = out_ptr + row * stride_om
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        # pass 1: normalize (and, without quant, store); track |n| max for the quant
        for g in range(NG):
            x = tl.load(x_row + g * GS + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_NORM:
                ms = tl.sum(x * x, axis=0) / GS
                w = tl.load(w_ptr + g * GS + offs, mask=mask, other=0.0).to(tl.float32)
                x = x * tl.rsqrt(ms + eps) * w
            if ACT_QUANT:
                amax = tl.maximum(amax, tl.abs(x))
            else:
                tl.store(o_row + g * GS + offs, x.to(out_ptr.dtype.element_ty), mask=mask)
        if ACT_QUANT:
            # correctly rounded division (torch's), as a block: plain '/' compiles to approximate division
            den = tl.zeros([BLOCK], dtype=tl.float32) + (tl.max(amax, axis=0) + 1e-5)
            s = tl.math.div_rn(tl.full([BLOCK], 127.0, tl.float32), den)
            tl.store(s_ptr + row + offs * 0, s, mask=offs == 0)
            # pass 2: recompute the (cached) normalized values and quantize
            for g in range(NG):
                x = tl.load(x_row + g * GS + offs, mask=mask, other=0.0).to(tl.float32)
                if HAS_NORM:
                    ms = tl.sum(x * x, axis=0) / GS
                    w = tl.load(w_ptr + g * GS + offs, mask=mask, other=0.0).to(tl.float32)
                    x = x * tl.rsqrt(ms + eps) * w
                v = x * s
                q = tl.where(v >= 0, tl.floor(v + 0.5), -tl.floor(-v + 0.5))
                q = tl.minimum(tl.maximum(q, -128.0), 127.0)
                tl.store(o_row + g * GS + offs, q.to(tl.int8), mask=mask)


def rmsnorm_quant(
    x: torch.Tensor,
    norm_w: torch.Tensor | None,
    eps: float,
    act_quant: bool = True,
    norm_groups: int = 1,
    *,
    out: torch.Tensor | None = None,
    s_out: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    impl: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fused RMSNorm (+ int8 per-token quant). x [M, K]; see the module docstring.

    `out` / `s_out` are optional preallocated outputs (CUDA-graph buffers). Without act_quant the
    normed activations come back in `out_dtype` (fp32 default; bf16 for a bf16 W1.58A16 matmul).
    """
    if x.dim() != 2:
        raise ValueError(f"rmsnorm_quant: x must be [M, K], got {tuple(x.shape)}")
    M, K = x.shape
    if K % norm_groups:
        raise ValueError(f"rmsnorm_quant: K={K} not divisible by norm_groups={norm_groups}")
    if resolve("rmsnorm_quant", x.device, impl) == "ref":
        q, s = rmsnorm_quant_ref(x, norm_w, eps, act_quant, norm_groups)
        if not act_quant:
            q = q.to(out_dtype)
        if out is not None:
            out.copy_(q)
            q = out
        if s is not None and s_out is not None:
            s_out.copy_(s)
            s = s_out
        return q, s
    if x.stride(1) != 1:
        x = x.contiguous()
    if out is None:
        out = torch.empty(M, K, device=x.device, dtype=torch.int8 if act_quant else out_dtype)
    if act_quant and s_out is None:
        s_out = torch.empty(M, device=x.device, dtype=torch.float32)
    gs = K // norm_groups if norm_w is not None else K
    ng = norm_groups if norm_w is not None else 1
    block = next_pow2(gs)
    num_warps = 4 if block <= 2048 else 8
    _rmsnorm_quant_kernel[(M,)](
        x, norm_w if norm_w is not None else x, out, s_out if act_quant else out,
        K, gs, ng, x.stride(0), out.stride(0), float(eps),
        HAS_NORM=norm_w is not None, ACT_QUANT=act_quant, BLOCK=block, num_warps=num_warps,
    )
    return out, (s_out if act_quant else None)
