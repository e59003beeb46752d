"""Fused hash-noise sampling (rollout/kernels/sample_fused.py): the Triton kernel in the interpreter vs its
torch reference, the reference's distribution, and `sample()`'s dispatch to it.

TRITON_INTERPRET=1 must be set before the kernels are defined: tests/conftest.py sets it (no CUDA) before any import.
"""



import pytest  # noqa: E402
import torch  # noqa: E402

import rollout.kernels.sample_fused as sf  # noqa: E402
from rollout.kernels import _dispatch  # noqa: E402
from rollout.sampling import (SamplingTensors, hash_exponential_noise, make_generator, sample,  # noqa: E402
                              sample_seed)
from rollout.types import SamplingParams  # noqa: E402

needs_interp = pytest.mark.skipif(not _dispatch.interpreting(),
                                  reason="rollout.kernels was imported before TRITON_INTERPRET=1 was set")
TEMPS = [0.7, 1.0, 0.0, 1.3, 1.0]
GREEDY = [False, False, False, False, True]        # row 2: T == 0, row 4: no generator


def _inputs(B: int, V: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, V, generator=g).to(dtype)     # scale 1: the noise decides
    temp = torch.tensor((TEMPS * B)[:B], dtype=torch.float32)
    greedy = torch.tensor((GREEDY * B)[:B])
    keys = torch.tensor([sample_seed(seed, i) for i in range(B)], dtype=torch.int64)
    keys[0] = -(1 << 62) + 12345
    counters = torch.arange(B, dtype=torch.int64) * 977 + 3
    return logits, temp, greedy, keys, counters


@needs_interp
@pytest.mark.parametrize("B,V,splits", [(5, 1000, None), (5, 2500, None), (3, 5000, 2), (4, 5000, 1), (1, 7, None)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_reference(B, V, splits, dtype):
    """Tokens bitwise, log-probs to 1e-5: V not a multiple of the block, one or several splits per row,
    mixed greedy / sampled rows, fp32 and bf16 logits."""
    args = _inputs(B, V, dtype, seed=B + V)
    tok, lp, mlp = sf.sample_hash_fused(*args, impl="triton", splits=splits)
    rtok, rlp, rmlp = sf.sample_hash_fused_ref(*args)
    assert tok.dtype == torch.int64 and lp.dtype == mlp.dtype == torch.float32
    assert torch.equal(tok, rtok)
    if V > 100:
        assert not torch.equal(tok, args[0].float().argmax(-1))          # some row really sampled
    torch.testing.assert_close(lp, rlp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mlp, rmlp, rtol=1e-5, atol=1e-5)


@needs_interp
def test_kernel_ties_go_to_the_smallest_index():
    """Equal maxima in different lanes and different splits: the first one, like torch.argmax."""
    V = 5000
    logits = torch.zeros(2, V)
    logits[:, [4100, 2524, 1500, 3000]] = 5.0         # 1500 and 2524: the same lane
    args = (logits, torch.zeros(2), torch.tensor([True, True]), torch.zeros(2, dtype=torch.int64),
            torch.zeros(2, dtype=torch.int64))
    for splits in (1, 2, 3):
        assert sf.sample_hash_fused(*args, impl="triton", splits=splits)[0].tolist() == [1500, 1500]


def test_reference_greedy_rows_and_logprobs():
    """Greedy rows (T == 0 or flagged): argmax of raw, logprob 0; model_logprobs = log_softmax(raw)[tok];
    sampled rows: logprobs = log_softmax(raw / T)[tok]."""
    logits, temp, greedy, keys, counters = _inputs(5, 1000, torch.float32)
    tok, lp, mlp = sf.sample_hash_fused_ref(logits, temp, greedy, keys, counters)
    g = greedy | (temp == 0)
    assert torch.equal(tok[g], logits[g].argmax(-1)) and torch.all(lp[g] == 0)
    torch.testing.assert_close(mlp, logits.log_softmax(-1).gather(-1, tok[:, None]).squeeze(-1))
    s = ~g
    want = (logits[s] / temp[s, None]).log_softmax(-1).gather(-1, tok[s, None]).squeeze(-1)
    torch.testing.assert_close(lp[s], want)
    # the Gumbel form: the token is argmax(softmax(x) / E) of the same hash noise (up to float near-ties)
    E = hash_exponential_noise(keys, counters, 1000)
    old = ((logits / temp.clamp_min(1e-9)[:, None]).softmax(-1) / E).argmax(-1)
    assert torch.equal(tok[s], old[s])


@pytest.mark.parametrize("T", [1.0, 0.6])
def test_reference_samples_from_softmax(T):
    n = 20000
    raw = torch.tensor([1.0, 0.3, -0.5, 2.0])
    tok, _, _ = sf.sample_hash_fused_ref(raw.repeat(n, 1), torch.full((n,), T), torch.zeros(n, dtype=torch.bool),
                                         torch.full((n,), sample_seed(7, 3)), torch.arange(n))
    freq = torch.bincount(tok, minlength=4).float() / n
    assert torch.allclose(freq, (raw / T).softmax(-1), atol=0.01)


def _st(B: int, **kw) -> SamplingTensors:
    return SamplingTensors.from_params([SamplingParams(temperature=t, **kw) for t in (TEMPS * B)[:B]])


def test_sample_dispatches_to_the_fused_path(monkeypatch):
    """Eligible (hash keys, temperature only): the fused kernel, with generator None-ness as greedy rows."""
    B, V = 5, 300
    logits, _, _, keys, counters = _inputs(B, V, torch.float32)
    gens = [make_generator(0, i) for i in range(B - 1)] + [None]
    calls = []
    real = sf.sample_hash_fused

    def spy(*a, **kw):
        calls.append(a)
        return real(*a, **kw)

    monkeypatch.setattr(sf, "sample_hash_fused", spy)
    out = sample(logits, _st(B), gens, keys=keys, counters=counters)
    assert len(calls) == 1 and calls[0][2].tolist() == [False] * (B - 1) + [True]
    ref = sf.sample_hash_fused_ref(logits, _st(B).temperature, calls[0][2], keys, counters)
    assert torch.equal(out.tokens, ref[0]) and torch.equal(out.logprobs, ref[1])
    sample(logits, _st(B), [None] * B, keys=keys, counters=counters)          # all greedy: fused too
    assert len(calls) == 2 and calls[1][2].all()


@pytest.mark.parametrize("kw", [dict(top_k=5), dict(top_p=0.9), dict(min_p=0.05), dict(repetition_penalty=1.2)])
def test_sample_not_eligible_uses_the_hash_noise_path(monkeypatch, kw):
    """Penalty / top-k / top-p / min-p with keys: exactly `noise=hash_exponential_noise(keys, counters, V)`."""
    B, V = 5, 300
    logits, _, _, keys, counters = _inputs(B, V, torch.float32)
    gens = [make_generator(0, i) for i in range(B)]
    seen = torch.zeros(B, V, dtype=torch.bool)
    seen[:, :50] = True
    monkeypatch.setattr(sf, "sample_hash_fused", lambda *a, **k: pytest.fail("fused path taken"))
    out = sample(logits, _st(B, **kw), gens, seen=seen, keys=keys, counters=counters)
    want = sample(logits, _st(B, **kw), gens, seen=seen, noise=hash_exponential_noise(keys, counters, V))
    assert torch.equal(out.tokens, want.tokens) and torch.equal(out.logprobs, want.logprobs)


def test_sample_generator_and_noise_paths_unchanged(monkeypatch):
    B, V = 5, 300
    logits, _, _, keys, counters = _inputs(B, V, torch.float32)
    monkeypatch.setattr(sf, "sample_hash_fused", lambda *a, **k: pytest.fail("fused path taken"))
    sample(logits, _st(B), [make_generator(0, i) for i in range(B)])
    sample(logits, _st(B), [make_generator(0, i) for i in range(B)], noise=hash_exponential_noise(keys, counters, V))
    with pytest.raises(ValueError):
        sample(logits, _st(B), [None] * B, keys=keys)


def test_engine_hash_temperature_only_matches_naive_and_replays(monkeypatch):
    """The engine's common RL case (hash noise, temperature only, greedy requests beside sampled ones):
    the same tokens as `naive_generate(noise="hash")` whatever the batching, through the fused path."""
    from model.config import BitMambaConfig
    from model.lm import BitMambaLM
    from rollout.backends import TorchBackend
    from rollout.engine import Engine
    from rollout.reference import naive_generate
    from rollout.types import GenRequest

    torch.manual_seed(0)
    model = BitMambaLM(BitMambaConfig.preset("tiny", quant=dict(activation="none"))).eval()
    V = model.config.vocab_size
    reqs = [GenRequest(torch.randint(0, V, (4,)).tolist(), request_id="s",
                       params=SamplingParams(max_new_tokens=8, temperature=1.3, n=3, seed=3)),
            GenRequest(torch.randint(0, V, (6,)).tolist(), request_id="g",
                       params=SamplingParams(max_new_tokens=8, temperature=0.0, n=1))]
    engine_calls = []
    real = sf.sample_hash_fused
    monkeypatch.setattr(sf, "sample_hash_fused", lambda *a, **k: engine_calls.append(1) or real(*a, **k))
    a = Engine(TorchBackend(model), slots=4, sync_every=5, noise="hash").generate(reqs)
    n_engine = len(engine_calls)
    b = Engine(TorchBackend(model), slots=2, sync_every=3, noise="hash").generate(reqs)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert len({tuple(r.token_ids) for r in a[:3]}) > 1
    for r in a:
        q = reqs[0] if r.request_id == "s" else reqs[1]
        nv = naive_generate(model, q.prompt_ids, q.params, sample_index=r.sample_index, noise="hash")
        assert r.token_ids == nv.token_ids
        assert max(abs(x - y) for x, y in zip(r.logprobs + r.model_logprobs, nv.logprobs + nv.model_logprobs)) < 1e-4
    assert n_engine > 0, "the engine did not take the fused sampling path"


@pytest.mark.gpu
@pytest.mark.skipif(_dispatch.interpreting(), reason="needs the compiled kernel: run with TRITON_INTERPRET=0")
@pytest.mark.parametrize("B", [64, 512])
def test_cuda_kernel_matches_the_reference_at_rl_shapes(B):
    """On the GPU (compiled, not interpreted): tokens as the torch reference except float-level near-ties,
    log-probs within 1e-4, at the GRPO benchmark's vocabulary; greedy rows exact."""
    dev = torch.device("cuda")
    V = 50257
    g = torch.Generator(device="cpu").manual_seed(B)
    logits = (torch.randn(B, V, generator=g) * 2).to(dev)
    temp = torch.full((B,), 1.0, device=dev)
    temp[::3] = 0.7
    greedy = torch.zeros(B, dtype=torch.bool, device=dev)
    greedy[::5] = True
    keys = torch.randint(0, 2**62, (B,), generator=g).to(dev)
    counters = torch.randint(0, 1000, (B,), generator=g).to(dev)
    tok, lp, mlp = sf.sample_hash_fused(logits, temp, greedy, keys, counters)
    rt, rlp, rmlp = sf.sample_hash_fused_ref(logits, temp, greedy, keys, counters)
    same = tok == rt
    assert same.float().mean() >= 0.99 and bool(same[greedy].all())
    assert float((lp - rlp)[same].abs().max()) < 1e-4 and float((mlp - rmlp)[same].abs().max()) < 1e-4
    assert bool((lp[greedy] == 0).all())
