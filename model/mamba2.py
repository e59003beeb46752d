"""Mamba-2 mixer with ternary in/out projections (standard and BitMamba-2 layouts).

    u [B, T, d] -> in_proj -> [z | x | B | C | dt]  sizes [d_inner, d_inner, g*n, g*n, H]
    conv (depthwise, causal, kernel d_conv, bias) + SiLU over x,B,C (conv_bc) or x only
    SSD scan (model/ssd.py) with D ([H] or [d_inner]) and dt_bias + softplus
    gate: gated RMSNorm rmsnorm(y * silu(z)) (gated_norm) or y * silu(z)
    out_proj -> [B, T, d]
`forward(u, seq_idx, state)` continues from `state` (conv history + SSM state) and updates it in place;
`step(u [B, d], state)` is the one-token recurrence and matches `forward`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.bitlinear import BitLinear
from model.config import BitMambaConfig
from model.norm import GatedRMSNorm
from model.ssd import canonical_seq_idx, ssd_scan
from model.state import MambaState


def causal_conv(xs: Tensor, weight: Tensor, bias: Tensor, history: Tensor | None,
                seq_idx: Tensor | None) -> tuple[Tensor, Tensor]:
    """Depthwise causal conv1d (no activation).

    xs [B, T, C]; weight [C, 1, K]; bias [C]; history [B, C, K-1] (inputs before xs, oldest first) or None
    (zeros); seq_idx [B, T] or None: an output only sees inputs of its own document (the history counts
    as part of the document of xs[:, 0]). Returns (out [B, T, C], new_history [B, C, K-1]); with seq_idx,
    history columns from a document other than the last one are zeroed.
    """
    Bsz, T, Cdim = xs.shape
    K = weight.shape[-1]
    xt = xs.transpose(1, 2)
    if history is None:
        history = xt.new_zeros(Bsz, Cdim, K - 1)
    full = torch.cat([history.to(xt.dtype), xt], dim=-1)  # [B, C, T + K - 1]
    if seq_idx is None:
        out = F.conv1d(full, weight.to(full.dtype), bias.to(full.dtype), groups=Cdim)
        new_hist = full[..., -(K - 1):]
    else:
        seq_full = torch.cat([seq_idx[:, :1].expand(Bsz, K - 1), seq_idx], dim=1)  # [B, T + K - 1]
        w = weight.to(full.dtype)
        out = bias.to(full.dtype)[None, :, None].expand(Bsz, Cdim, T)
        for k in range(K):
            same = (seq_full[:, k:k + T] == seq_idx)[:, None, :]
            out = out + w[None, :, 0, k, None] * full[..., k:k + T] * same
        keep = (seq_full[:, -(K - 1):] == seq_idx[:, -1:])[:, None, :]
        new_hist = full[..., -(K - 1):] * keep
    return out.transpose(1, 2), new_hist


class Mamba2Mixer(nn.Module):
    def __init__(self, config: BitMambaConfig, layer_idx: int = 0):
        super().__init__()
        c = config
        self.config = c
        self.layer_idx = layer_idx
        self.d_inner, self.n_heads, self.headdim = c.d_inner, c.n_heads, c.headdim
        self.ngroups, self.d_state, self.d_conv = c.ngroups, c.d_state, c.d_conv
        self.conv_dim = c.conv_dim
        name = f"layers.{layer_idx}.mixer"
        self.in_proj = BitLinear(c.d_model, c.d_in_proj, c.quant, norm=c.bitlinear_norm, norm_eps=c.norm_eps,
                                 name=f"{name}.in_proj")
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, c.d_conv, groups=self.conv_dim, bias=True)
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.D = nn.Parameter(torch.ones(self.d_inner if c.d_per_channel else self.n_heads))
        self.norm = (GatedRMSNorm(self.d_inner, c.norm_eps, group_size=self.d_inner // self.ngroups)
                     if c.gated_norm else None)
        self.out_proj = BitLinear(self.d_inner, c.d_model, c.quant, norm=c.bitlinear_norm, norm_eps=c.norm_eps,
                                  name=f"{name}.out_proj")
        self.reset_mamba_parameters()

    @torch.no_grad()
    def reset_mamba_parameters(self) -> None:
        """mamba-ssm's init: dt log-uniform in [dt_min, dt_max] (floored), dt_bias = softplus^-1(dt),
        A uniform in A_init_range, A_log = log A, D = 1."""
        c = self.config
        dt = torch.exp(torch.rand(self.n_heads) * (math.log(c.dt_max) - math.log(c.dt_min)) + math.log(c.dt_min))
        dt = dt.clamp(min=c.dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_log.copy_(torch.log(torch.empty(self.n_heads).uniform_(*c.A_init_range)))
        self.D.fill_(1.0)

    def _split_conv_input(self, zxbcdt: Tensor):
        di, gn = self.d_inner, self.ngroups * self.d_state
        z, xBC, dt = torch.split(zxbcdt, [di, di + 2 * gn, self.n_heads], dim=-1)
        return z, xBC, dt

    def _conv_channels(self, xBC: Tensor) -> tuple[Tensor, Tensor | None]:
        """(conv input, passthrough B|C or None)."""
        if self.config.conv_bc:
            return xBC, None
        return xBC[..., : self.d_inner], xBC[..., self.d_inner:]

    def _D(self) -> Tensor:
        return self.D.view(self.n_heads, self.headdim) if self.config.d_per_channel else self.D

    def forward(self, u: Tensor, seq_idx: Tensor | None = None, state: MambaState | None = None,
                pos: Tensor | None = None) -> Tensor:
        """u [B, T, d] -> [B, T, d]. `state` (if given) is continued and updated in place."""
        Bsz, T, _ = u.shape
        if seq_idx is not None:
            seq_idx = canonical_seq_idx(seq_idx)
        z, xBC, dt = self._split_conv_input(self.in_proj(u))
        conv_in, passthrough = self._conv_channels(xBC)
        conv_out, new_hist = causal_conv(conv_in, self.conv1d.weight, self.conv1d.bias,
                                         None if state is None else state.conv, seq_idx)
        conv_out = F.silu(conv_out)
        gn = self.ngroups * self.d_state
        if passthrough is None:
            x, Bm, Cm = torch.split(conv_out, [self.d_inner, gn, gn], dim=-1)
        else:  # BitMamba-2: B, C skip the conv (views of in_proj's output, no copy)
            x = conv_out
            Bm, Cm = torch.split(passthrough, [gn, gn], dim=-1)
        A = -torch.exp(self.A_log.float())
        res = ssd_scan(
            x.reshape(Bsz, T, self.n_heads, self.headdim), dt, A,
            Bm.reshape(Bsz, T, self.ngroups, self.d_state), Cm.reshape(Bsz, T, self.ngroups, self.d_state),
            self.config.chunk_size, D=self._D(),
            z=None if self.norm is not None else z.reshape(Bsz, T, self.n_heads, self.headdim),
            dt_bias=self.dt_bias, initial_states=None if state is None else state.ssm,
            seq_idx=seq_idx, return_final_states=state is not None, dt_softplus=True)
        if state is not None:
            y, final = res
            with torch.no_grad():
                state.ssm.copy_(final)
                state.conv.copy_(new_hist)
        else:
            y = res
        y = y.reshape(Bsz, T, self.d_inner)
        if self.norm is not None:
            y = self.norm(y, z)
        return self.out_proj(y)

    def allocate_state(self, batch: int, max_len: int = 0, dtype: torch.dtype = torch.float32,
                       device=None, ssm_dtype: torch.dtype = torch.float32) -> MambaState:
        """Zero state: conv [B, conv_dim, d_conv-1] in `dtype`, ssm [B, H, P, N] in `ssm_dtype` (fp32)."""
        return MambaState(
            conv=torch.zeros(batch, self.conv_dim, self.d_conv - 1, dtype=dtype, device=device),
            ssm=torch.zeros(batch, self.n_heads, self.headdim, self.d_state, dtype=ssm_dtype, device=device))

    def step(self, u: Tensor, state: MambaState, pos: Tensor | None = None) -> Tensor:
        """One token: u [B, d] -> [B, d]; state updated in place (recurrence in fp32)."""
        Bsz = u.shape[0]
        z, xBC, dt = self._split_conv_input(self.in_proj(u))
        conv_in, passthrough = self._conv_channels(xBC)
        window = torch.cat([state.conv.to(conv_in.dtype), conv_in[:, :, None]], dim=-1)  # [B, C, K]
        conv_out = (window.float() * self.conv1d.weight[:, 0, :].float()).sum(-1) + self.conv1d.bias.float()
        with torch.no_grad():
            state.conv.copy_(window[..., 1:])
        conv_out = F.silu(conv_out)
        xBC = conv_out if passthrough is None else torch.cat([conv_out, passthrough.float()], dim=-1)
        gn = self.ngroups * self.d_state
        x, Bm, Cm = torch.split(xBC, [self.d_inner, gn, gn], dim=-1)
        H, P, N, rep = self.n_heads, self.headdim, self.d_state, self.n_heads // self.ngroups
        x = x.reshape(Bsz, H, P)
        Bm = Bm.reshape(Bsz, self.ngroups, N).repeat_interleave(rep, dim=1)  # [B, H, N]
        Cm = Cm.reshape(Bsz, self.ngroups, N).repeat_interleave(rep, dim=1)
        dtf = F.softplus(dt.float() + self.dt_bias.float())  # [B, H]
        dA = torch.exp(dtf * -torch.exp(self.A_log.float()))
        S = state.ssm.float() * dA[..., None, None] + (dtf[..., None] * x)[..., None] * Bm[:, :, None, :]
        with torch.no_grad():
            state.ssm.copy_(S)
        y = torch.einsum("bhpn,bhn->bhp", S, Cm)
        D = self._D().float()
        y = y + x * (D[:, None] if D.dim() == 1 else D)
        y = y.reshape(Bsz, self.d_inner)
        if self.norm is not None:
            y = self.norm(y.to(u.dtype), z)
        else:
            y = (y * F.silu(z.float())).to(u.dtype)
        return self.out_proj(y)
