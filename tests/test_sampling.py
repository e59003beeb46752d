"""Sampling functions on hand-computed cases (rollout/sampling.py)."""

import math

import pytest
import torch

from model.errors import ConfigError
from rollout.sampling import (SamplingTensors, apply_repetition_penalty, apply_temperature,
                              hash_exponential_noise, make_generator, min_p_filter, process_logits, sample, sample_seed, seen_mask, top_k_filter,
                              top_p_filter)
from rollout.types import SamplingParams

NEG = float("-inf")
PROBS = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
LOGP = PROBS.log()


def kept(x):
    return torch.isfinite(x).tolist()


def test_repetition_penalty_sign_semantics():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0]])
    seen = seen_mask([[0, 1, 0, 0]], 4)          # token 0 three times: penalized once
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, -3.0]]
    # per-row penalties; penalty 1 leaves the row untouched
    out = apply_repetition_penalty(torch.cat([logits, logits]), seen_mask([[0, 3], [0, 3]], 4),
                                   torch.tensor([1.0, 4.0]))
    assert out.tolist() == [[2.0, -1.0, 0.5, -3.0], [0.5, -1.0, 0.5, -12.0]]


def test_temperature_and_greedy_rows_untouched():
    x = torch.tensor([[2.0, -4.0], [2.0, -4.0]])
    assert apply_temperature(x, torch.tensor([2.0, 0.0])).tolist() == [[1.0, -2.0], [2.0, -4.0]]


def test_top_k_mask_per_row():
    x = torch.tensor([[1.0, 3.0, 2.0, 0.0], [1.0, 3.0, 2.0, 0.0], [1.0, 3.0, 2.0, 0.0]])
    out = top_k_filter(x, torch.tensor([2, 0, 1]))
    assert kept(out) == [[False, True, True, False], [True] * 4, [False, True, False, False]]
    assert out[0, 1] == 3.0 and out[0, 2] == 2.0


def test_top_p_nucleus_keeps_at_least_one():
    x = LOGP.repeat(4, 1)
    out = top_p_filter(x, torch.tensor([0.75, 0.85, 0.1, 1.0]))
    # mass before each token (most likely first): 0, 0.5, 0.8, 0.95 -> kept while < p
    assert kept(out) == [[True, True, False, False], [True, True, True, False],
                         [True, False, False, False], [True] * 4]
    # order independence: shuffled vocabulary gives the same set
    perm = torch.tensor([2, 0, 3, 1])
    out2 = top_p_filter(LOGP[:, perm], 0.75)
    assert kept(out2) == [[False, True, False, True]]


def test_min_p_relative_to_top():
    out = min_p_filter(LOGP.repeat(3, 1), torch.tensor([0.35, 0.2, 0.0]))
    # thresholds: 0.35*0.5 = 0.175 -> {0.5, 0.3}; 0.2*0.5 = 0.1 -> {0.5, 0.3, 0.15}; 0 -> all
    assert kept(out) == [[True, True, False, False], [True, True, True, False], [True] * 4]


def test_process_order_penalty_then_temperature_then_filters():
    p = SamplingParams(temperature=0.5, top_k=3, top_p=0.9, repetition_penalty=2.0)
    st = SamplingTensors.from_params([p])
    raw = torch.tensor([[4.0, 3.0, 1.0, 0.0, -1.0]])
    seen = seen_mask([[0]], 5)
    out = process_logits(raw, st, seen)
    # penalty: 4 -> 2; temperature 0.5: [4, 6, 2, 0, -2]; top-3 keeps 6, 4, 2
    step = torch.tensor([[4.0, 6.0, 2.0, NEG, NEG]])
    # top-p 0.9 on softmax([6, 4, 2]) = [.867, .117, .016]: mass before 0, .867, .984 -> drop the third
    step[0, 2] = NEG
    assert torch.equal(out, step)


def test_greedy_is_argmax_with_zero_logprob():
    raw = torch.tensor([[0.1, 2.0, 1.9], [3.0, 0.0, -1.0]])
    st = SamplingTensors.from_params([SamplingParams(temperature=0.0)] * 2)
    out = sample(raw, st, [None, None])
    assert out.tokens.tolist() == [1, 0]
    assert out.logprobs.tolist() == [0.0, 0.0]
    assert torch.allclose(out.model_logprobs, raw.log_softmax(-1)[[0, 1], [1, 0]])
    # greedy with a penalty: argmax of the penalized logits (2.0 seen -> 1.0 < 1.9)
    st = SamplingTensors.from_params([SamplingParams(temperature=0.0, repetition_penalty=2.0)])
    assert sample(raw[:1], st, [None], seen=seen_mask([[1]], 3)).tokens.tolist() == [2]


def test_logprobs_under_sampling_and_model_distribution():
    raw = torch.tensor([[1.0, 2.0, 0.5, -1.0, 3.0]])
    p = SamplingParams(temperature=2.0, top_k=3)
    st = SamplingTensors.from_params([p])
    g = make_generator(5, 0)
    for _ in range(20):
        out = sample(raw, st, [g])
        t = int(out.tokens[0])
        assert t in (0, 1, 4)
        samp = torch.tensor([1.0, 2.0, NEG, NEG, 3.0]) / 2.0
        assert math.isclose(float(out.logprobs[0]), float(samp.log_softmax(-1)[t]), abs_tol=1e-6)
        assert math.isclose(float(out.model_logprobs[0]), float(raw[0].log_softmax(-1)[t]), abs_tol=1e-6)


def test_draws_follow_the_filtered_distribution():
    n = 6000
    raw = LOGP.repeat(n, 1)
    st = SamplingTensors.from_params([SamplingParams(top_p=0.85)] * n)
    g = make_generator(0, 0)
    counts = torch.bincount(sample(raw, st, [g] * n).tokens, minlength=4).float() / n
    expect = torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95
    assert counts[3] == 0
    assert torch.allclose(counts, expect, atol=0.025), counts


def test_seed_replay_and_row_independence():
    raw = torch.randn(3, 50)
    st = SamplingTensors.from_params([SamplingParams(temperature=1.0)] * 3)

    def run(seeds):
        gens = [make_generator(s, i) for s, i in seeds]
        return [sample(raw, st, gens).tokens.tolist() for _ in range(10)]

    a = run([(1, 0), (1, 1), (2, 0)])
    assert a == run([(1, 0), (1, 1), (2, 0)])                      # exact replay
    assert a != run([(3, 0), (3, 1), (4, 0)])                      # other seeds, other draws
    # a row's draws do not depend on the other rows of the batch
    solo = [[t[0]] for t in (sample(raw[:1], SamplingTensors.from_params([SamplingParams()]),
                                    [g]).tokens.tolist() for g in [make_generator(1, 0)] * 10)]
    assert [[r[0]] for r in a] == solo
    assert len({sample_seed(7, i) for i in range(100)} | {sample_seed(8, i) for i in range(100)}) == 200


def test_mixed_rows_greedy_and_sampled():
    raw = torch.tensor([[0.0, 5.0, 0.0], [0.0, 5.0, 0.0]])
    st = SamplingTensors.from_params([SamplingParams(temperature=0.0), SamplingParams(temperature=1.0)])
    out = sample(raw, st, [make_generator(0, 0), None])   # row 1 has no generator -> greedy too
    assert out.tokens.tolist() == [1, 1] and out.logprobs.tolist() == [0.0, 0.0]


def test_params_validation_names_the_field():
    with pytest.raises(ConfigError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ConfigError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ConfigError, match="stop_sequences"):
        SamplingParams(stop_sequences=[[]])


def _splitmix_ref(key, counter, v):
    m = (1 << 64) - 1
    x = (key * 0x9E3779B97F4A7C15 + counter * 0xD1B54A32D192ED03 + v * 0xC2B2AE3D27D4EB4F) & m
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & m
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & m
    x ^= x >> 31
    return -math.log(((x >> 40) + 0.5) / (1 << 24))


def test_hash_noise_matches_unsigned_reference_and_is_exponential():
    keys = torch.tensor([sample_seed(1, 0), sample_seed(2, 5)])
    counters = torch.tensor([0, 17])
    E = hash_exponential_noise(keys, counters, 9)
    ref = torch.tensor([[_splitmix_ref(int(k), int(c), v) for v in range(9)] for k, c in zip(keys, counters)])
    assert torch.allclose(E, ref, atol=1e-5)
    big = hash_exponential_noise(torch.tensor([sample_seed(3, i) for i in range(100)]), torch.arange(100), 4000)
    assert abs(big.mean().item() - 1) < 0.01 and abs(big.var().item() - 1) < 0.03
    assert abs((big > 3).float().mean().item() - math.exp(-3)) < 0.003
    # drawn tokens follow the filtered distribution
    n = 6000
    st = SamplingTensors.from_params([SamplingParams(top_p=0.85)] * n)
    noise = hash_exponential_noise(torch.full((n,), 12345), torch.arange(n), 4)
    counts = torch.bincount(sample(LOGP.repeat(n, 1), st, [make_generator(0, 0)] * n, noise=noise).tokens,
                            minlength=4).float() / n
    assert counts[3] == 0 and torch.allclose(counts, torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95, atol=0.025)
