"""Fused head log-probs for the learner: log p(target) (and entropy) of `x @ w^T` without autograd on [n, V].

`head_logprobs(x, w, tg)` = `log_softmax(x.float() @ w.float().T).gather(tg)`, computed over row chunks of
about 512 MB of fp32 logits each. Forward keeps only the log-sum-exp per row; backward recomputes each
chunk's logits into one buffer and turns it in place into `grad_logits = g * (onehot(tg) - softmax)`, then
`grad_x = grad_logits @ w` and `grad_w += grad_logits^T @ x` (one fp32 accumulator, cast to w's dtype once).
This replaces per-chunk checkpoint + log_softmax + gather (whose backward scatters into a zero [n, V]).
The entropy -sum p log p is computed in forward but not differentiable (only ever logged).
Math in fp32 whatever x's / w's dtype (fp64 if either is fp64: gradcheck).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

CHUNK_BYTES = 2 ** 29          # one [chunk, V] fp32 buffer of about 512 MB


def head_chunk(vocab: int) -> int:
    """Rows per chunk so that one [chunk, vocab] fp32 buffer is about 512 MB: clamp(2^27 // V, 256, 8192)."""
    return max(256, min(8192, CHUNK_BYTES // 4 // vocab))


def _cdt(x: Tensor, w: Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (x.dtype, w.dtype) else torch.float32


class HeadLogprob(torch.autograd.Function):
    """(x [n, D], w [V, D], tg [n] int64, chunk, want_entropy) -> (lp [n], ent [n] or [0]) in fp32."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, tg: Tensor, chunk: int, want_entropy: bool):
        cdt = _cdt(x, w)
        wc = w.to(cdt)
        n = x.shape[0]
        lp = torch.empty(n, dtype=cdt, device=x.device)
        lse = torch.empty(n, dtype=cdt, device=x.device)
        ent = torch.empty(n if want_entropy else 0, dtype=cdt, device=x.device)
        for s in range(0, n, chunk):
            e = s + chunk
            z = F.linear(x[s:e].to(cdt), wc)                         # [c, V] logits
            m = z.amax(-1, keepdim=True)
            zt = z.gather(-1, tg[s:e, None])
            z.sub_(m).exp_()                                         # exp(z - m)
            tot = z.sum(-1, keepdim=True)
            lse_s = tot.log()                                        # lse - m
            lp[s:e] = (zt - m - lse_s).squeeze(-1)
            lse[s:e] = (m + lse_s).squeeze(-1)
            if want_entropy:                                         # H = log S + sum(-e log e) / S, e = exp(z - m)
                ent[s:e] = (lse_s + torch.special.entr(z, out=z).sum(-1, keepdim=True) / tot).squeeze(-1)
        ctx.save_for_backward(x, w, tg, lse)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(ent)
        return lp, ent

    @staticmethod
    def backward(ctx, g_lp: Tensor, _g_ent: Tensor):
        x, w, tg, lse = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        if not (need_x or need_w):
            return None, None, None, None, None
        cdt = _cdt(x, w)
        wc = w.to(cdt)
        g = g_lp.to(cdt)
        gx = torch.empty_like(x) if need_x else None
        gw = torch.zeros(w.shape, dtype=cdt, device=w.device) if need_w else None
        for s in range(0, x.shape[0], ctx.chunk):
            e = s + ctx.chunk
            xc = x[s:e].to(cdt)
            gl = F.linear(xc, wc)                                    # recomputed logits [c, V]
            gl.sub_(lse[s:e, None]).exp_().mul_(-g[s:e, None])       # -g * softmax
            gl.scatter_add_(-1, tg[s:e, None], g[s:e, None])         # + g at the target
            if need_x:
                gx[s:e] = gl @ wc
            if need_w:
                gw.addmm_(gl.t(), xc)
        return gx, (gw.to(w.dtype) if need_w else None), None, None, None


def head_logprobs(x: Tensor, w: Tensor, tg: Tensor, chunk: int | None = None,
                  want_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """x [n, D] (any float dtype; the head's input after its norm / activation quantization), w [V, D]
    (effective head weight), tg [n] int -> (log p(tg) [n] fp32, entropy [n] fp32 detached, or None).
    `chunk` rows per fp32 [chunk, V] buffer (default `head_chunk(V)`)."""
    lp, ent = HeadLogprob.apply(x, w, tg.long(), chunk or head_chunk(w.shape[0]), want_entropy)
    return lp, (ent if want_entropy else None)
