"""BitMambaLM: embedding -> residual blocks (Mamba-2 or GQA attention) -> norm_f -> head.

Labels convention: `labels[b, t]` is the target of the logits at position t (no shift inside; build
labels as input_ids shifted left by one, with -100 where there is no target). Same for
`token_logprobs(input_ids, targets)`.

BitLinear numerics: in eval mode under no_grad every BitLinear computes the packed engine's exact
`(x_q @ codes^T) / (s_x * s)` in fp32; otherwise the STE path (same numbers up to fp rounding).

Loss: chunked cross-entropy over 1024-token chunks; with grad enabled each chunk's head + CE runs under
`torch.utils.checkpoint`, so the fp32 logits of one chunk at most are alive at a time.
Log-probs with grad (the learner): one fused autograd Function over ~512 MB chunks (model/head_logprob.py)
that saves only the log-sum-exp and recomputes the logits in backward; without grad the chunked path above.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from model import checkpoint as ckpt_io
from model.attention import Attention
from model.bitlinear import BitLinear, act_quant_ste
from model.config import BitMambaConfig, QuantConfig
from model.head_logprob import head_logprobs
from model.mamba2 import Mamba2Mixer
from model.norm import RMSNorm
from model.state import ModelState

CE_CHUNK = 1024


@dataclass
class LMOutput:
    logits: Tensor | None  # [B, T, V]
    loss: Tensor | None  # scalar: loss_sum / n_tokens
    loss_sum: Tensor | None  # scalar fp32
    n_tokens: Tensor | None  # scalar int64: valid target tokens


class Block(nn.Module):
    """x + mixer(norm(x)); norm only if config.block_prenorm (BitMamba-2: in_proj.norm is the prenorm)."""

    def __init__(self, config: BitMambaConfig, layer_idx: int):
        super().__init__()
        self.is_attention = layer_idx in config.attention_layer_indices
        self.norm = RMSNorm(config.d_model, config.norm_eps) if config.block_prenorm else None
        self.mixer = Attention(config, layer_idx) if self.is_attention else Mamba2Mixer(config, layer_idx)

    def _n(self, x: Tensor) -> Tensor:
        return x if self.norm is None else self.norm(x)

    def forward(self, x: Tensor, seq_idx: Tensor | None = None, state=None, pos: Tensor | None = None) -> Tensor:
        return x + self.mixer(self._n(x), seq_idx=seq_idx, state=state, pos=pos)

    def step(self, x: Tensor, state, pos: Tensor) -> Tensor:
        return x + self.mixer.step(self._n(x), state, pos)


class BitMambaLM(nn.Module):
    def __init__(self, config: BitMambaConfig):
        super().__init__()
        self.config = config
        c = config
        self.embedding = nn.Embedding(c.vocab_size, c.d_model)
        self.layers = nn.ModuleList([Block(c, i) for i in range(c.n_layers)])
        self.norm_f = RMSNorm(c.d_model, c.norm_eps)
        head_quant = c.quant if c.ternary_head else QuantConfig(ternary=False)
        self.lm_head = BitLinear(c.d_model, c.vocab_size, head_quant, norm=c.bitlinear_norm, norm_eps=c.norm_eps,
                                 name="lm_head")
        self.gradient_checkpointing = False
        self._init_weights()
        if c.tie_embeddings:
            self.lm_head.weight = self.embedding.weight

    @torch.no_grad()
    def _init_weights(self) -> None:
        """Embedding N(0, 0.02); BitLinears nn.Linear default; residual outputs (out_proj, o_proj)
        scaled by 1/sqrt(n_layers) (mamba-ssm's rescale_prenorm_residual); Mamba dt/A/D in the mixer."""
        nn.init.normal_(self.embedding.weight, std=0.02)
        for name, m in self.bitlinears():
            if name.endswith(("out_proj", "o_proj")):
                m.weight.div_(math.sqrt(self.config.n_layers))

    # ---- trunk ----
    def hidden_states(self, input_ids: Tensor, *, seq_idx: Tensor | None = None,
                      state: ModelState | None = None) -> Tensor:
        """input_ids [B, T] -> final-normed hidden states [B, T, d] (input of the head).
        With `state`, continues from it, updates it in place and advances state.pos by T."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        if seq_idx is not None and seq_idx.shape != input_ids.shape:
            raise ValueError(f"seq_idx shape {tuple(seq_idx.shape)} != input_ids shape {tuple(input_ids.shape)}")
        if state is not None and state.batch_size != input_ids.shape[0]:
            raise ValueError(f"state has {state.batch_size} rows, input_ids has {input_ids.shape[0]}")
        x = self.embedding(input_ids)
        use_gc = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and state is None
        for i, layer in enumerate(self.layers):
            if use_gc:
                x = checkpoint(layer, x, seq_idx, use_reentrant=False)
            elif state is None:
                x = layer(x, seq_idx)
            else:
                x = layer(x, seq_idx, state.layers[i], state.pos)
        if state is not None:
            state.pos += input_ids.shape[1]
        return self.norm_f(x)

    def _head_weight(self) -> Tensor | None:
        """Quantize the head weight once per call (STE graph kept when grad is on) whenever the head takes
        its STE path (training mode or grad enabled); None when it takes the exact eval path."""
        if self.lm_head.ternary and (self.lm_head.training or torch.is_grad_enabled()):
            return self.lm_head.effective_weight(torch.float32)     # the chunked head runs in fp32
        return None

    def forward(self, input_ids: Tensor, *, seq_idx: Tensor | None = None, labels: Tensor | None = None,
                loss_mask: Tensor | None = None, state: ModelState | None = None,
                return_logits: bool = True) -> LMOutput:
        """input_ids [B, T] (int64); seq_idx [B, T] int32; labels [B, T] (-100 ignored; target of position t);
        loss_mask [B, T] (0 = ignore). Returns LMOutput (logits [B, T, V] if return_logits)."""
        h = self.hidden_states(input_ids, seq_idx=seq_idx, state=state)
        logits = self.lm_head(h) if return_logits else None
        loss = loss_sum = n_tokens = None
        if labels is not None:
            loss_sum, n_tokens = self.chunked_ce(h, labels, loss_mask)
            loss = loss_sum / n_tokens.clamp(min=1)
        return LMOutput(logits=logits, loss=loss, loss_sum=loss_sum, n_tokens=n_tokens)

    def chunked_ce(self, h: Tensor, labels: Tensor, loss_mask: Tensor | None = None,
                   chunk: int = CE_CHUNK) -> tuple[Tensor, Tensor]:
        """Sum of token CE (fp32) and valid-token count over h [B, T, d] and labels [B, T]."""
        valid = labels != -100
        if loss_mask is not None:
            valid = valid & loss_mask.bool()
        hf = h.reshape(-1, h.shape[-1])
        lab = labels.reshape(-1).long().clamp(min=0)
        val = valid.reshape(-1)
        w = self._head_weight()
        use_ckpt = torch.is_grad_enabled()
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, hf.shape[0], chunk):
            args = (hf[s:s + chunk], w, lab[s:s + chunk], val[s:s + chunk])
            part = checkpoint(self._ce_chunk, *args, use_reentrant=False) if use_ckpt else self._ce_chunk(*args)
            total = total + part
        return total, val.sum()

    def _head_fp32(self, hc: Tensor, w: Tensor | None) -> Tensor:
        """fp32 logits of a chunk of hidden states: the head runs in fp32 whatever the trunk's dtype (bf16
        logits are off by ~0.03 at a logit of 10, which log-prob ratios and the rollout mismatch feel)."""
        return self.lm_head.forward_with_weight(hc.float(), w).float()

    def _ce_chunk(self, hc: Tensor, w: Tensor | None, lab: Tensor, val: Tensor) -> Tensor:
        logits = self._head_fp32(hc, w)
        ce = F.cross_entropy(logits, lab, reduction="none")
        return (ce * val).sum()

    def token_logprobs(self, input_ids: Tensor, targets: Tensor, *, seq_idx: Tensor | None = None,
                       chunk: int | None = None, return_entropy: bool = False, temperature: float = 1.0,
                       fused: bool | None = None):
        """log p_T(targets[b, t] | input_ids[b, :t+1]) fp32 [B, T] under `log_softmax(logits / temperature)`
        (and the entropy [B, T] fp32 of that distribution, never differentiable, if asked).

        `fused` picks the head: True -> the fused head (`head_logprobs`, chunk default ~512 MB of fp32 logits),
        also without grad; False -> chunked over `chunk` (default CE_CHUNK) tokens like the loss; None -> fused
        when grad is enabled and autocast is off. A learner computing "old" or reference log-probs passes
        fused=True in train mode so they come from the same numerical path as the loss's."""
        if temperature <= 0:
            raise ValueError(f"token_logprobs: temperature must be > 0, got {temperature}")
        h = self.hidden_states(input_ids, seq_idx=seq_idx)
        B, T = targets.shape
        hf = h.reshape(-1, h.shape[-1])
        tg = targets.reshape(-1).long()
        if fused is None:
            fused = torch.is_grad_enabled() and not torch.is_autocast_enabled(h.device.type)
        if fused:
            x, w = self._head_input(hf)
            if temperature != 1.0:
                x = x / temperature                      # (x / T) @ w^T = logits / T (the head has no bias)
            lp, ent = head_logprobs(x, w, tg, chunk, return_entropy)
            return (lp.reshape(B, T), ent.reshape(B, T)) if return_entropy else lp.reshape(B, T)
        chunk = chunk or CE_CHUNK
        w = self._head_weight()
        use_ckpt = torch.is_grad_enabled()
        lps, ents = [], []
        for s in range(0, hf.shape[0], chunk):
            args = (hf[s:s + chunk], w, tg[s:s + chunk])
            lp, ent = (checkpoint(self._lp_chunk, *args, return_entropy, temperature, use_reentrant=False)
                       if use_ckpt else self._lp_chunk(*args, return_entropy, temperature))
            lps.append(lp)
            ents.append(ent)
        logp = torch.cat(lps).reshape(B, T)
        if return_entropy:
            return logp, torch.cat(ents).reshape(B, T).detach()
        return logp

    def _head_input(self, hf: Tensor) -> tuple[Tensor, Tensor]:
        """The STE head's matmul operands for hf [n, d]: x [n, d] (fp32 after the head's own norm / int8
        activation STE, else hf as is: the fused head upcasts) and the effective weight [V, d]
        (`forward_with_weight` with grad enabled; BitLinear has no bias)."""
        head = self.lm_head
        x = hf.float() if head.norm is not None or head.act_quant else hf
        if head.norm is not None:
            x = head.norm(x)
        if head.act_quant:
            x = act_quant_ste(x)
        if not head.ternary:
            return x, head.weight
        w = self._head_weight()
        return x, (w if w is not None else head.effective_weight(torch.float32))   # eval mode: no STE graph needed

    def _lp_chunk(self, hc: Tensor, w: Tensor | None, tg: Tensor, want_entropy: bool, temperature: float = 1.0):
        logits = self._head_fp32(hc, w)
        logp_all = torch.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)
        lp = logp_all.gather(-1, tg[:, None]).squeeze(-1)
        ent = -(logp_all.exp() * logp_all).sum(-1) if want_entropy else lp.new_zeros(())
        return lp, ent

    # ---- recurrent inference ----
    def allocate_state(self, batch: int, max_len: int = 0, dtype: torch.dtype = torch.float32,
                       device=None, ssm_dtype: torch.dtype = torch.float32) -> ModelState:
        """Zero state for `batch` rows: Mamba conv in `dtype`, SSM in `ssm_dtype` (fp32), KV caches
        [B, max_len, ...] in `dtype` (max_len needed only with attention layers). The Mamba layers' conv
        and SSM tensors are views of two stacked buffers (`ModelState.mamba_stack`)."""
        device = device if device is not None else self.embedding.weight.device
        if self.config.attention_layer_indices and max_len <= 0:
            raise ValueError("allocate_state: this model has attention layers; give max_len > 0")
        layers = [None if isinstance(blk.mixer, Mamba2Mixer) else
                  blk.mixer.allocate_state(batch, max_len, dtype=dtype, device=device) for blk in self.layers]
        pos = torch.zeros(batch, dtype=torch.long, device=device)
        n_mamba = sum(layer is None for layer in layers)
        if n_mamba == 0:
            return ModelState(layers=layers, pos=pos)
        one = next(blk.mixer for blk in self.layers if isinstance(blk.mixer, Mamba2Mixer)).allocate_state(
            1, dtype=dtype, device="meta", ssm_dtype=ssm_dtype)
        conv = torch.zeros((n_mamba, batch) + tuple(one.conv.shape[1:]), dtype=dtype, device=device)
        ssm = torch.zeros((n_mamba, batch) + tuple(one.ssm.shape[1:]), dtype=ssm_dtype, device=device)
        return ModelState.stacked(layers, pos, conv, ssm)

    def step(self, input_ids: Tensor, state: ModelState) -> Tensor:
        """One token per row: input_ids [B] -> logits [B, V]; state updated in place, pos += 1."""
        x = self.embedding(input_ids)
        for layer, ls in zip(self.layers, state.layers):
            x = layer.step(x, ls, state.pos)
        state.pos += 1
        return self.lm_head(self.norm_f(x))

    # ---- inspection ----
    def bitlinears(self) -> Iterator[tuple[str, BitLinear]]:
        for name, m in self.named_modules():
            if isinstance(m, BitLinear):
                yield name, m

    def zero_ratios(self) -> dict[str, float]:
        """Share of zero ternary codes per ternary BitLinear."""
        return {name: m.zero_ratio() for name, m in self.bitlinears() if m.ternary}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- checkpoints ----
    def save_pretrained(self, directory) -> None:
        ckpt_io.save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory, device=None, dtype=None) -> "BitMambaLM":
        return ckpt_io.from_pretrained(cls, directory, device=device, dtype=dtype)
