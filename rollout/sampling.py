"""Sampling: a handful of pure functions over a batch of logits rows, each row with its own settings.

    st = SamplingTensors.from_params([p0, p1, ...], device)      # per-row settings [B]
    gens = [make_generator(seed, sample_index, device), ...]       # per-row generators (None: greedy)
    out = sample(logits, st, gens, seen=seen)                      # no host sync
    out.tokens [B] int64, out.logprobs [B] fp32, out.model_logprobs [B] fp32

Transform order (each on the result of the previous; the row's `SamplingParams` says which are on):
repetition penalty (llama.cpp / the published BitMamba C++ engine: for every distinct token seen in
prompt + completion, logit / r if logit > 0 else logit * r), temperature, top-k, top-p (nucleus; the
top token is always kept), min-p (drop p < min_p * p_max). Temperature 0 -> argmax of the penalized
logits (top-k/p, min-p never remove the top token, so they do not change it).

Drawing: `argmax(probs / E)` with E ~ Exponential(1) drawn from the row's own `torch.Generator`
(exactly a draw from `probs`, no host sync, and a row's stream depends only on its own seed and step
count, not on which slot or batch it ran in). With hash noise given as `keys`/`counters` and only a
temperature (the common RL case), one fused kernel draws `argmax(x - log E)` instead (Gumbel-max: the
same distribution; `rollout.kernels.sample_fused`).

`logprobs` is log p(token) under the final sampling distribution (0.0 for greedy rows: argmax is
deterministic); `model_logprobs` is log_softmax(raw logits) at temperature 1 (the model itself).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from model.seeds import sample_seed
from rollout.types import SamplingParams

def make_generator(seed: int, sample_index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh generator for one sample; two calls with the same arguments give the same stream."""
    g = torch.Generator(device=device)
    g.manual_seed(sample_seed(seed, sample_index))
    return g


@dataclass
class SamplingTensors:
    """Per-row sampling settings on the logits' device. Rows of a batch may differ.

    temperature [B] fp32 (0 = greedy), top_k [B] int64 (0 = off), top_p [B] fp32 (1 = off),
    min_p [B] fp32 (0 = off), repetition_penalty [B] fp32 (1 = off). The `use_*` flags (host bools)
    skip transforms no row needs.
    """

    temperature: Tensor
    top_k: Tensor
    top_p: Tensor
    min_p: Tensor
    repetition_penalty: Tensor
    use_top_k: bool = True
    use_top_p: bool = True
    use_min_p: bool = True
    use_penalty: bool = True

    @classmethod
    def from_params(cls, params: Sequence[SamplingParams | None], device=None) -> SamplingTensors:
        """One row per entry; `None` rows (idle slots) are greedy with everything off."""
        p = [q if q is not None else SamplingParams(temperature=0.0) for q in params]

        def t(vals, dtype):
            return torch.tensor(vals, dtype=dtype, device=device)

        return cls(
            temperature=t([q.temperature for q in p], torch.float32),
            top_k=t([q.top_k for q in p], torch.int64),
            top_p=t([q.top_p for q in p], torch.float32),
            min_p=t([q.min_p for q in p], torch.float32),
            repetition_penalty=t([q.repetition_penalty for q in p], torch.float32),
            use_top_k=any(q.top_k > 0 for q in p),
            use_top_p=any(q.top_p < 1.0 for q in p),
            use_min_p=any(q.min_p > 0.0 for q in p),
            use_penalty=any(q.repetition_penalty != 1.0 for q in p),
        )


@dataclass
class SampleOutput:
    tokens: Tensor           # [B] int64
    logprobs: Tensor         # [B] fp32, under the sampling distribution (0 for greedy rows)
    model_logprobs: Tensor   # [B] fp32, under log_softmax(raw logits)


def _row(x: Tensor | float, logits: Tensor) -> Tensor:
    """A per-row setting as a [B, 1] tensor (a Python number broadcasts to every row)."""
    if not isinstance(x, Tensor):
        x = torch.tensor(float(x), device=logits.device)
    x = x.to(logits.device)
    return x.reshape(-1, 1) if x.dim() else x.reshape(1, 1)


def seen_mask(token_ids: Sequence[Sequence[int]] | Tensor, vocab_size: int, device=None) -> Tensor:
    """[B, V] bool: which tokens appear in each row's history (for the repetition penalty)."""
    if isinstance(token_ids, Tensor):
        rows = [token_ids] if token_ids.dim() == 1 else list(token_ids)
    else:
        rows = [torch.as_tensor(list(r), dtype=torch.int64) for r in token_ids]
    m = torch.zeros(len(rows), vocab_size, dtype=torch.bool, device=device)
    for i, r in enumerate(rows):
        if len(r):
            m[i, torch.as_tensor(r, dtype=torch.int64, device=device)] = True
    return m


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: Tensor | float) -> Tensor:
    """logits [B, V]; seen [B, V] bool; penalty [B] or scalar. Seen tokens: l / r if l > 0 else l * r.

    Each distinct token is penalized once, however often it appeared (the engine's semantics).
    """
    r = _row(penalty, logits).to(logits.dtype)
    penalized = torch.where(logits > 0, logits / r, logits * r)
    return torch.where(seen, penalized, logits)


def apply_temperature(logits: Tensor, temperature: Tensor | float) -> Tensor:
    """logits / T per row; rows with T == 0 (greedy) are left unchanged."""
    t = _row(temperature, logits).to(logits.dtype)
    return logits / torch.where(t > 0, t, torch.ones_like(t))


def top_k_filter(logits: Tensor, k: Tensor | int) -> Tensor:
    """Keep the k largest logits of each row (ties with the k-th kept too); k == 0: row untouched."""
    V = logits.shape[-1]
    k = _row(k, logits).long().clamp(0, V)
    sorted_vals = logits.sort(dim=-1, descending=True).values
    kth = sorted_vals.gather(-1, (k - 1).clamp(min=0))
    kth = torch.where(k > 0, kth, torch.full_like(kth, float("-inf")))
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: Tensor | float) -> Tensor:
    """Nucleus: keep tokens (most likely first) while the probability mass before them is < p.

    The top token is always kept; p >= 1 leaves the row untouched.
    """
    p = _row(p, logits).float()
    probs = logits.float().softmax(-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    remove_sorted = (mass_before >= p) & (p < 1.0)
    remove_sorted[..., 0] = False
    remove = torch.zeros_like(remove_sorted).scatter_(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def min_p_filter(logits: Tensor, min_p: Tensor | float) -> Tensor:
    """Drop tokens whose probability is below min_p * (probability of the top token); 0: untouched."""
    m = _row(min_p, logits).float()
    probs = logits.float().softmax(-1)
    top = probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < m * top, float("-inf"))


def process_logits(logits: Tensor, st: SamplingTensors, seen: Tensor | None = None) -> Tensor:
    """Raw logits [B, V] -> the logits of the sampling distribution (fp32), in the documented order."""
    x = logits.float()
    if st.use_penalty:
        if seen is None:
            raise ValueError("repetition_penalty != 1 needs the `seen` mask")
        x = apply_repetition_penalty(x, seen, st.repetition_penalty)
    x = apply_temperature(x, st.temperature)
    if st.use_top_k:
        x = top_k_filter(x, st.top_k)
    if st.use_top_p:
        x = top_p_filter(x, st.top_p)
    if st.use_min_p:
        x = min_p_filter(x, st.min_p)
    return x


def exponential_noise(generators: Sequence[torch.Generator | None], vocab_size: int,
                      device=None) -> Tensor:
    """[B, V] Exponential(1) draws, row i from generators[i] (rows with None get ones, unused)."""
    E = torch.ones(len(generators), vocab_size, device=device)
    for i, g in enumerate(generators):
        if g is not None:
            E[i].exponential_(generator=g)
    return E


def hash_exponential_noise(keys: Tensor, counters: Tensor, vocab_size: int) -> Tensor:
    """[B, V] Exponential(1) draws from a counter-based hash of (row key, row counter, token id).

    keys [B] int64 (e.g. `sample_seed(seed, i)`), counters [B] int64 (tokens drawn so far by that
    sample). One batched computation whatever B (the per-row generator loop costs one launch per row on
    GPU), still replayable per sample and independent of batching. splitmix64 finalizer over int64 with
    wrapping multiplies; 24-bit uniforms from `rollout.kernels.hash_noise.hash_uniform` (one Triton
    kernel on CUDA, bitwise equal to its torch reference used on CPU), then -log.
    """
    # imported here, not at module import: rollout.kernels defines its Triton kernels on first import,
    # and TRITON_INTERPRET (CPU tests of the kernels) must be set before that
    from rollout.kernels.hash_noise import hash_uniform

    return hash_uniform(keys, counters, vocab_size).log_().neg_()


def fused_eligible(st: SamplingTensors) -> bool:
    """Whether `sample(..., keys=, counters=)` takes the fused hash-noise kernel: temperature only."""
    return not (st.use_penalty or st.use_top_k or st.use_top_p or st.use_min_p)


@functools.lru_cache(maxsize=64)
def _no_generator_mask(pattern: tuple[bool, ...], device: torch.device) -> Tensor:
    """[B] bool on `device`, cached per pattern: no host-to-device copy per decode step."""
    return torch.tensor(pattern, dtype=torch.bool).to(device)


def sample(logits: Tensor, st: SamplingTensors, generators: Sequence[torch.Generator | None],
           seen: Tensor | None = None, noise: Tensor | None = None, keys: Tensor | None = None,
           counters: Tensor | None = None) -> SampleOutput:
    """Draw one token per row. logits [B, V] (raw model logits); generators[i] None -> greedy row.

    Rows with temperature 0 are greedy whatever their generator, rows without a generator are greedy
    whatever their temperature (logprob 0.0). `noise` [B, V] Exponential(1) draws (e.g.
    `hash_exponential_noise`) replaces the generators' draws (their None-ness still marks greedy rows).
    `keys`, `counters` [B] int64 (instead of `noise`): hash noise of those; when `fused_eligible(st)`
    one fused kernel (`rollout.kernels.sample_fused`: Gumbel-max form, the same distribution, not always
    the same token as `noise=hash_exponential_noise(keys, counters, V)`), else exactly that noise.
    No host synchronization.
    """
    if keys is not None or counters is not None:
        if keys is None or counters is None or noise is not None:
            raise ValueError("sample: give keys and counters together, and not with noise")
        if fused_eligible(st):
            from rollout.kernels.sample_fused import sample_hash_fused   # see hash_exponential_noise

            dev = logits.device
            if all(g is None for g in generators):
                greedy = torch.ones(logits.shape[0], dtype=torch.bool, device=dev)
            elif any(g is None for g in generators):
                greedy = _no_generator_mask(tuple(g is None for g in generators), dev)
            else:
                greedy = torch.zeros(logits.shape[0], dtype=torch.bool, device=dev)
            tok, lp, mlp = sample_hash_fused(logits, st.temperature, greedy, keys, counters)
            return SampleOutput(tokens=tok, logprobs=lp, model_logprobs=mlp)
        noise = hash_exponential_noise(keys, counters, logits.shape[-1])
    raw = logits.float()
    x = process_logits(raw, st, seen)
    logp = x.log_softmax(-1)
    greedy = st.temperature.to(x.device) == 0
    if all(g is None for g in generators):
        greedy = torch.ones_like(greedy)
        tokens = x.argmax(-1)
    else:
        if any(g is None for g in generators):
            greedy = greedy | _no_generator_mask(tuple(g is None for g in generators), x.device)
        E = noise if noise is not None else exponential_noise(generators, x.shape[-1], x.device)
        E = E.clamp_min(1e-30)
        drawn = (logp.exp() / E).argmax(-1)
        tokens = torch.where(greedy, x.argmax(-1), drawn)
    idx = tokens[:, None]
    lp = logp.gather(-1, idx).squeeze(-1)
    lp = torch.where(greedy, torch.zeros_like(lp), lp)
    mlp = raw.log_softmax(-1).gather(-1, idx).squeeze(-1)
    return SampleOutput(tokens=tokens, logprobs=lp, model_logprobs=mlp)
