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
    """layers: one state per block; pos [B] int64: tokens consumed so far per row (the next token's position).

    mamba_stack: (conv [Lm, B, ...], ssm [Lm, B, ...]) when the Mamba layers' tensors are views of two
    stacked buffers (`BitMambaLM.allocate_state` and `select` make them so): row operations (select,
    write_rows, snapshots) then cost one launch per buffer instead of one per layer. Reassigning a layer's
    tensor breaks the link; `stacks()` checks it and row operations fall back to per-layer work.
    """

    layers: list[MambaState | AttnState]
    pos: Tensor
    mamba_stack: tuple[Tensor, Tensor] | None = None

    @property
    def batch_size(self) -> int:
        return self.pos.shape[0]

    def mamba_layers(self) -> list[int]:
        return [i for i, layer in enumerate(self.layers) if isinstance(layer, MambaState)]

    def stacks(self) -> tuple[Tensor, Tensor] | None:
        """(conv, ssm) stacks when every Mamba layer's tensors are still their views, else None."""
        if self.mamba_stack is None:
            return None
        conv, ssm = self.mamba_stack
        idx = self.mamba_layers()
        if conv.shape[0] != len(idx):
            return None
        # addresses computed, not compared through views (conv[n] per layer cost ~0.25 ms per call: the
        # engine asks at every state copy)
        checks = [(t.data_ptr(), t.stride(0) * t.element_size(), t.shape[1:], t.stride()[1:], t.dtype)
                  for t in (conv, ssm)]
        for n, i in enumerate(idx):
            layer = self.layers[i]
            for x, (base, step, shape, stride, dtype) in zip((layer.conv, layer.ssm), checks):
                if (x.data_ptr() != base + n * step or x.shape != shape or x.stride() != stride
                        or x.dtype != dtype):
                    return None
        return conv, ssm

    @staticmethod
    def stacked(layers: list, pos: Tensor, conv: Tensor, ssm: Tensor) -> "ModelState":
        """A state whose Mamba layers (the None entries of `layers`, in order) are views of conv/ssm [Lm, B, ...]."""
        it = iter(range(conv.shape[0]))
        out = []
        for layer in layers:
            if layer is None:
                n = next(it)
                layer = MambaState(conv[n], ssm[n])
            out.append(layer)
        return ModelState(layers=out, pos=pos, mamba_stack=(conv, ssm))

    @torch.no_grad()
    def copy_rows_(self, src: Tensor, dst: Tensor) -> None:
        """Copy state rows src -> dst in place (same length index tensors; group sampling, slot refill)."""
        src = torch.as_tensor(src, device=self.pos.device, dtype=torch.long)
        dst = torch.as_tensor(dst, device=self.pos.device, dtype=torch.long)
        if src.shape != dst.shape:
            raise ValueError(f"copy_rows_: src {tuple(src.shape)} and dst {tuple(dst.shape)} differ in shape")
        st = self.stacks()
        for layer in self.layers:
            if st is None or not isinstance(layer, MambaState):
                for _, t in _tensors(layer):
                    t[dst] = t[src]
        for t in st or ():
            t[:, dst] = t[:, src]
        self.pos[dst] = self.pos[src]

    @torch.no_grad()
    def reset_rows_(self, rows: Tensor) -> None:
        """Zero the given rows (slot reuse); their position goes back to 0."""
        rows = torch.as_tensor(rows, device=self.pos.device, dtype=torch.long)
        st = self.stacks()
        for layer in self.layers:
            if st is None or not isinstance(layer, MambaState):
                for _, t in _tensors(layer):
                    t[rows] = 0
        for t in st or ():
            t.index_fill_(1, rows, 0)
        self.pos[rows] = 0

    def select(self, rows: Tensor) -> "ModelState":
        """A new state holding copies of the given rows, in that order (stacked if this one is)."""
        rows = torch.as_tensor(rows, device=self.pos.device, dtype=torch.long)
        st = self.stacks()
        if st is not None:
            layers = [None if isinstance(layer, MambaState)
                      else type(layer)(**{name: t.index_select(0, rows) for name, t in _tensors(layer)})
                      for layer in self.layers]
            return ModelState.stacked(layers, self.pos.index_select(0, rows),
                                      st[0].index_select(1, rows), st[1].index_select(1, rows))
        layers = [type(layer)(**{name: t.index_select(0, rows) for name, t in _tensors(layer)}) for layer in self.layers]
        return ModelState(layers=layers, pos=self.pos.index_select(0, rows))
