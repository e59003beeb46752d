"""Hash-noise sampling fused into one read of the logits (the engine's common RL case).

    tok, lp, mlp = sample_hash_fused(logits, temperature, greedy, keys, counters)
    ref          = sample_hash_fused_ref(logits, temperature, greedy, keys, counters)

logits [B, V] fp32 or bf16 (raw), temperature [B] fp32, greedy [B] bool, keys / counters [B] int64
-> tokens [B] int64, logprobs [B] fp32, model_logprobs [B] fp32. Temperature only (no penalty, no
top-k/p, min-p; `rollout.sampling.sample` checks that). Per row, with x = raw * (1 / T) (x = raw for
greedy rows and rows with T == 0):

    token   = argmax_v (x_v - log E_v),  E_v = -log u_v,  u = hash_uniform(keys, counters, V)
              (the Gumbel-max form of argmax(softmax(x) / E): the same distribution); greedy: argmax raw
    logprob = x[token] - logsumexp(x)    (0.0 for greedy rows)
    model_logprob = raw[token] - logsumexp(raw)

Ties go to the smallest index (torch.argmax). The Triton kernel generates the hash uniforms in
registers (the integer hash of `_hash_uniform_kernel`, same constants) and keeps online max / sum-exp
/ argmax accumulators: grid (B, splits), each program one contiguous span of the row, then a small
per-row combine. About 8 bytes (fp32) of traffic per logit instead of ~25 [B, V] passes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rollout.kernels._dispatch import next_pow2, resolve
from rollout.kernels.hash_noise import C_COUNT, C_KEY, C_MIX1, C_MIX2, C_TOKEN, hash_uniform_ref

try:
    import triton
    import triton.language as tl

    from rollout.kernels.hash_noise import hash_uniform_tl
except ImportError:
    triton = None

BLOCK = 1024


def _prep(temperature: Tensor, greedy: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    """-> greedy [B] bool (also T == 0), inv_t [B] fp32 (1 / T, IEEE; 1 for greedy rows); as `_row_params`."""
    t = temperature.to(device=device, dtype=torch.float32)
    g = greedy.to(device=device, dtype=torch.bool) | (t == 0)
    return g, torch.where(g, torch.ones_like(t), 1.0 / torch.where(g, torch.ones_like(t), t))


def sample_hash_fused_ref(logits: Tensor, temperature: Tensor, greedy: Tensor, keys: Tensor,
                          counters: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Pure-torch reference (CPU path and test oracle); same math, same op order as the kernel."""
    g, inv_t = _prep(temperature, greedy, logits.device)
    raw = logits.float()
    x = raw * inv_t[:, None]
    gumbel = hash_uniform_ref(keys, counters, raw.shape[1]).log_().neg_().log_()   # log E
    score = torch.where(g[:, None], raw, x - gumbel)
    tok = score.argmax(-1)
    r_tok = raw.gather(-1, tok[:, None]).squeeze(-1)
    lp = torch.where(g, torch.zeros_like(r_tok), r_tok * inv_t - torch.logsumexp(x, -1))
    return tok, lp, r_tok - torch.logsumexp(raw, -1)


def _splits(B: int, V: int) -> int:
    """Programs per row: enough (B * splits ~ 1024) to fill the GPU at small B, each >= 4 blocks."""
    return max(1, min(-(-V // (4 * BLOCK)), -(-1024 // max(B, 1)), 64))


def sample_hash_fused(logits: Tensor, temperature: Tensor, greedy: Tensor, keys: Tensor, counters: Tensor,
                      impl: str | None = None, splits: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """logits [B, V] -> (tokens [B] int64, logprobs [B] fp32, model_logprobs [B] fp32); no host sync.

    Triton on CUDA (or in the interpreter), the reference on CPU; `splits` overrides the programs per row.
    """
    B, V = logits.shape
    if not (temperature.shape == greedy.shape == keys.shape == counters.shape == (B,)):
        raise ValueError(f"sample_hash_fused: temperature/greedy/keys/counters must be [{B}] for logits "
                         f"{tuple(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"sample_hash_fused: logits must be fp32/bf16/fp16, got {logits.dtype}")
    if resolve("sample_fused", logits.device, impl) == "ref":
        return sample_hash_fused_ref(logits, temperature, greedy, keys, counters)
    dev = logits.device
    tok = torch.empty(B, dtype=torch.int64, device=dev)
    lp = torch.empty(B, dtype=torch.float32, device=dev)
    mlp = torch.empty(B, dtype=torch.float32, device=dev)
    if B == 0:
        return tok, lp, mlp
    if V == 0:
        raise ValueError("sample_hash_fused: empty vocabulary")
    temperature = temperature.to(device=dev, dtype=torch.float32).contiguous()
    greedy = greedy.to(device=dev, dtype=torch.bool).contiguous()
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    S = min(splits or _splits(B, V), triton.cdiv(V, BLOCK))
    span = triton.cdiv(triton.cdiv(V, S), BLOCK) * BLOCK
    S = triton.cdiv(V, span)                      # every split non-empty
    part_f = torch.empty(6, B, S, dtype=torch.float32, device=dev)   # m_x, s_x, m_r, s_r, best score, raw@best
    part_i = torch.empty(B, S, dtype=torch.int64, device=dev)         # index of best
    _sample_partial_kernel[(B, S)](
        logits, logits.stride(0), temperature, greedy, keys.long().contiguous(), counters.long().contiguous(),
        part_f, part_i, V, span, S, B * S, C_KEY, C_COUNT, C_TOKEN, C_MIX1, C_MIX2, BLOCK=BLOCK,
        enable_fp_fusion=False)   # x = raw * inv_t, then x - log E: no FMA, the reference's rounding
    _sample_combine_kernel[(B,)](part_f, part_i, temperature, greedy, tok, lp, mlp, S, B * S, SP=next_pow2(S),
                                 enable_fp_fusion=False)
    return tok, lp, mlp


if triton is not None:

    @triton.jit
    def _row_params(temp_ptr, greedy_ptr, row):
        """(greedy, 1 / T) of one row, as `_prep`: greedy if flagged or T == 0; IEEE division."""
        t = tl.load(temp_ptr + row)
        is_greedy = (tl.load(greedy_ptr + row) != 0) | (t == 0.0)
        return is_greedy, tl.where(is_greedy, 1.0, tl.math.div_rn(1.0, tl.where(is_greedy, 1.0, t)))

    @triton.jit
    def _sample_partial_kernel(logits_ptr, stride_b, temp_ptr, greedy_ptr, keys_ptr, counters_ptr,
                               part_f_ptr, part_i_ptr, V, span, S, plane, c_key, c_count, c_token,
                               c_mix1, c_mix2, BLOCK: tl.constexpr):
        """One (row, split): online max / sum-exp of x and raw, and argmax of the score, per lane."""
        row = tl.program_id(0)
        sp = tl.program_id(1)
        is_greedy, inv_t = _row_params(temp_ptr, greedy_ptr, row)
        key = tl.load(keys_ptr + row)
        count = tl.load(counters_ptr + row)
        lane = tl.arange(0, BLOCK)
        m_x = tl.full([BLOCK], -1e30, tl.float32)
        s_x = tl.zeros([BLOCK], tl.float32)
        m_r = tl.full([BLOCK], -1e30, tl.float32)
        s_r = tl.zeros([BLOCK], tl.float32)
        best = tl.full([BLOCK], float("-inf"), tl.float32)
        best_raw = tl.zeros([BLOCK], tl.float32)
        best_i = tl.full([BLOCK], 2147483647, tl.int32)
        base = logits_ptr + row.to(tl.int64) * stride_b
        lo = sp * span
        for start in range(lo, tl.minimum(lo + span, V), BLOCK):
            v = start + lane
            ok = v < V
            raw = tl.load(base + v, mask=ok, other=float("-inf")).to(tl.float32)
            x = raw * inv_t
            u = hash_uniform_tl(key, count, v, c_key, c_count, c_token, c_mix1, c_mix2)
            score = tl.where(is_greedy, raw, x - tl.log(-tl.log(u)))
            score = tl.where(ok, score, float("-inf"))
            take = score > best                          # strict: a lane keeps its first (smallest) index
            best = tl.where(take, score, best)
            best_raw = tl.where(take, raw, best_raw)
            best_i = tl.where(take, v, best_i)
            nm_x = tl.maximum(m_x, x)
            s_x = s_x * tl.exp(m_x - nm_x) + tl.exp(x - nm_x)
            m_x = nm_x
            nm_r = tl.maximum(m_r, raw)
            s_r = s_r * tl.exp(m_r - nm_r) + tl.exp(raw - nm_r)
            m_r = nm_r
        # lanes -> one partial
        M_x = tl.max(m_x, 0)
        S_x = tl.sum(s_x * tl.exp(m_x - M_x), 0)
        M_r = tl.max(m_r, 0)
        S_r = tl.sum(s_r * tl.exp(m_r - M_r), 0)
        B_s = tl.max(best, 0)
        B_i = tl.min(tl.where(best == B_s, best_i, 2147483647), 0)
        B_r = tl.sum(tl.where(best_i == B_i, best_raw, 0.0), 0)
        o = row * S + sp
        tl.store(part_f_ptr + o, M_x)
        tl.store(part_f_ptr + plane + o, S_x)
        tl.store(part_f_ptr + 2 * plane + o, M_r)
        tl.store(part_f_ptr + 3 * plane + o, S_r)
        tl.store(part_f_ptr + 4 * plane + o, B_s)
        tl.store(part_f_ptr + 5 * plane + o, B_r)
        tl.store(part_i_ptr + o, B_i.to(tl.int64))

    @triton.jit
    def _sample_combine_kernel(part_f_ptr, part_i_ptr, temp_ptr, greedy_ptr, tok_ptr, lp_ptr, mlp_ptr,
                               S, plane, SP: tl.constexpr):
        """One row: merge its S partials (ties across splits -> the smaller index) into the outputs."""
        row = tl.program_id(0)
        j = tl.arange(0, SP)
        ok = j < S
        o = row * S + j
        m_x = tl.load(part_f_ptr + o, mask=ok, other=-1e30)
        s_x = tl.load(part_f_ptr + plane + o, mask=ok, other=0.0)
        m_r = tl.load(part_f_ptr + 2 * plane + o, mask=ok, other=-1e30)
        s_r = tl.load(part_f_ptr + 3 * plane + o, mask=ok, other=0.0)
        best = tl.load(part_f_ptr + 4 * plane + o, mask=ok, other=float("-inf"))
        best_raw = tl.load(part_f_ptr + 5 * plane + o, mask=ok, other=0.0)
        best_i = tl.load(part_i_ptr + o, mask=ok, other=2147483647)
        M_x = tl.max(m_x, 0)
        lse_x = M_x + tl.log(tl.sum(s_x * tl.exp(m_x - M_x), 0))
        M_r = tl.max(m_r, 0)
        lse_r = M_r + tl.log(tl.sum(s_r * tl.exp(m_r - M_r), 0))
        B_s = tl.max(best, 0)
        tok = tl.min(tl.where(ok & (best == B_s), best_i, 2147483647), 0)
        r_tok = tl.sum(tl.where(ok & (best_i == tok), best_raw, 0.0), 0)
        is_greedy, inv_t = _row_params(temp_ptr, greedy_ptr, row)
        tl.store(tok_ptr + row, tok)
        tl.store(lp_ptr + row, tl.where(is_greedy, 0.0, r_tok * inv_t - lse_x))
        tl.store(mlp_ptr + row, r_tok - lse_r)
