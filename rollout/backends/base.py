"""The decode backend protocol and the helpers every backend shares (batched prefill, row copies,
row snapshots). The backends: `rollout.backends.torch_backend.TorchBackend` (pure torch, the reference)
and `rollout.backends.triton_backend.FastBackend` (packed 2-bit weights, Triton, CUDA graphs);
`rollout.backends.make_backend` picks one.

    backend = make_backend(model, kind="auto")     # "torch" | "fast" | "auto"
    backend.allocate(slots=16, max_len=1024)       # the slot state, allocated once
    logits1, st1 = backend.prefill(prompt_ids)     # [T] -> ([V] fp32, 1-row ModelState)
    lg, stP = backend.prefill_many(prompts)         # P prompts in few forwards -> ([P, V], P-row state)
    backend.load_rows(st1, rows)                   # copy it into slot rows (group sampling, refill)
    logits = backend.step(tokens)                  # [slots] -> [slots, V] fp32, state updated in place
    logits_r = backend.extend(rows, token_ids)     # continue some rows over [R, T] tokens (tool results)

The fast backend must give the torch backend's logits within fp rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from torch import Tensor

from model.errors import BitMambaError
from model.state import MambaState, ModelState

if TYPE_CHECKING:
    from model.lm import BitMambaLM

@runtime_checkable
class DecodeBackend(Protocol):
    model: "BitMambaLM"

    def allocate(self, slots: int, max_len: int) -> None: ...
    def prefill(self, prompt_ids: Tensor) -> tuple[Tensor, ModelState]: ...
    def prefill_many(self, prompts: Sequence[Sequence[int]]) -> tuple[Tensor, ModelState]: ...
    def load_rows(self, state1: ModelState, rows: Tensor) -> None: ...
    def extend(self, rows: Tensor, token_ids: Tensor) -> Tensor: ...
    def step(self, tokens: Tensor) -> Tensor: ...
    def refresh_weights(self) -> None: ...


@torch.no_grad()
def write_rows(dst: ModelState, rows: Tensor, src: ModelState) -> None:
    """dst rows <- src (a 1-row state broadcast to every row, or one src row per dst row), in place.

    Works across states of different storage dtype (e.g. a bf16 slot state fed from an fp32 prefill).
    """
    rows = torch.as_tensor(rows, dtype=torch.long, device=dst.pos.device)
    if src.batch_size not in (1, rows.numel()):
        raise ValueError(f"write_rows: source has {src.batch_size} rows, destination {rows.numel()}")
    if len(src.layers) != len(dst.layers):
        raise ValueError(f"write_rows: {len(src.layers)} source layers, {len(dst.layers)} destination")
    st_dst, st_src = dst.stacks(), src.stacks()
    stacked = st_dst is not None and st_src is not None
    for ls, ld in zip(src.layers, dst.layers):
        if type(ls) is not type(ld):
            raise ValueError(f"write_rows: layer kinds differ ({type(ls).__name__} vs {type(ld).__name__})")
        if stacked and isinstance(ld, MambaState):
            continue            # one write per stack below
        for f in fields(ld):
            t_dst, t_src = getattr(ld, f.name), getattr(ls, f.name)
            if t_src.shape[1:] != t_dst.shape[1:]:
                raise ValueError(f"write_rows: {type(ld).__name__}.{f.name} shapes {tuple(t_src.shape)} "
                                 f"vs {tuple(t_dst.shape)} (different max_len?)")
            t_dst[rows] = t_src.to(t_dst.dtype)
    if stacked:
        for t_dst, t_src in zip(st_dst, st_src):
            if t_src.shape[2:] != t_dst.shape[2:]:
                raise ValueError(f"write_rows: Mamba state shapes {tuple(t_src.shape[2:])} vs {tuple(t_dst.shape[2:])}")
            t_dst[:, rows] = t_src.to(t_dst.dtype)
    dst.pos[rows] = src.pos.to(dst.pos.device)


PREFILL_TOKENS = 8192   # padded prompt tokens per batched prefill forward (`prefill_many`)


@torch.no_grad()
def prefill_many(model: "BitMambaLM", prompts: Sequence[Sequence[int]], new_state: Callable[[int], ModelState],
                 max_len: int, token_budget: int = PREFILL_TOKENS) -> tuple[Tensor, ModelState]:
    """Prefill P prompts in a few parallel forwards: -> (fp32 logits after each prompt's last token [P, V],
    a P-row state), both in prompt order; row p equals `prefill(prompts[p])` up to fp rounding.

    A launch-bound prefill (a small model, prompts of tens of tokens) costs about the same for one prompt
    as for sixty, so distinct prompts go together:
    - pure Mamba models: prompts sorted by length, cut into batches of at most `token_budget` padded
      tokens, each batch left-padded to its longest prompt (rounded up to 16 when padding is needed
      anyway, so that few shapes recur). `seq_idx` makes the padding another document: the conv window
      and the scan restart at each prompt's first token, so a row's final state and last logits are its
      prompt's alone (the chunked scan sees the prompt at another offset: fp rounding only). Per-token
      activation quantization and norms never mix rows or positions.
    - models with attention layers: only prompts of equal length share a forward (every row's KV cache
      starts at position 0; no padding, exact).
    """
    dev = next(model.parameters()).device
    seqs = [torch.as_tensor(p, dtype=torch.long).reshape(-1) for p in prompts]
    lens = [int(x.numel()) for x in seqs]
    for n, L in enumerate(lens):
        if L == 0:
            raise BitMambaError(f"prefill_many: prompt {n} is empty")
        if L >= max_len:
            raise BitMambaError(f"prompt {n} of {L} tokens does not fit max_len {max_len}")
    P = len(seqs)
    out = new_state(P)
    logits = torch.empty(P, model.config.vocab_size, dtype=torch.float32, device=dev)
    exact = bool(model.config.attention_layer_indices)
    groups: list[list[int]] = []
    for i in sorted(range(P), key=lambda i: lens[i]):   # ascending: the last prompt of a group is its longest
        g = groups[-1] if groups else None
        if g is None or (lens[g[0]] != lens[i] if exact else (len(g) + 1) * lens[i] > token_budget):
            groups.append([i])
        else:
            g.append(i)
    for g in groups:
        T = lens[g[-1]]
        padded = lens[g[0]] != T
        Tp = -(-T // 16) * 16 if padded else T
        ids = torch.zeros(len(g), Tp, dtype=torch.long)
        seq = torch.zeros(len(g), Tp, dtype=torch.int32)
        for r, i in enumerate(g):
            ids[r, Tp - lens[i]:] = seqs[i]
            seq[r, Tp - lens[i]:] = 1
        st = new_state(len(g))
        h = model.hidden_states(ids.to(dev), seq_idx=seq.to(dev) if padded else None, state=st)
        st.pos.copy_(torch.tensor([lens[i] for i in g]))
        idx = torch.tensor(g, device=dev)
        logits[idx] = model.lm_head(h[:, -1]).float()
        write_rows(out, idx, st)
    return logits, out


class RowSnapshot:
    """The engine's rewind point for pausing samples: the recurrent part of every slot (Mamba conv and
    SSM states, positions) copied in place into preallocated buffers at each sync (`take`: one copy
    per tensor, no indexing, no allocation). Attention KV caches are not copied: a rewind re-feeds
    every position from the snapshot's on, which overwrites the entries written past it, and the
    entries below it never change while the slot keeps its sample.

    take(rows): re-snapshot only those slots (a sample resumed mid-window, at its new rewind point).
    restore(rows): those slots go back to the snapshot (KV left as is).
    rows(rows): a new 1-row-per-slot `ModelState` (snapshot recurrent state, the live KV rows) for a
      sample leaving its slot; take it before the slot is reused.
    """

    def __init__(self, live: ModelState):
        self.live = live
        self.stacks = live.stacks()      # stacked live state: a few launches per operation, not ~2 per layer
        if self.stacks is not None:
            self.sbuf = [torch.empty_like(t) for t in self.stacks]
        else:
            self.buf = [MambaState(torch.empty_like(layer.conv), torch.empty_like(layer.ssm))
                        if isinstance(layer, MambaState) else None for layer in live.layers]
        self.pos = torch.empty_like(live.pos)

    def take(self, rows: Tensor | None = None) -> None:
        """Snapshot every slot (one copy per tensor), or only `rows`."""
        if rows is not None:
            self._copy_rows(rows, to_snapshot=True)
            return
        if self.stacks is not None:
            for b, t in zip(self.sbuf, self.stacks):
                b.copy_(t)
        else:
            for b, layer in zip(self.buf, self.live.layers):
                if b is not None:
                    b.conv.copy_(layer.conv)
                    b.ssm.copy_(layer.ssm)
        self.pos.copy_(self.live.pos)

    def _copy_rows(self, rows: Tensor, to_snapshot: bool) -> None:
        """(snapshot buffer, live tensor, row dim) for each tensor: stacks keep layers first."""
        if self.stacks is not None:
            pairs = [(b, t, 1) for b, t in zip(self.sbuf, self.stacks)]
        else:
            pairs = [(x, y, 0) for b, layer in zip(self.buf, self.live.layers) if b is not None
                     for x, y in ((b.conv, layer.conv), (b.ssm, layer.ssm))]
        for b, t, dim in pairs + [(self.pos, self.live.pos, 0)]:
            dst, src = (b, t) if to_snapshot else (t, b)
            dst.index_copy_(dim, rows, src.index_select(dim, rows))

    def restore(self, rows: Tensor) -> None:
        self._copy_rows(rows, to_snapshot=False)

    def rows(self, rows: Tensor) -> ModelState:
        kv = [None if isinstance(layer, MambaState)
              else type(layer)(**{f.name: getattr(layer, f.name).index_select(0, rows) for f in fields(layer)})
              for layer in self.live.layers]
        if self.stacks is not None:
            return ModelState.stacked(kv, self.pos.index_select(0, rows),
                                      *(b.index_select(1, rows) for b in self.sbuf))
        layers = [MambaState(b.conv.index_select(0, rows), b.ssm.index_select(0, rows)) if b is not None else k
                  for b, k in zip(self.buf, kv)]
        return ModelState(layers=layers, pos=self.pos.index_select(0, rows))
