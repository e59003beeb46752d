"""Grouped-query causal self-attention with RoPE, ternary q/k/v/o projections and a KV cache.

    x [B, T, d] -> q [B, T, H, Dh], k, v [B, T, H_kv, Dh] -> RoPE(q, k) -> SDPA (causal) -> o_proj
RoPE is the rotate-half (GPT-NeoX / Llama) form with base `rope_theta`. Positions restart at 0 at each
document boundary of `seq_idx`, so a packed row equals its documents run separately.
With `state` (AttnState) and `pos` [B], row b's tokens sit at positions pos[b] .. pos[b] + T - 1: their
k, v are written to the cache there and they attend to cache slots 0 .. their own position
(rows may be at different positions: continuous batching).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.bitlinear import BitLinear
from model.config import BitMambaConfig
from model.state import AttnState


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """positions [B, T] int -> cos, sin [B, T, 1, Dh] fp32."""
    inv = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    ang = positions.float()[..., None] * inv  # [B, T, Dh/2]
    ang = torch.cat([ang, ang], dim=-1)[:, :, None, :]
    return ang.cos(), ang.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, T, h, Dh] (any dtype) -> rotated, same dtype (computed in fp32)."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rot = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rot * sin).to(x.dtype)


def doc_positions(seq_idx: Tensor) -> Tensor:
    """[B, T] position of each token within its document (restarts where seq_idx changes)."""
    Bsz, T = seq_idx.shape
    idx = torch.arange(T, device=seq_idx.device).expand(Bsz, T)
    start = torch.zeros_like(seq_idx, dtype=torch.bool)
    start[:, 0] = True
    start[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    first = torch.cummax(torch.where(start, idx, torch.zeros_like(idx)), dim=1).values
    return idx - first


class Attention(nn.Module):
    def __init__(self, config: BitMambaConfig, layer_idx: int = 0):
        super().__init__()
        c = config
        self.config = c
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = c.attn_heads, c.attn_kv_heads, c.attn_head_dim
        name = f"layers.{layer_idx}.mixer"

        def lin(i, o, n):
            return BitLinear(i, o, c.quant, norm=c.bitlinear_norm, norm_eps=c.norm_eps, name=f"{name}.{n}")

        self.q_proj = lin(c.d_model, self.n_heads * self.head_dim, "q_proj")
        self.k_proj = lin(c.d_model, self.n_kv * self.head_dim, "k_proj")
        self.v_proj = lin(c.d_model, self.n_kv * self.head_dim, "v_proj")
        self.o_proj = lin(self.n_heads * self.head_dim, c.d_model, "o_proj")

    def _qkv(self, x: Tensor):
        Bsz, T, _ = x.shape
        q = self.q_proj(x).reshape(Bsz, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).reshape(Bsz, T, self.n_kv, self.head_dim)
        v = self.v_proj(x).reshape(Bsz, T, self.n_kv, self.head_dim)
        return q, k, v

    def forward(self, x: Tensor, seq_idx: Tensor | None = None, state: AttnState | None = None,
                pos: Tensor | None = None) -> Tensor:
        """x [B, T, d] -> [B, T, d]. With `state`, `pos` [B] is required and the KV cache is updated."""
        Bsz, T, _ = x.shape
        q, k, v = self._qkv(x)
        if state is None:
            positions = (doc_positions(seq_idx) if seq_idx is not None
                         else torch.arange(T, device=x.device).expand(Bsz, T))
            cos, sin = rope_cos_sin(positions, self.head_dim, self.config.rope_theta)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            if seq_idx is not None:
                return self.o_proj(self._packed_attention(q, k, v, seq_idx))
            mask, causal = None, True
            kk, vv = k, v
        else:
            if seq_idx is not None:
                raise ValueError("Attention: seq_idx together with a KV-cache state is not supported "
                                 "(pack documents only in stateless training forwards)")
            if pos is None:
                raise ValueError("Attention: a state needs pos [B] (tokens already in the cache per row)")
            max_len = state.k.shape[1]
            positions = pos.to(x.device).long()[:, None] + torch.arange(T, device=x.device)  # [B, T]
            end = int(positions.max()) + 1
            if end > max_len:
                raise ValueError(f"Attention: position {end - 1} exceeds the KV cache length {max_len}")
            cos, sin = rope_cos_sin(positions, self.head_dim, self.config.rope_theta)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            rows = torch.arange(Bsz, device=x.device)[:, None].expand(Bsz, T)
            with torch.no_grad():
                state.k[rows, positions] = k.detach().to(state.k.dtype)
                state.v[rows, positions] = v.detach().to(state.v.dtype)
            kk = state.k[:, :end].to(q.dtype)
            vv = state.v[:, :end].to(q.dtype)
            # cached slots come from earlier calls (no grad); this call's k, v keep their graph
            if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
                kk = kk.index_put((rows, positions), k)
                vv = vv.index_put((rows, positions), v)
            mask = (torch.arange(end, device=x.device)[None, None, :] <= positions[:, :, None])[:, None]
            causal = False
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), kk.transpose(1, 2).to(q.dtype), vv.transpose(1, 2).to(q.dtype),
            attn_mask=mask, is_causal=causal, enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(Bsz, T, self.n_heads * self.head_dim))

    def _packed_attention(self, q: Tensor, k: Tensor, v: Tensor, seq_idx: Tensor) -> Tensor:
        """Causal attention inside each document of each row (block-diagonal), one SDPA call per
        document so the fused (flash / memory-efficient) kernels apply and no [T, T] mask exists.
        q [B, T, H, Dh], k, v [B, T, H_kv, Dh] -> [B, T, H * Dh]."""
        Bsz, T = seq_idx.shape
        out = q.new_empty(Bsz, T, self.n_heads, self.head_dim)
        change = torch.ones(Bsz, T, dtype=torch.bool, device=seq_idx.device)
        change[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
        starts = [torch.nonzero(change[b]).flatten().tolist() + [T] for b in range(Bsz)]
        for b in range(Bsz):
            for s, e in zip(starts[b][:-1], starts[b][1:]):
                o = F.scaled_dot_product_attention(
                    q[b:b + 1, s:e].transpose(1, 2), k[b:b + 1, s:e].transpose(1, 2),
                    v[b:b + 1, s:e].transpose(1, 2), is_causal=True, enable_gqa=self.n_kv != self.n_heads)
                out[b, s:e] = o[0].transpose(0, 1)
        return out.reshape(Bsz, T, self.n_heads * self.head_dim)

    def allocate_state(self, batch: int, max_len: int, dtype: torch.dtype = torch.float32,
                       device=None) -> AttnState:
        """Zero KV cache: k, v [B, max_len, H_kv, Dh]."""
        if max_len <= 0:
            raise ValueError("Attention.allocate_state: max_len must be positive for a KV cache")
        shape = (batch, max_len, self.n_kv, self.head_dim)
        return AttnState(k=torch.zeros(shape, dtype=dtype, device=device),
                         v=torch.zeros(shape, dtype=dtype, device=device))

    def step(self, x: Tensor, state: AttnState, pos: Tensor) -> Tensor:
        """One token: x [B, d] -> [B, d]; writes the cache at pos (does not advance pos)."""
        return self.forward(x[:, None], state=state, pos=pos)[:, 0]
