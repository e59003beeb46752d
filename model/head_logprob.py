"""Fused head log-probs for the learner: log p(target) (and entropy) of `x @ w^T` without autograd on [n, V].

`head_logprobs(x, w, tg)` = `log_softmax(x.float() @ w.float().T).gather(tg)`, computed over row chunks of
about 512 MB of fp32 logits each. Forward keeps only the log-sum-exp per row; backward recomputes each
chunk's logits into one buffer and turns it in place into `grad_logits = g * (onehot(tg) - softmax)`, then
`grad_x = grad_logits @ w` and `grad_w += grad_logits^T @ x` (one fp32 accumulator, cast to w's dtype once).
This replaces per-chunk checkpoint + log_softmax + gather (whose backward scatters into a zero [n, V]).
The entropy -sum p log p is computed in forward but not differentiable (only ever logged).
Math in fp32 whatever x's / w's dtype (fp64 if either is fp64: gradcheck).
The element-wise tails over each [c, V] chunk are model/kernels_head.py: Triton on CUDA (one read of the
logits in forward, one read + write in backward), the torch twins on CPU and for fp64; `impl` (or env
BITMAMBA_HEAD) = "auto" | "torch" | "triton" forces one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from model.kernels_head import grad_logits_, grad_logits_ref_, row_stats, row_stats_ref_, use_triton

CHUNK_BYTES = 2 ** 29          # one [chunk, V] fp32 buffer of about 512 MB


def head_chunk(vocab: int) -> int:
    """Rows per chunk so that one [chunk, vocab] fp32 buffer is about 512 MB: clamp(2^27 // V, 256, 8192)."""
    return max(256, min(8192, CHUNK_BYTES // 4 // vocab))


def _cdt(x: Tensor, w: Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (x.dtype, w.dtype) else torch.float32


class HeadLogprob(torch.autograd.Function):
    """(x [n, D], w [V, D], tg [n] int64, chunk, want_entropy, impl) -> (lp [n], ent [n] or [0]) in fp32."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, tg: Tensor, chunk: int, want_entropy: bool, impl: str | None = None):
        cdt = _cdt(x, w)
        ctx.triton = use_triton(x.device, cdt, impl)
        stats = row_stats if ctx.triton else row_stats_ref_
        wc = w.to(cdt)
        n = x.shape[0]
        lp = torch.empty(n, dtype=cdt, device=x.device)
        lse = torch.empty(n, dtype=cdt, device=x.device)
        ent = torch.empty(n if want_entropy else 0, dtype=cdt, device=x.device)
        for s in range(0, n, chunk):
            e = s + chunk
            z = F.linear(x[s:e].to(cdt), wc)                         # [c, V] logits
            lp[s:e], lse[s:e], ent_c = stats(z, tg[s:e], want_entropy)
            if want_entropy:
                ent[s:e] = ent_c
        ctx.save_for_backward(x, w, tg, lse)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(ent)
        return lp, ent

    @staticmethod
    def backward(ctx, g_lp: Tensor, _g_ent: Tensor):
        x, w, tg, lse = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        if not (need_x or need_w):
            return None, None, None, None, None, None
        cdt = _cdt(x, w)
        wc = w.to(cdt)
        g = g_lp.to(cdt)
        gx = torch.empty_like(x) if need_x else None
        gw = torch.zeros(w.shape, dtype=cdt, device=w.device) if need_w else None
        grad = grad_logits_ if ctx.triton else grad_logits_ref_
        for s in range(0, x.shape[0], ctx.chunk):
            e = s + ctx.chunk
            xc = x[s:e].to(cdt)
            gl = grad(F.linear(xc, wc), lse[s:e], g[s:e], tg[s:e])   # g * (onehot(tg) - softmax) [c, V]
            if need_x:
                gx[s:e] = gl @ wc
            if need_w:
                gw.addmm_(gl.t(), xc)
        return gx, (gw.to(w.dtype) if need_w else None), None, None, None, None


def head_logprobs(x: Tensor, w: Tensor, tg: Tensor, chunk: int | None = None,
                  want_entropy: bool = False, impl: str | None = None) -> tuple[Tensor, Tensor | None]:
    """x [n, D] (any float dtype; the head's input after its norm / activation quantization), w [V, D]
    (effective head weight), tg [n] int -> (log p(tg) [n] fp32, entropy [n] fp32 detached, or None).
    `chunk` rows per fp32 [chunk, V] buffer (default `head_chunk(V)`); `impl` of the row kernels
    ("auto" | "torch" | "triton", default env BITMAMBA_HEAD or auto)."""
    lp, ent = HeadLogprob.apply(x, w, tg.long(), chunk or head_chunk(w.shape[0]), want_entropy, impl)
    return lp, (ent if want_entropy else None)
