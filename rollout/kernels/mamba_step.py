"""Fused one-token Mamba-2 recurrence (the decode-time core of `Mamba2Mixer.step`).

    g = mamba_step(zxbcdt, conv_state, conv_w, conv_b, dt_bias, A_log, D, ssm_state, dims)

Inputs: zxbcdt [B, d_in_proj] (in_proj output, split [z | x | B | C | dt] with sizes
[d_inner, d_inner, G*N, G*N, H]); conv_state [B, conv_dim, d_conv-1] (oldest first) and
ssm_state [B, H, P, N] (fp32 or bf16), both updated in place; conv_w [conv_dim, 1, d_conv], conv_b [conv_dim];
dt_bias, A_log [H]; D [H] or [d_inner]. Output g = y * silu(z) [B, d_inner] fp32: the input of the
(gated) RMSNorm in front of out_proj, which `rmsnorm_quant` fuses with the int8 quant
(norm_groups = ngroups for the standard gated norm, 1 for BitMamba-2's out_proj.norm).

Per head h (group g = h // (H/G)), channel p, state n, in fp32:
    xBC  = silu(conv over the d_conv window [conv_state | new input] + bias)   (x only, or x,B,C: conv_bc)
    dt   = softplus(dt_raw[h] + dt_bias[h]);   dA = exp(dt * -exp(A_log[h]))
    S    = S * dA + (dt * x[p]) * B[g, n]
    y[p] = sum_n S[p, n] * C[g, n] + D * x[p];   g[p] = y[p] * silu(z[p])

Launches: one (`_mamba_step_kernel`, grid (B, H, P-blocks)) when the conv is over x only (BitMamba-2:
no channel is shared between heads); two when the conv covers B, C (their channels are shared by all
heads of a group, so a small `_conv_step_kernel` updates the conv state once first).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rollout.kernels._dispatch import next_pow2, resolve

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


@dataclass(frozen=True)
class MambaDims:
    d_inner: int
    n_heads: int
    headdim: int
    ngroups: int
    d_state: int
    d_conv: int
    conv_bc: bool          # conv over x,B,C (standard) or x only (BitMamba-2)
    d_per_channel: bool    # D [d_inner] (BitMamba-2) or [H]

    @classmethod
    def from_config(cls, c) -> "MambaDims":
        return cls(c.d_inner, c.n_heads, c.headdim, c.ngroups, c.d_state, c.d_conv, c.conv_bc, c.d_per_channel)

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.ngroups * self.d_state if self.conv_bc else self.d_inner

    @property
    def d_in_proj(self) -> int:
        return 2 * self.d_inner + 2 * self.ngroups * self.d_state + self.n_heads


@torch.no_grad()
def mamba_step_ref(zxbcdt, conv_state, conv_w, conv_b, dt_bias, A_log, D, ssm_state, dims: MambaDims):
    """Pure-torch oracle; the same operations, in the same order, as `Mamba2Mixer.step`."""
    d = dims
    Bsz = zxbcdt.shape[0]
    gn = d.ngroups * d.d_state
    z, xBC, dt = torch.split(zxbcdt, [d.d_inner, d.d_inner + 2 * gn, d.n_heads], dim=-1)
    conv_in, passthrough = (xBC, None) if d.conv_bc else (xBC[:, : d.d_inner], xBC[:, d.d_inner:])
    window = torch.cat([conv_state.to(conv_in.dtype), conv_in[:, :, None]], dim=-1)   # [B, C, K]
    conv_out = (window.float() * conv_w[:, 0, :].float()).sum(-1) + conv_b.float()
    conv_state.copy_(window[..., 1:])
    conv_out = F.silu(conv_out)
    xBC = conv_out if passthrough is None else torch.cat([conv_out, passthrough.float()], dim=-1)
    x, Bm, Cm = torch.split(xBC, [d.d_inner, gn, gn], dim=-1)
    H, P, N, rep = d.n_heads, d.headdim, d.d_state, d.n_heads // d.ngroups
    x = x.reshape(Bsz, H, P)
    Bm = Bm.reshape(Bsz, d.ngroups, N).repeat_interleave(rep, dim=1)
    Cm = Cm.reshape(Bsz, d.ngroups, N).repeat_interleave(rep, dim=1)
    dtf = F.softplus(dt.float() + dt_bias.float())
    dA = torch.exp(dtf * -torch.exp(A_log.float()))
    S = ssm_state.float() * dA[..., None, None] + (dtf[..., None] * x)[..., None] * Bm[:, :, None, :]
    ssm_state.copy_(S)
    y = torch.einsum("bhpn,bhn->bhp", S, Cm)
    Df = D.float()
    y = y + x * (Df.view(H, P) if d.d_per_channel else Df[:, None])
    y = y.reshape(Bsz, d.d_inner)
    return y * F.silu(z.float())


if triton is not None:

    @triton.jit
    def _softplus(x):
        # log1p(exp(x)) with torch's threshold 20; log1p via log(u) * e / (u - 1) (exact near 0)
        e = tl.exp(x)
        u = 1.0 + e
        lp = tl.where(u == 1.0, e, tl.log(u) * (e / (u - 1.0)))
        return tl.where(x > 20.0, x, lp)

    @triton.jit
    def _conv_step_kernel(
        zx_ptr, conv_ptr, w_ptr, b_ptr, out_ptr,
        C, DI, stride_zx, stride_cb, stride_cc, stride_ob,
        D_CONV: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """conv window update + SiLU for conv channels [x | B | C] of one row; writes fp32 out [B, C]."""
        b = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = offs < C
        xin = tl.load(zx_ptr + b * stride_zx + DI + offs, mask=mask, other=0.0)
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        row = conv_ptr + b * stride_cb + offs * stride_cc
        for k in tl.static_range(D_CONV - 1):
            s = tl.load(row + k, mask=mask, other=0.0)
            acc += tl.load(w_ptr + offs * D_CONV + k, mask=mask, other=0.0).to(tl.float32) * s.to(tl.float32)
            if k > 0:
                tl.store(row + (k - 1), s, mask=mask)
        xs = xin.to(conv_ptr.dtype.element_ty)
        acc += tl.load(w_ptr + offs * D_CONV + (D_CONV - 1), mask=mask, other=0.0).to(tl.float32) * xs.to(tl.float32)
        tl.store(row + (D_CONV - 2), xs, mask=mask)
        acc += tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        acc = acc * tl.sigmoid(acc)
        tl.store(out_ptr + b * stride_ob + offs, acc, mask=mask)

    @triton.jit
    def _mamba_step_kernel(
        zx_ptr, xbc_ptr, conv_ptr, w_ptr, cb_ptr, dtb_ptr, alog_ptr, d_ptr, ssm_ptr, y_ptr,
        DI, H, P, N, G, HPG,
        stride_zx, stride_xbc, stride_cb, stride_cc,
        stride_sb, stride_sh, stride_sp, stride_yb,
        FUSE_CONV: tl.constexpr, D_PER_CHANNEL: tl.constexpr, D_CONV: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        offs_p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_n = tl.arange(0, BLOCK_N)
        mask_p = offs_p < P
        mask_n = offs_n < N
        g = h // HPG
        ch = h * P + offs_p                                   # channel in d_inner
        zrow = zx_ptr + b * stride_zx
        if FUSE_CONV:
            # conv over x only: this program owns its channels' conv window
            xin = tl.load(zrow + DI + ch, mask=mask_p, other=0.0)
            crow = conv_ptr + b * stride_cb + ch * stride_cc
            acc = tl.zeros([BLOCK_P], dtype=tl.float32)
            for k in tl.static_range(D_CONV - 1):
                s = tl.load(crow + k, mask=mask_p, other=0.0)
                acc += tl.load(w_ptr + ch * D_CONV + k, mask=mask_p, other=0.0).to(tl.float32) * s.to(tl.float32)
                if k > 0:
                    tl.store(crow + (k - 1), s, mask=mask_p)
            xs = xin.to(conv_ptr.dtype.element_ty)
            acc += tl.load(w_ptr + ch * D_CONV + (D_CONV - 1), mask=mask_p, other=0.0).to(tl.float32) * xs.to(tl.float32)
            tl.store(crow + (D_CONV - 2), xs, mask=mask_p)
            acc += tl.load(cb_ptr + ch, mask=mask_p, other=0.0).to(tl.float32)
            x = acc * tl.sigmoid(acc)
            Bv = tl.load(zrow + 2 * DI + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            Cv = tl.load(zrow + 2 * DI + G * N + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        else:
            xrow = xbc_ptr + b * stride_xbc
            x = tl.load(xrow + ch, mask=mask_p, other=0.0)
            Bv = tl.load(xrow + DI + g * N + offs_n, mask=mask_n, other=0.0)
            Cv = tl.load(xrow + DI + G * N + g * N + offs_n, mask=mask_n, other=0.0)
        dt = tl.load(zrow + 2 * DI + 2 * G * N + h).to(tl.float32) + tl.load(dtb_ptr + h).to(tl.float32)
        dt = _softplus(dt)
        A = -tl.exp(tl.load(alog_ptr + h).to(tl.float32))
        dA = tl.exp(dt * A)
        sptr = ssm_ptr + b * stride_sb + h * stride_sh + offs_p[:, None] * stride_sp + offs_n[None, :]
        smask = mask_p[:, None] & mask_n[None, :]
        S = tl.load(sptr, mask=smask, other=0.0).to(tl.float32)
        S = S * dA + (dt * x)[:, None] * Bv[None, :]
        tl.store(sptr, S.to(ssm_ptr.dtype.element_ty), mask=smask)
        y = tl.sum(S * Cv[None, :], axis=1)
        if D_PER_CHANNEL:
            Dv = tl.load(d_ptr + ch, mask=mask_p, other=0.0).to(tl.float32)
        else:
            Dv = tl.load(d_ptr + h).to(tl.float32)
        y = y + x * Dv
        z = tl.load(zrow + ch, mask=mask_p, other=0.0).to(tl.float32)
        y = y * (z * tl.sigmoid(z))
        tl.store(y_ptr + b * stride_yb + ch, y, mask=mask_p)


def mamba_step(zxbcdt, conv_state, conv_w, conv_b, dt_bias, A_log, D, ssm_state, dims: MambaDims,
               *, out: torch.Tensor | None = None, impl: str | None = None) -> torch.Tensor:
    """One-token Mamba-2 update; returns g = y * silu(z) fp32 [B, d_inner]; states updated in place."""
    d = dims
    Bsz = zxbcdt.shape[0]
    if zxbcdt.shape[1] != d.d_in_proj:
        raise ValueError(f"mamba_step: zxbcdt width {zxbcdt.shape[1]} != d_in_proj {d.d_in_proj}")
    if tuple(conv_state.shape) != (Bsz, d.conv_dim, d.d_conv - 1):
        raise ValueError(f"mamba_step: conv_state {tuple(conv_state.shape)} != {(Bsz, d.conv_dim, d.d_conv - 1)}")
    if tuple(ssm_state.shape) != (Bsz, d.n_heads, d.headdim, d.d_state):
        raise ValueError(f"mamba_step: ssm_state {tuple(ssm_state.shape)} != "
                         f"{(Bsz, d.n_heads, d.headdim, d.d_state)}")
    if resolve("mamba_step", zxbcdt.device, impl) == "ref":
        g = mamba_step_ref(zxbcdt, conv_state, conv_w, conv_b, dt_bias, A_log, D, ssm_state, d)
        if out is not None:
            out.copy_(g)
            return out
        return g
    for name, t in (("zxbcdt", zxbcdt), ("conv_state", conv_state), ("ssm_state", ssm_state)):
        if not t.is_contiguous():
            raise ValueError(f"mamba_step: {name} must be contiguous (it is updated in place)")
    conv_w = conv_w.contiguous()
    if out is None:
        out = torch.empty(Bsz, d.d_inner, device=zxbcdt.device, dtype=torch.float32)
    xbc = out  # unused placeholder when the conv is fused
    if d.conv_bc:
        xbc = torch.empty(Bsz, d.conv_dim, device=zxbcdt.device, dtype=torch.float32)
        bc = 256
        _conv_step_kernel[(Bsz, triton.cdiv(d.conv_dim, bc))](
            zxbcdt, conv_state, conv_w, conv_b, xbc,
            d.conv_dim, d.d_inner, zxbcdt.stride(0), conv_state.stride(0), conv_state.stride(1), xbc.stride(0),
            D_CONV=d.d_conv, BLOCK_C=bc, num_warps=4)
    block_n = max(2, next_pow2(d.d_state))
    block_p = max(2, min(next_pow2(d.headdim), 2048 // block_n))
    grid = (Bsz, d.n_heads, triton.cdiv(d.headdim, block_p))
    _mamba_step_kernel[grid](
        zxbcdt, xbc, conv_state, conv_w, conv_b, dt_bias, A_log, D, ssm_state, out,
        d.d_inner, d.n_heads, d.headdim, d.d_state, d.ngroups, d.n_heads // d.ngroups,
        zxbcdt.stride(0), xbc.stride(0), conv_state.stride(0), conv_state.stride(1),
        ssm_state.stride(0), ssm_state.stride(1), ssm_state.stride(2), out.stride(0),
        FUSE_CONV=not d.conv_bc, D_PER_CHANNEL=d.d_per_channel, D_CONV=d.d_conv,
        BLOCK_P=block_p, BLOCK_N=block_n, num_warps=4)
    return out
