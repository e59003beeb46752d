"""Naive reference generation: the full parallel forward over the whole sequence at every step.

Slow on purpose and obviously right: no state, no slots, no batching. It uses the same sampling
functions as the engine, so with the same generator it draws the same tokens; it is the engine's
test oracle (greedy and seeded sampling).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rollout.sampling import SamplingTensors, make_generator, sample, sample_seed, seen_mask
from rollout.types import SamplingParams


@dataclass
class NaiveResult:
    token_ids: list[int]
    logprobs: list[float]
    model_logprobs: list[float]
    finish_reason: str
    logits: list[torch.Tensor]   # [V] fp32 raw logits before each sampled token


@torch.no_grad()
def naive_generate(model, prompt_ids, params: SamplingParams, generator: torch.Generator | None = None,
                   sample_index: int = 0, tokenizer=None, noise: str = "generator") -> NaiveResult:
    """Generate one sample by re-running `model(ids)` on prompt + completion each step.

    generator: None -> the engine's per-sample generator `make_generator(params.seed, sample_index)`
    (greedy params draw nothing); noise="hash": the engine's hash noise (`sample(keys=, counters=)`) instead.
    Stops like the engine: EOS ("eos"), stop token / sequence / string
    ("stop"), max_new_tokens ("length"); the stopping token(s) are kept.
    """
    device = next(model.parameters()).device
    ids = [int(t) for t in prompt_ids]
    if generator is None and not params.greedy:
        generator = make_generator(params.seed, sample_index, device)
    st = SamplingTensors.from_params([params], device)
    V = model.config.vocab_size
    seen = seen_mask([ids], V, device) if params.repetition_penalty != 1.0 else None
    out_ids: list[int] = []
    lps: list[float] = []
    mlps: list[float] = []
    all_logits: list[torch.Tensor] = []
    reason = "length"
    while len(out_ids) < params.max_new_tokens:
        logits = model(torch.tensor([ids + out_ids], device=device)).logits[0, -1].float()
        all_logits.append(logits)
        hk = {}
        if noise == "hash":   # the engine's hash noise, through the same entry point (fused when eligible)
            hk = dict(keys=torch.tensor([sample_seed(params.seed, sample_index)], device=device),
                      counters=torch.tensor([len(out_ids)], device=device))
        out = sample(logits[None], st, [None if params.greedy else generator], seen=seen, **hk)
        t = int(out.tokens[0])
        out_ids.append(t)
        lps.append(float(out.logprobs[0]))
        mlps.append(float(out.model_logprobs[0]))
        if seen is not None:
            seen[0, t] = True
        if params.eos_token_id is not None and t == params.eos_token_id:
            reason = "eos"
            break
        if t in params.stop_token_ids or any(out_ids[-len(s):] == s for s in params.stop_sequences):
            reason = "stop"
            break
        if params.stop_strings and tokenizer is not None:
            text = tokenizer.decode(out_ids, skip_special_tokens=False)
            if any(s in text for s in params.stop_strings):
                reason = "stop"
                break
    return NaiveResult(out_ids, lps, mlps, reason, all_logits)
