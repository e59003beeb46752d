"""Recurrent state of the model: one dataclass per mixer kind, and the whole-model `ModelState`.

Allocation happens in each mixer's `allocate_state` (called by `BitMambaLM.allocate_state`); every
`step`/stateful `forward` updates these tensors in place. Row b of every tensor is sequence b.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor


def _tensors(obj) -> list[tuple[str, Tensor]]:
    return [(f.name, getattr(obj, f.name)) for f in fields(obj)]


@dataclass
class MambaState:
    conv: Tensor  # [B, conv_dim, d_conv - 1]  last conv inputs, oldest first
    ssm: Tensor  # [B, H, P, N]  fp32 by default


@dataclass
class AttnState:
    k: Tensor  # [B, max_len, H_kv, Dh]
    v: Tensor  # [B, max_len, H_kv, Dh]


@dataclass
class ModelState:
    layers: list[MambaState | AttnState]
    pos: Tensor  # [B] int64, tokens consumed so far per row (the next token's position)

    @property
    def batch_size(self) -> int:
        return self.pos.shape[0]

    @torch.no_grad()
    def copy_rows_(self, src: Tensor, dst: Tensor) -> None:
        """Copy state rows src -> dst in place (same length index tensors; group sampling, slot refill)."""
        src = torch.as_tensor(src, device=self.pos.device, dtype=torch.long)
        dst = torch.as_tensor(dst, device=self.pos.device, dtype=torch.long)
        if src.shape != dst.shape:
            raise ValueError(f"copy_rows_: src {tuple(src.shape)} and dst {tuple(dst.shape)} differ in shape")
        for layer in self.layers:
            for _, t in _tensors(layer):
                t[dst] = t[src]
        self.pos[dst] = self.pos[src]

    @torch.no_grad()
    def reset_rows_(self, rows: Tensor) -> None:
        """Zero the given rows (slot reuse); their position goes back to 0."""
        rows = torch.as_tensor(rows, device=self.pos.device, dtype=torch.long)
        for layer in self.layers:
            for _, t in _tensors(layer):
                t[rows] = 0
        self.pos[rows] = 0

    def select(self, rows: Tensor) -> "ModelState":
        """A new state holding copies of the given rows, in that order."""
        rows = torch.as_tensor(rows, device=self.pos.device, dtype=torch.long)
        layers = [type(layer)(**{name: t.index_select(0, rows) for name, t in _tensors(layer)}) for layer in self.layers]
        return ModelState(layers=layers, pos=self.pos.index_select(0, rows))
