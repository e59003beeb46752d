"""FastBackend: the GPU decode path (packed 2-bit weights, Triton kernels, one CUDA graph per bucket).

    backend = FastBackend(model)              # packs every BitLinear once
    backend.allocate(slots=64, max_len=640)   # slot state for bucket 64 (+ graph capture on CUDA)
    logits1, st1 = backend.prefill(ids)       # the model's parallel forward (same as TorchBackend)
    backend.load_rows(st1, rows)
    logits = backend.step(tokens)             # [slots] -> [slots, V] fp32 (one graph replay on CUDA)
    backend.refresh_weights()                 # re-pack in place after the QAT weights changed

One decode step, per Mamba layer (launches on CUDA):
    rmsnorm_quant (pre-norm + int8) -> ternary_matmul (in_proj) -> mamba_step (1 or 2) ->
    rmsnorm_quant (gated / out_proj norm + int8) -> ternary_matmul (out_proj, + residual in the epilogue)
At batch <= 2 each norm+quant is fused into its GEMV (`norm_ternary_matmul`): 3-4 launches per layer.
Attention layers: ternary q/k/v/o through the same kernels, RoPE + KV-cache write + SDPA in torch over
the full cache with a position mask (static shapes, no host sync). Then norm_f and the head.

The slot state is allocated at the bucket size (1, 2, 4, ..., 256, then multiples of 256) >= slots;
rows past `slots` are scratch. On CUDA the whole step is captured once per (bucket, max_len) after a
warm-up on a side stream (which also runs Triton's autotuning), and `step` copies the tokens into the
graph's static input and replays. On CPU the same Python code runs eagerly with the reference kernels
(or Triton's interpreter when forced with impl="triton"), which is how the tests check it.

Logits equal the model's eval logits (TorchBackend) up to fp rounding: the kernels compute the
BitLinear eval formula exactly (int32 sums) and the Mamba recurrence in the model's op order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from model.attention import apply_rope, rope_cos_sin
from model.bitlinear import BitLinear
from model.errors import BitMambaError
from model.state import AttnState, MambaState, ModelState
from rollout.backends.base import prefill_many, write_rows
from rollout.kernels._dispatch import FastPathUnavailable
from rollout.kernels.act_quant import rmsnorm_quant
from rollout.kernels.mamba_step import MambaDims, mamba_step
from rollout.kernels.ternary_matmul import kernel_layout, norm_ternary_matmul, ternary_matmul

if TYPE_CHECKING:
    from model.lm import BitMambaLM

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def bucket_for(n: int) -> int:
    """Smallest bucket >= n (multiples of 256 past the table)."""
    for b in BUCKETS:
        if n <= b:
            return b
    return -(-n // 256) * 256


@dataclass
class _Norm:
    weight: Tensor
    eps: float
    groups: int = 1


@dataclass
class _Packed:
    """A BitLinear's packed weights on the device (refreshed in place, so graphs stay valid)."""

    codes: Tensor          # int32 [out, in_padded // 16], the kernel layout (ternary_matmul.kernel_layout)
    scale: Tensor          # fp32 [out, G] or [1, 1]
    group_size: int
    act_quant: bool
    own_norm: _Norm | None  # the BitLinear's own RMSNorm (bitlinear_norm layouts)
    src: BitLinear


@dataclass
class _Bucket:
    rows: int
    max_len: int
    state: ModelState
    tokens: Tensor                 # [rows] int64, the graph's static input
    logits: Tensor | None = None   # [rows, V] fp32, the graph's static output
    graph: "torch.cuda.CUDAGraph | None" = None


class FastBackend:
    """Decode backend over a `BitMambaLM` with ternary layers (see the module docstring).

    state_dtype: conv window and KV cache dtype (like TorchBackend); ssm_dtype: SSM state dtype (fp32
    default; bf16 halves the state traffic). use_graphs: None -> on CUDA. impl: force the kernels
    ("triton" | "ref"; None = dispatch by device, BITMAMBA_KERNELS env). fuse_norm: at M <= 2 run the
    RMSNorm + int8 quant inside the GEMV (one launch per BitLinear instead of two).
    """

    def __init__(self, model: "BitMambaLM", state_dtype: torch.dtype = torch.float32,
                 ssm_dtype: torch.dtype = torch.float32, use_graphs: bool | None = None,
                 impl: str | None = None, fuse_norm: bool = True):
        c = model.config
        if not c.quant.ternary:
            raise FastPathUnavailable("FastBackend: the model has no ternary layers (quant.ternary is false); "
                                      "use the torch backend")
        self.model = model
        self.config = c
        self.state_dtype = state_dtype
        self.ssm_dtype = ssm_dtype
        self.impl = impl
        self.fuse_norm = fuse_norm
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else use_graphs
        if self.use_graphs and self.device.type != "cuda":
            raise FastPathUnavailable("FastBackend: CUDA graphs need the model on a CUDA device")
        self.dims = MambaDims.from_config(c)
        self.packed: dict[str, _Packed] = {}
        self._buckets: dict[tuple[int, int], _Bucket] = {}
        self._cur: _Bucket | None = None
        self.slots = 0
        self.max_len = 0
        self.refresh_weights()
        log.info("FastBackend: %d packed BitLinears (%.1f MB), graphs=%s, impl=%s", len(self.packed),
                 sum(p.codes.numel() * 4 for p in self.packed.values()) / 2**20, self.use_graphs, impl or "auto")

    # ---- weights ----
    @property
    def device(self) -> torch.device:
        return self.model.embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embedding.weight.dtype

    @property
    def state(self) -> ModelState | None:
        return None if self._cur is None else self._cur.state

    @torch.no_grad()
    def refresh_weights(self) -> None:
        """Re-pack every ternary BitLinear into the existing device buffers (CUDA graphs stay valid).

        Norm weights, conv, dt_bias, A_log, D and the embedding are read from the model's parameters
        directly; in-place updates of those are seen by the graphs, replaced tensors need a new
        `allocate` (the graphs are dropped here if any parameter storage moved)."""
        for name, lin in self.model.bitlinears():
            if not lin.ternary:
                continue
            p = lin.pack(to_cpu=False)
            own = None if lin.norm is None else _Norm(lin.norm.weight, lin.norm.eps)
            words = kernel_layout(p.codes.to(self.device), lin.in_features, p.group_size)
            cur = self.packed.get(name)
            if cur is None or cur.codes.shape != words.shape or cur.scale.shape != p.scale.shape:
                self.packed[name] = _Packed(words, p.scale.to(self.device), p.group_size, p.act_quant, own, lin)
            else:
                cur.codes.copy_(words, non_blocking=True)
                cur.scale.copy_(p.scale, non_blocking=True)
                cur.own_norm = own
        ptrs = tuple(p.data_ptr() for p in self.model.parameters())
        if getattr(self, "_param_ptrs", None) not in (None, ptrs):
            log.info("FastBackend: model parameters were replaced; dropping captured graphs")
            self._buckets.clear()
            self._cur = None
        self._param_ptrs = ptrs

    # ---- the one-token step (plain Python: eager on CPU, captured on CUDA) ----
    def _linear(self, h: Tensor, name: str, pre: list[_Norm], out_dtype: torch.dtype,
                residual: Tensor | None = None) -> Tensor:
        """BitLinear `name` on h [M, in] after the norms `pre` (+ its own): all but the last norm run
        as separate normalizations, the last one fused with the int8 quant."""
        p = self.packed[name]
        norms = list(pre) + ([p.own_norm] if p.own_norm is not None else [])
        for n in norms[:-1]:
            h, _ = rmsnorm_quant(h, n.weight, n.eps, False, n.groups, impl=self.impl)
        last = norms[-1] if norms else None
        if self.fuse_norm and (last is None or last.groups == 1):
            return norm_ternary_matmul(h, None if last is None else last.weight, last.eps if last else 0.0,
                                       p.act_quant, p.codes, p.scale, p.group_size, out_dtype=out_dtype,
                                       residual=residual, out=residual, impl=self.impl)
        xq, sx = rmsnorm_quant(h, None if last is None else last.weight, last.eps if last else 0.0, p.act_quant,
                               last.groups if last else 1, impl=self.impl)
        return ternary_matmul(xq, sx, p.codes, p.scale, p.group_size, out_dtype=out_dtype, residual=residual,
                              out=residual, impl=self.impl)

    def _mamba(self, i: int, x: Tensor, st: MambaState, block_norm: list[_Norm]) -> Tensor:
        mixer = self.model.layers[i].mixer
        pre = f"layers.{i}.mixer"
        zx = self._linear(x, f"{pre}.in_proj", block_norm, self.dtype)
        g = mamba_step(zx, st.conv, mixer.conv1d.weight, mixer.conv1d.bias, mixer.dt_bias, mixer.A_log, mixer.D,
                       st.ssm, self.dims, impl=self.impl)
        gate = [] if mixer.norm is None else [_Norm(mixer.norm.weight, mixer.norm.eps, self.config.ngroups)]
        return self._linear(g, f"{pre}.out_proj", gate, self.dtype, residual=x)

    def _attention(self, i: int, x: Tensor, st: AttnState, pos: Tensor, block_norm: list[_Norm]) -> Tensor:
        mixer = self.model.layers[i].mixer
        pre = f"layers.{i}.mixer"
        Bsz = x.shape[0]
        H, Hkv, Dh = mixer.n_heads, mixer.n_kv, mixer.head_dim
        h = x
        if block_norm:  # shared by q, k, v
            h, _ = rmsnorm_quant(x, block_norm[0].weight, block_norm[0].eps, False, impl=self.impl)
            h = h.to(x.dtype)
        q = self._linear(h, f"{pre}.q_proj", [], x.dtype).view(Bsz, 1, H, Dh)
        k = self._linear(h, f"{pre}.k_proj", [], x.dtype).view(Bsz, 1, Hkv, Dh)
        v = self._linear(h, f"{pre}.v_proj", [], x.dtype).view(Bsz, 1, Hkv, Dh)
        L = st.k.shape[1]
        positions = pos[:, None]
        cos, sin = rope_cos_sin(positions, Dh, self.config.rope_theta)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rows = torch.arange(Bsz, device=x.device)
        wpos = positions[:, 0].clamp(max=L - 1)      # scratch rows may run past the cache; real ones never do
        st.k[rows, wpos] = k[:, 0].to(st.k.dtype)
        st.v[rows, wpos] = v[:, 0].to(st.v.dtype)
        mask = (torch.arange(L, device=x.device)[None, :] <= positions)[:, None, None, :]   # [B, 1, 1, L]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), st.k.transpose(1, 2).to(q.dtype), st.v.transpose(1, 2).to(q.dtype),
            attn_mask=mask, enable_gqa=Hkv != H)
        o = out.transpose(1, 2).reshape(Bsz, H * Dh)
        return self._linear(o, f"{pre}.o_proj", [], x.dtype, residual=x)

    def _decode(self, tokens: Tensor, state: ModelState) -> Tensor:
        """tokens [B] -> fp32 logits [B, V]; state advanced in place (pos += 1)."""
        m = self.model
        x = F.embedding(tokens, m.embedding.weight)
        for i, (layer, ls) in enumerate(zip(m.layers, state.layers)):
            bn = [] if layer.norm is None else [_Norm(layer.norm.weight, layer.norm.eps)]
            if isinstance(ls, MambaState):
                x = self._mamba(i, x, ls, bn)
            else:
                x = self._attention(i, x, ls, state.pos, bn)
        state.pos += 1
        nf = _Norm(m.norm_f.weight, m.norm_f.eps)
        if m.lm_head.ternary:
            return self._linear(x, "lm_head", [nf], torch.float32)
        h, _ = rmsnorm_quant(x, nf.weight, nf.eps, False, impl=self.impl)
        if m.lm_head.norm is not None:
            h, _ = rmsnorm_quant(h, m.lm_head.norm.weight, m.lm_head.norm.eps, False, impl=self.impl)
        return F.linear(h.to(m.lm_head.weight.dtype), m.lm_head.weight).float()

    # ---- DecodeBackend ----
    def _new_state(self, rows: int, max_len: int) -> ModelState:
        return self.model.allocate_state(rows, max_len, dtype=self.state_dtype, device=self.device,
                                         ssm_dtype=self.ssm_dtype)

    def _need(self) -> _Bucket:
        if self._cur is None:
            raise RuntimeError("FastBackend: call allocate(slots, max_len) first")
        return self._cur

    @torch.no_grad()
    def allocate(self, slots: int, max_len: int) -> None:
        """Slot state for `slots` rows (allocated at the bucket size) of up to `max_len` tokens; on CUDA
        the step graph of that bucket is captured here (once per (bucket, max_len))."""
        if slots < 1:
            raise ValueError(f"FastBackend.allocate: slots must be >= 1, got {slots}")
        rows = bucket_for(slots)
        key = (rows, max_len)
        b = self._buckets.get(key)
        if b is None:
            b = _Bucket(rows, max_len, self._new_state(rows, max_len),
                        torch.zeros(rows, dtype=torch.long, device=self.device))
            if self.use_graphs:
                self._capture(b)
            self._buckets[key] = b
        self._reset(b.state)
        self._cur, self.slots, self.max_len = b, slots, max_len

    @staticmethod
    def _reset(state: ModelState) -> None:
        for ls in state.layers:
            for f in fields(ls):
                getattr(ls, f.name).zero_()
        state.pos.zero_()

    def _capture(self, b: _Bucket) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):   # warm-up: Triton compiles and autotunes here, never inside capture
            for _ in range(3):
                self._decode(b.tokens, b.state)
        torch.cuda.current_stream().wait_stream(side)
        self._reset(b.state)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            b.logits = self._decode(b.tokens, b.state)
        b.graph = g
        torch.cuda.synchronize()
        log.info("FastBackend: captured the decode step for bucket %d (max_len %d)", b.rows, b.max_len)

    @torch.no_grad()
    def prefill(self, prompt_ids: Tensor) -> tuple[Tensor, ModelState]:
        """prompt_ids [T] -> (fp32 logits after the last prompt token [V], its 1-row state); the model's
        parallel forward (like TorchBackend)."""
        b = self._need()
        ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=self.device).reshape(1, -1)
        if ids.shape[1] >= b.max_len:
            raise BitMambaError(f"prompt of {ids.shape[1]} tokens does not fit max_len {b.max_len}")
        st = self.model.allocate_state(1, b.max_len, dtype=self.state_dtype, device=self.device)
        h = self.model.hidden_states(ids, state=st)
        return self.model.lm_head(h[:, -1])[0].float(), st

    @torch.no_grad()
    def prefill_many(self, prompts) -> tuple[Tensor, ModelState]:
        """Several prompts in few parallel forwards (`rollout.backends.base.prefill_many`): -> ([P, V], P-row state)."""
        b = self._need()
        return prefill_many(self.model, prompts,
                            lambda n: self.model.allocate_state(n, b.max_len, dtype=self.state_dtype,
                                                                device=self.device), b.max_len)

    @torch.no_grad()
    def load_rows(self, state1: ModelState, rows: Tensor) -> None:
        write_rows(self._need().state, rows, state1)

    @torch.no_grad()
    def extend(self, rows: Tensor, token_ids: Tensor) -> Tensor:
        """Continue rows [R] over token_ids [R, T] with the model's parallel forward; -> fp32 logits [R, V]."""
        state = self._need().state
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=self.device).reshape(rows.numel(), -1)
        sub = state.select(rows)
        for ls in sub.layers:   # the parallel scan runs its state in fp32
            if isinstance(ls, MambaState):
                ls.ssm = ls.ssm.float()
        out = self.model(ids, state=sub)
        write_rows(state, rows, sub)
        return out.logits[:, -1].float()

    @torch.no_grad()
    def step(self, tokens: Tensor) -> Tensor:
        """tokens [slots] -> fp32 logits [slots, V] (a fresh tensor); every slot advances one token."""
        b = self._need()
        tokens = torch.as_tensor(tokens, device=self.device)
        if tokens.shape != (self.slots,):
            raise ValueError(f"FastBackend.step: tokens must be [{self.slots}], got {tuple(tokens.shape)}")
        b.tokens[: self.slots].copy_(tokens)
        if b.graph is not None:
            b.graph.replay()
            return b.logits[: self.slots].clone()
        return self._decode(b.tokens, b.state)[: self.slots].float()

