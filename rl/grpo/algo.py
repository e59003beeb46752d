"""GRPO algorithm: advantages, the clipped policy loss, KL, truncated IS, DAPO extras.

Pure torch; imports neither Ray nor DeepSpeed, so every function here tests in milliseconds.

Layout convention: a rollout batch holds `num_groups * G` samples, the G completions of one prompt
contiguous (sample `g * G + j` is completion j of group g). Per-token tensors are `[B, T]` over the
completion tokens only, with `mask [B, T]` (1.0 = a real, trained token).

Three log-probabilities appear in the loss (the "decoupled PPO" formulation):
- `logp`          the learner's current policy (with grad),
- `old_logp`      the learner's policy before this rollout batch's first update (no grad; the
                  proximal policy the PPO ratio and its clip are taken against),
- `rollout_logp`  what the generation worker computed when it sampled (the behaviour policy; it
                  differs from `old_logp` by kernel numerics and, one-step-off-policy, by one update).
Truncated importance sampling weights each token by `min(exp(old_logp - rollout_logp), C)`.

`rollout_logp` is the log-prob under the distribution the worker actually sampled from (after its
temperature and any top-k / top-p / min-p / repetition-penalty filter), and `logp` / `old_logp` are the
learner's under `log_softmax(logits / T)`. With temperature-only sampling the two distributions are the
same policy (their gap is kernel numerics); with filters the TIS weight is the importance correction
pi_T / pi_sampled (docs/grpo.md).

Numerical guards (as veRL): log-ratios are clamped to +-20 before `exp`, the k3 KL to <= 10, and every
reduction selects valid tokens with `where`, so a masked position holding -inf or NaN changes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-sum-const"]
AdvantageMode = Literal["grpo", "drgrpo"]


# --------------------------------------------------------------------------------------------------
# Advantages


def rewards_tensor(rewards: Sequence[float | None]) -> tuple[Tensor, Tensor]:
    """`[r or None, ...]` -> (rewards [N] fp32 with 0 for None, valid [N] bool)."""
    valid = torch.tensor([r is not None and math.isfinite(r) for r in rewards], dtype=torch.bool)
    vals = torch.tensor([float(r) if v else 0.0 for r, v in zip(rewards, valid.tolist())],
                        dtype=torch.float32)
    return vals, valid


def group_advantages(rewards: Sequence[float | None] | Tensor, group_size: int,
                     mode: AdvantageMode = "grpo", eps: float = 1e-6,
                     valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Group-relative advantages.

    grpo:   A = (r - mean_group) / (std_group + eps)   (std with Bessel's correction, as TRL/veRL)
    drgrpo: A =  r - mean_group                         (Dr. GRPO: no std division)

    Samples whose reward is None (or NaN, or `valid` False) are excluded from the group statistics
    and get A = 0 and valid = False; a group with fewer than 2 valid samples gets A = 0 everywhere.
    Returns (advantages [N] fp32, valid [N] bool).
    """
    if isinstance(rewards, Tensor):
        r = rewards.detach().to(torch.float32).flatten()                     # [N]
        ok = torch.isfinite(r) if valid is None else (valid.bool() & torch.isfinite(r))
        r = torch.where(ok, r, torch.zeros_like(r))                          # [N]
    else:
        r, ok = rewards_tensor(rewards)                                      # [N], [N]
        if valid is not None:
            ok = ok & valid.bool()
    n = r.numel()
    if group_size <= 0 or n % group_size != 0:
        raise ValueError(f"{n} rewards do not split into groups of {group_size}")
    rg = r.view(-1, group_size)                                              # [Gn, G]
    mg = ok.view(-1, group_size).to(torch.float32)                           # [Gn, G]
    cnt = mg.sum(1, keepdim=True)                                            # [Gn, 1]
    mean = (rg * mg).sum(1, keepdim=True) / cnt.clamp(min=1)                 # [Gn, 1]
    var = (((rg - mean) ** 2) * mg).sum(1, keepdim=True) / (cnt - 1).clamp(min=1)  # [Gn, 1]
    adv = rg - mean                                                          # [Gn, G]
    if mode == "grpo":
        std = var.sqrt()                                                     # [Gn, 1]
        adv = torch.where(std > 0, adv / (std + eps), torch.zeros_like(adv))  # [Gn, G]
    elif mode != "drgrpo":
        raise ValueError(f"unknown advantage mode {mode!r} (grpo or drgrpo)")
    adv = torch.where((mg > 0) & (cnt >= 2), adv, torch.zeros_like(adv))     # [Gn, G]
    return adv.flatten(), ok                                                 # [N], [N]


def informative_groups(rewards: Sequence[float | None] | Tensor, group_size: int,
                       tol: float = 1e-9) -> Tensor:
    """Dynamic sampling (DAPO): True for groups whose valid rewards are not all equal.

    A group with fewer than 2 valid rewards carries no signal either. -> keep [num_groups] bool.
    """
    if isinstance(rewards, Tensor):
        r = rewards.detach().to(torch.float32).flatten()
        ok = torch.isfinite(r)
        r = torch.where(ok, r, torch.zeros_like(r))
    else:
        r, ok = rewards_tensor(rewards)
    rg = r.view(-1, group_size)                                              # [Gn, G]
    mg = ok.view(-1, group_size)                                             # [Gn, G]
    hi = torch.where(mg, rg, torch.full_like(rg, -math.inf)).amax(1)         # [Gn]
    lo = torch.where(mg, rg, torch.full_like(rg, math.inf)).amin(1)          # [Gn]
    return (mg.sum(1) >= 2) & ((hi - lo) > tol)                              # [Gn]


def overlong_penalty(lengths: Sequence[int] | Tensor, max_len: int, buffer: int,
                     factor: float = 1.0) -> Tensor:
    """DAPO soft overlong punishment, added to the reward.

    0 while L <= max_len - buffer; a linear ramp ((max_len - buffer) - L) / buffer down to -1 at
    L == max_len; -1 beyond. Scaled by `factor`. -> [N] fp32.
    """
    L = torch.as_tensor(lengths, dtype=torch.float32)                        # [N]
    if buffer <= 0:
        return torch.where(L > max_len, -factor * torch.ones_like(L), torch.zeros_like(L))
    start = max_len - buffer
    ramp = (start - L) / buffer                                              # [N]
    pen = torch.where(L <= start, torch.zeros_like(L), ramp)                 # [N]
    pen = torch.where(L > max_len, -torch.ones_like(L), pen)                 # [N]
    return factor * pen


def truncation_mask(finish_reasons: Sequence[str]) -> Tensor:
    """1.0 for completions that ended on their own, 0.0 for those cut at the length limit. [N]"""
    return torch.tensor([0.0 if f == "length" else 1.0 for f in finish_reasons])


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


# --------------------------------------------------------------------------------------------------
# KL and mismatch


LOG_RATIO_CLAMP = 20.0       # |log-ratio| bound before exp (veRL, OpenRLHF)
KL_CLAMP = 10.0              # upper bound of the per-token k3 KL (veRL)


def clamped_log_ratio(a: Tensor, b: Tensor) -> Tensor:
    """a - b clamped to [-20, 20] (NaN stays NaN; masked positions are dropped by `where` later)."""
    return (a - b).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 estimator of KL(pi || ref) per token: exp(r) - r - 1 with r = ref_logp - logp clamped to
    +-20, the result clamped to <= 10. [B, T]"""
    r = clamped_log_ratio(ref_logp, logp)                                    # [B, T]
    return (torch.exp(r) - r - 1.0).clamp(max=KL_CLAMP)                      # [B, T]


def _masked(x: Tensor, mask: Tensor) -> Tensor:
    """x * mask, with exact zeros where mask == 0 (even if x holds inf/NaN there)."""
    return torch.where(mask > 0, x * mask, torch.zeros_like(x))


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """sum(x * mask) / max(sum(mask), 1) -> scalar (positions with mask 0 are ignored, whatever x is)."""
    return _masked(x, mask).sum() / mask.sum().clamp(min=1.0)


def valid_rows(mask: Tensor) -> float:
    """Rows of a [B, T] mask with at least one valid token."""
    return float((mask.sum(-1) > 0).sum())


def rollout_mismatch(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor) -> dict[str, float]:
    """How far the learner's log-probs are from the rollout's on the sampled tokens.

    kl: k3 estimate of KL(rollout || learner) (samples come from the rollout policy);
    max_ratio / min_ratio: extremes of exp(old_logp - rollout_logp) over valid tokens;
    abs_diff: mean |old_logp - rollout_logp|.
    """
    with torch.no_grad():
        d = clamped_log_ratio(old_logp, rollout_logp).float()               # [B, T]
        kl = torch.exp(d) - d - 1.0                                          # [B, T]
        valid = mask > 0                                                     # [B, T]
        if not bool(valid.any()):
            return {"mismatch_kl": 0.0, "mismatch_max_ratio": 1.0, "mismatch_min_ratio": 1.0,
                    "mismatch_abs_diff": 0.0}
        ratio = torch.exp(d[valid])                                          # [n_valid]
        return {"mismatch_kl": float(masked_mean(kl, mask)),
                "mismatch_max_ratio": float(ratio.max()),
                "mismatch_min_ratio": float(ratio.min()),
                "mismatch_abs_diff": float(masked_mean(d.abs(), mask))}


# --------------------------------------------------------------------------------------------------
# Loss


@dataclass
class LossConfig:
    clip_low: float = 0.2                # ratio lower bound 1 - clip_low
    clip_high: float = 0.28              # ratio upper bound 1 + clip_high (DAPO clip-higher)
    aggregation: Aggregation = "token-mean"
    seq_sum_const: float = 1.0           # Dr. GRPO constant (typically max new tokens)
    kl_coef: float = 0.0                 # weight of k3 KL to the frozen reference; 0 = no reference
    tis_cap: float | None = 2.0          # truncated IS cap C; None = no correction
    clip_ratio_c: float | None = None    # dual-clip bound on negative-advantage tokens (veRL: 3.0); None = off


def aggregate(per_token: Tensor, mask: Tensor, mode: Aggregation, *,
              n_tokens: float | None = None, n_seqs: float | None = None,
              seq_sum_const: float = 1.0) -> Tensor:
    """Reduce a per-token loss [B, T] to a scalar.

    token-mean:          sum(l * m) / n_tokens                  (n_tokens: valid tokens of the minibatch)
    seq-mean-token-mean: sum_b (sum_t l*m / sum_t m) / n_seqs   (n_seqs: rows with a valid token, as veRL)
    seq-sum-const:       sum(l * m) / (n_seqs * const)          (Dr. GRPO)
    `n_tokens` / `n_seqs` default to this micro-batch's own; a learner accumulating over several
    micro-batches passes the minibatch totals so the accumulated gradient equals the full one.
    """
    masked = _masked(per_token, mask)                                        # [B, T]
    if mode == "token-mean":
        denom = float(mask.sum()) if n_tokens is None else n_tokens
        return masked.sum() / max(denom, 1.0)                                # []
    nseq = valid_rows(mask) if n_seqs is None else n_seqs
    if mode == "seq-mean-token-mean":
        per_seq = masked.sum(1) / mask.sum(1).clamp(min=1.0)                 # [B]
        return per_seq.sum() / max(nseq, 1.0)                                # []
    if mode == "seq-sum-const":
        return masked.sum() / (max(nseq, 1.0) * seq_sum_const)               # []
    raise ValueError(f"unknown aggregation {mode!r}")


def policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                cfg: LossConfig, *, rollout_logp: Tensor | None = None,
                ref_logp: Tensor | None = None, entropy: Tensor | None = None,
                n_tokens: float | None = None, n_seqs: float | None = None,
                ) -> tuple[Tensor, dict[str, float]]:
    """Clipped GRPO policy loss (+ optional k3 KL) with truncated IS against the rollout.

    logp, old_logp, rollout_logp, ref_logp, entropy, mask: [B, T]; advantages: [B] (or [B, T]).
    Returns (scalar loss to minimise, metrics). Metrics are means over valid tokens of this call:
    pg_loss, clip_frac_low, clip_frac_high, ratio_mean, kl (if ref), entropy (if given),
    tis_weight_mean, tis_clip_frac and mismatch_* (if rollout_logp given).
    """
    mask = mask.to(logp.dtype)                                               # [B, T]
    adv = advantages if advantages.dim() == 2 else advantages[:, None]      # [B, T] or [B, 1]
    adv = adv.to(logp.dtype)
    log_ratio = clamped_log_ratio(logp, old_logp.detach())                   # [B, T]
    ratio = torch.exp(log_ratio)                                             # [B, T]
    lo, hi = 1.0 - cfg.clip_low, 1.0 + cfg.clip_high
    pg1 = -adv * ratio                                                       # [B, T]
    pg2 = -adv * ratio.clamp(lo, hi)                                         # [B, T]
    per_tok = torch.maximum(pg1, pg2)                                        # [B, T]
    if cfg.clip_ratio_c is not None:
        # dual clip: a negative-advantage token's loss is bounded by -A * c (veRL's clip_ratio_c)
        per_tok = torch.where(adv < 0, torch.minimum(per_tok, -adv * cfg.clip_ratio_c), per_tok)  # [B, T]

    metrics: dict[str, float] = {}
    if rollout_logp is not None and cfg.tis_cap is not None:
        is_ratio = torch.exp(clamped_log_ratio(old_logp.detach(), rollout_logp))  # [B, T]
        w = is_ratio.clamp(max=cfg.tis_cap).detach()                         # [B, T]
        per_tok = per_tok * w                                                # [B, T]
        metrics["tis_weight_mean"] = float(masked_mean(w, mask))
        metrics["tis_clip_frac"] = float(masked_mean((is_ratio > cfg.tis_cap).to(mask.dtype), mask))
    pg = aggregate(per_tok, mask, cfg.aggregation, n_tokens=n_tokens, n_seqs=n_seqs,
                   seq_sum_const=cfg.seq_sum_const)                          # []
    loss = pg
    if cfg.kl_coef > 0.0:
        if ref_logp is None:
            raise ValueError("kl_coef > 0 needs ref_logp")
        kl = kl_k3(logp, ref_logp)                                           # [B, T]
        loss = loss + cfg.kl_coef * aggregate(kl, mask, cfg.aggregation, n_tokens=n_tokens,
                                              n_seqs=n_seqs, seq_sum_const=cfg.seq_sum_const)  # []
        metrics["kl"] = float(masked_mean(kl.detach(), mask))
    elif ref_logp is not None:
        metrics["kl"] = float(masked_mean(kl_k3(logp.detach(), ref_logp), mask))

    with torch.no_grad():
        a = adv.expand_as(ratio)                                             # [B, T]
        low = ((ratio < lo) & (a < 0)).to(mask.dtype)                        # [B, T]
        high = ((ratio > hi) & (a > 0)).to(mask.dtype)                       # [B, T]
        metrics["pg_loss"] = float(pg.detach())
        metrics["clip_frac_low"] = float(masked_mean(low, mask))
        metrics["clip_frac_high"] = float(masked_mean(high, mask))
        metrics["ratio_mean"] = float(masked_mean(ratio, mask))
        if entropy is not None:
            metrics["entropy"] = float(masked_mean(entropy.detach().float(), mask))
        if rollout_logp is not None:
            metrics.update(rollout_mismatch(old_logp, rollout_logp, mask))
    return loss, metrics
