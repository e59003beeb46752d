"""Decode backend and engine equivalence: teacher-forced logits, greedy == naive, group prefill, seeds.

Strict (1e-4) comparisons use W1.58A16 models (quant.activation = "none"): with int8 activations an
ulp-level difference between the parallel and the recurrent path can flip one activation's rounding
(a jump of 1/127 of that token's absmax), which moves logits by ~1e-2 at rare positions; that is the
quantizer's discontinuity, not the engine. `test_int8_activations_*` bound how rare and how large.
"""

import pytest
import torch

from model.config import BitMambaConfig
from model.errors import BitMambaError
from model.lm import BitMambaLM
from rollout.backends import TorchBackend, make_backend
from rollout.backends.base import prefill_many
from rollout.engine import Engine
from rollout.reference import naive_generate
from rollout.sampling import SamplingTensors, process_logits, seen_mask
from rollout.types import GenRequest, SamplingParams

PRESETS = ["tiny", "tiny-hybrid", "tiny-bitmamba2"]


def _model(name, seed=0, activation="none"):
    torch.manual_seed(seed)
    return BitMambaLM(BitMambaConfig.preset(name, quant=dict(activation=activation))).eval()


@pytest.fixture(scope="module", params=PRESETS)
def model(request):
    return _model(request.param)


def _full_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def assert_same_greedy(got, naive, tie=1e-4):
    """Tokens equal; a divergence is only tolerated at a near-tie (< `tie`) of the naive logits."""
    for i, (a, b) in enumerate(zip(got, naive.token_ids)):
        if a != b:
            top2 = naive.logits[i].topk(2).values
            assert float(top2[0] - top2[1]) < tie, f"diverged at {i}: {a} vs {b} without a tie"
            return
    assert len(got) == len(naive.token_ids)


class CountingBackend(TorchBackend):
    def __init__(self, model):
        super().__init__(model)
        self.prefills = []
        self.calls = []     # prompts per prefill call

    def prefill(self, prompt_ids):
        self.prefills.append(prompt_ids.tolist())
        self.calls.append(1)
        return super().prefill(prompt_ids)

    def prefill_many(self, prompts):
        self.prefills += [list(p) for p in prompts]
        self.calls.append(len(prompts))
        return super().prefill_many(prompts)


def test_teacher_forced_prefill_step_copy_and_refill(model):
    g = torch.Generator().manual_seed(1)
    V = model.config.vocab_size
    a = torch.randint(0, V, (13,), generator=g).tolist()    # prompt 5 + 8 forced tokens
    b = torch.randint(0, V, (10,), generator=g).tolist()    # prompt 3 + 7 forced tokens
    fa, fb = _full_logits(model, a), _full_logits(model, b)
    be = TorchBackend(model)
    be.allocate(4, 32)
    la, sa = be.prefill(torch.tensor(a[:5]))
    assert (la - fa[4]).abs().max() < 1e-4
    be.load_rows(sa, torch.tensor([1, 3]))                  # one prefill copied to two rows
    tok = torch.zeros(4, dtype=torch.long)
    for t in range(5, 8):
        tok[[1, 3]] = a[t]
        out = be.step(tok)
        assert (out[1] - fa[t]).abs().max() < 1e-4 and (out[3] - fa[t]).abs().max() < 1e-4, t
    # continuous batching: row 1 takes a new prompt mid-flight, row 3 goes on
    lb, sb = be.prefill(torch.tensor(b[:3]))
    assert (lb - fb[2]).abs().max() < 1e-4
    be.load_rows(sb, torch.tensor([1]))
    for j in range(3, 8):
        tok[1], tok[3] = b[j], a[j + 5]
        out = be.step(tok)
        assert (out[1] - fb[j]).abs().max() < 1e-4, j
        assert (out[3] - fa[j + 5]).abs().max() < 1e-4, j


def test_extend_equals_prefill_of_the_whole_text(model):
    ids = torch.randint(0, model.config.vocab_size, (11,)).tolist()
    full = _full_logits(model, ids)
    be = TorchBackend(model)
    be.allocate(3, 32)
    _, s1 = be.prefill(torch.tensor(ids[:4]))
    be.load_rows(s1, torch.tensor([0, 2]))
    last = be.extend(torch.tensor([2]), torch.tensor([ids[4:9]]))
    assert (last[0] - full[8]).abs().max() < 1e-4
    out = be.step(torch.tensor([0, 0, ids[9]]))
    assert (out[2] - full[9]).abs().max() < 1e-4
    assert (be.state.pos[[0, 2]] == torch.tensor([5, 10])).all()


def test_engine_greedy_equals_naive_with_continuous_batching(model):
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(2)
    lens, news = [1, 3, 7, 12, 5], [9, 4, 13, 6, 11]
    reqs = [GenRequest(torch.randint(0, V, (L,), generator=g).tolist(),
                       SamplingParams(max_new_tokens=m, temperature=0.0), request_id=k)
            for k, (L, m) in enumerate(zip(lens, news))]
    be = CountingBackend(model)
    eng = Engine(be, slots=2, sync_every=3)               # 5 requests through 2 slots
    res = eng.generate(reqs)
    assert [r.request_id for r in res] == list(range(5))
    assert len(be.prefills) == 5
    for r, q in zip(res, reqs):
        nv = naive_generate(model, q.prompt_ids, q.params)
        assert_same_greedy(r.token_ids, nv)
        assert r.finish_reason == "length" and len(r.token_ids) == q.params.max_new_tokens
        assert max(abs(x - y) for x, y in zip(r.model_logprobs, nv.model_logprobs)) < 1e-4
        assert r.logprobs == [0.0] * len(r.token_ids) and r.sampled_mask == [1] * len(r.token_ids)
        assert r.prefill_s > 0 and r.decode_s > 0 and r.ttft_s > 0
    st = eng.last_stats
    assert st.new_tokens == sum(news) and st.n_prefills == 5 and st.tokens_per_s > 0


def test_group_sampling_prefills_once_and_matches_naive_per_sample(model):
    V = model.config.vocab_size
    p1 = torch.randint(0, V, (6,)).tolist()
    p2 = torch.randint(0, V, (9,)).tolist()
    params = SamplingParams(max_new_tokens=8, temperature=1.0, top_k=40, n=4, seed=11)
    reqs = [GenRequest(p1, params, request_id="a"), GenRequest(p2, params, request_id="b"),
            GenRequest(p1, SamplingParams(max_new_tokens=5, temperature=0.0), request_id="c")]
    be = CountingBackend(model)
    res = Engine(be, slots=3, sync_every=4).generate(reqs)
    assert be.prefills == [p1, p2]                         # p1 shared by "a" (n=4) and "c"
    assert [(r.request_id, r.sample_index) for r in res] == \
        [("a", i) for i in range(4)] + [("b", i) for i in range(4)] + [("c", 0)]
    for r in res:
        q = {"a": reqs[0], "b": reqs[1], "c": reqs[2]}[r.request_id]
        nv = naive_generate(model, q.prompt_ids, q.params, sample_index=r.sample_index)
        assert r.token_ids == nv.token_ids                  # same generator stream, same state
        assert max(abs(x - y) for x, y in zip(r.logprobs, nv.logprobs)) < 1e-4
    assert len({tuple(r.token_ids) for r in res[:4]}) > 1   # samples of a group differ


@pytest.mark.parametrize("noise", ["generator", "hash"])
def test_seeds_replay_whatever_the_batching(model, noise):
    V = model.config.vocab_size
    reqs = [GenRequest(torch.randint(0, V, (L,)).tolist(), request_id=L) for L in (4, 7, 2)]
    params = SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.95, min_p=0.01, n=2, seed=3)
    a = Engine(TorchBackend(model), slots=6, sync_every=8, noise=noise).generate(reqs, params)
    b = Engine(TorchBackend(model), slots=2, sync_every=3, noise=noise).generate(reqs, params)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    c = Engine(TorchBackend(model), slots=6, noise=noise).generate(reqs, SamplingParams(
        max_new_tokens=10, temperature=0.9, top_p=0.95, min_p=0.01, n=2, seed=4))
    assert [r.token_ids for r in a] != [r.token_ids for r in c]
    for r in a[:2]:   # each sample is exactly the naive reference's draw with the same noise source
        nv = naive_generate(model, reqs[0].prompt_ids, params, sample_index=r.sample_index, noise=noise)
        assert r.token_ids == nv.token_ids
        assert max(abs(x - y) for x, y in zip(r.logprobs, nv.logprobs)) < 1e-4


def test_logprobs_equal_forward_logits_under_the_sampling_transform(model):
    V = model.config.vocab_size
    prompt = torch.randint(0, V, (5,)).tolist()
    p = SamplingParams(max_new_tokens=12, temperature=0.7, top_k=50, top_p=0.9, repetition_penalty=1.3,
                       n=2, seed=5)
    res = Engine(TorchBackend(model), slots=2, sync_every=5).generate([GenRequest(prompt, p)])
    st = SamplingTensors.from_params([p])
    for r in res:
        full = _full_logits(model, prompt + r.token_ids)[len(prompt) - 1:-1]
        for t, tok in enumerate(r.token_ids):
            seen = seen_mask([prompt + r.token_ids[:t]], V)
            lp = process_logits(full[t:t + 1], st, seen).log_softmax(-1)[0, tok]
            assert abs(float(lp) - r.logprobs[t]) < 1e-4
            assert abs(float(full[t].log_softmax(-1)[tok]) - r.model_logprobs[t]) < 1e-4
            assert r.logprobs[t] < 0


def test_repetition_penalty_greedy_matches_naive():
    model = _model("tiny")
    prompt = [3, 5, 7, 9, 3]
    p = SamplingParams(max_new_tokens=16, temperature=0.0, repetition_penalty=1.8)
    res = Engine(TorchBackend(model), slots=1, sync_every=4).generate([GenRequest(prompt, p)])
    nv = naive_generate(model, prompt, p)
    assert_same_greedy(res[0].token_ids, nv)
    plain = naive_generate(model, prompt, SamplingParams(max_new_tokens=16, temperature=0.0))
    assert plain.token_ids != nv.token_ids          # the penalty changes the greedy path


def test_bf16_state_option_stays_close():
    model = _model("tiny-hybrid")
    ids = torch.randint(0, 256, (14,)).tolist()
    full = _full_logits(model, ids)
    be = TorchBackend(model, state_dtype=torch.bfloat16)
    be.allocate(2, 32)
    assert be.state.layers[0].ssm.dtype == torch.bfloat16
    lg, s1 = be.prefill(torch.tensor(ids[:6]))
    be.load_rows(s1, torch.tensor([0, 1]))
    err = (lg - full[5]).abs().max().item()
    for t in range(6, 14):
        out = be.step(torch.tensor([ids[t], ids[t]]))
        if t < 13:
            err = max(err, (out[0] - full[t]).abs().max().item())
    assert err < 0.1, err     # bf16 state: close to fp32, not equal


def test_make_backend_choices(monkeypatch):
    import sys

    model = _model("tiny")
    assert isinstance(make_backend(model, "torch"), TorchBackend)
    assert isinstance(make_backend(model, "auto"), TorchBackend)      # no CUDA here
    fp_model = BitMambaLM(BitMambaConfig.preset("tiny", quant=dict(ternary=False)))
    with pytest.raises(BitMambaError, match="fast.*ternary"):
        make_backend(fp_model, "fast")                               # refused: loud, no fallback
    monkeypatch.setitem(sys.modules, "rollout.backends.triton_backend", None)           # not importable
    with pytest.raises(BitMambaError, match="cannot import"):
        make_backend(model, "fast")
    with pytest.raises(BitMambaError, match="unknown"):
        make_backend(model, "tpu")


@pytest.mark.parametrize("name", PRESETS)
def test_engine_on_fast_backend_cpu_matches_naive(name):
    """The engine drives FastBackend (eager reference kernels on CPU) like TorchBackend."""
    pytest.importorskip("rollout.backends.triton_backend")
    model = _model(name, activation="int8")
    be = make_backend(model, "fast")
    assert type(be).__name__ == "FastBackend"
    reqs = [GenRequest(torch.randint(0, 256, (L,)).tolist(), SamplingParams(max_new_tokens=9, temperature=0.0))
            for L in (2, 7, 5)]
    res = Engine(be, slots=2, sync_every=4).generate(reqs)
    for r, q in zip(res, reqs):
        nv = naive_generate(model, q.prompt_ids, q.params)
        assert_same_greedy(r.token_ids, nv, tie=5e-2)
        assert len(r.token_ids) == 9


def test_bad_requests_are_user_errors():
    eng = Engine(TorchBackend(_model("tiny")))
    with pytest.raises(BitMambaError, match="outside vocab"):
        eng.generate([GenRequest([1, 999])], SamplingParams())
    with pytest.raises(BitMambaError, match="tokenizer"):
        eng.generate([GenRequest([1, 2])], SamplingParams(stop_strings=["x"]))
    with pytest.raises(BitMambaError, match="SamplingParams"):
        eng.generate([GenRequest([1, 2])])


@pytest.mark.parametrize("name", PRESETS)
def test_int8_activations_teacher_forced_flips_are_rare_and_small(name):
    model = _model(name, activation="int8")
    diffs = []
    for trial in range(4):
        ids = torch.randint(0, 256, (30,)).tolist()
        full = _full_logits(model, ids)
        be = TorchBackend(model)
        be.allocate(2, 32)
        lg, s1 = be.prefill(torch.tensor(ids[:7]))
        be.load_rows(s1, torch.tensor([0, 1]))
        diffs.append((lg - full[6]).abs().max().item())
        for t in range(7, 29):
            out = be.step(torch.tensor([ids[t], ids[t]]))
            assert torch.equal(out[0], out[1])               # copied rows evolve identically
            diffs.append((out[0] - full[t]).abs().max().item())
    diffs = torch.tensor(diffs)
    assert (diffs < 1e-4).float().mean() >= 0.9, diffs
    assert diffs.max() < 5e-2, diffs.max()


@pytest.mark.parametrize("name", PRESETS)
def test_int8_activations_engine_greedy_equals_naive(name):
    model = _model(name, activation="int8")
    reqs = [GenRequest(torch.randint(0, 256, (L,)).tolist(), SamplingParams(max_new_tokens=12, temperature=0.0))
            for L in (3, 8, 11)]
    res = Engine(TorchBackend(model), slots=2, sync_every=4).generate(reqs)
    for r, q in zip(res, reqs):
        assert_same_greedy(r.token_ids, naive_generate(model, q.prompt_ids, q.params), tie=5e-2)


def test_noise_auto_is_hash_on_cuda_and_generator_on_cpu(model):
    eng = Engine(TorchBackend(model), slots=2)
    assert eng.noise == "auto"
    assert eng.noise_kind("cuda") == "hash" and eng.noise_kind("cpu") == "generator"
    assert Engine(TorchBackend(model), noise="generator").noise_kind("cuda") == "generator"
    with pytest.raises(BitMambaError, match="noise must be"):
        Engine(TorchBackend(model), noise="dice")


@pytest.mark.parametrize("activation", ["none", "int8"])
@pytest.mark.parametrize("name", PRESETS)
def test_prefill_many_equals_one_prefill_per_prompt(name, activation):
    """Left-padded batches (pure Mamba) / equal-length batches (hybrid) give each prompt's own logits and
    state: lengths below the conv window, across chunk boundaries, repeated lengths, several batches."""
    model = _model(name, activation=activation)
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(5)
    lens = [1, 2, 17, 5, 33, 5, 16, 40]
    prompts = [torch.randint(0, V, (L,), generator=g).tolist() for L in lens]
    be = TorchBackend(model)
    be.allocate(4, 64)
    for budget in (8192, 48):        # one batch / several (48 padded tokens each at most)
        lg, st = prefill_many(model, prompts, be._new_state, be.max_len, token_budget=budget)
        assert lg.shape == (len(prompts), V) and st.batch_size == len(prompts)
        for p, ids in enumerate(prompts):
            l1, s1 = be.prefill(torch.tensor(ids))
            assert (lg[p] - l1).abs().max() < 1e-4, (budget, p)
            assert int(st.pos[p]) == len(ids)
            for la, lb in zip(st.layers, s1.layers):
                for name in vars(la):
                    a, b = getattr(la, name)[p], getattr(lb, name)[0]
                    assert (a.float() - b.float()).abs().max() < 1e-4, (budget, p, name)


def test_engine_prefills_the_prompts_entering_together_in_one_call(model):
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(6)
    reqs = [GenRequest(torch.randint(0, V, (L,), generator=g).tolist(),
                       SamplingParams(max_new_tokens=6, temperature=1.0, n=2, seed=3), request_id=k)
            for k, L in enumerate([4, 9, 4, 21, 7])]
    be = CountingBackend(model)
    res = Engine(be, slots=6, sync_every=3).generate(reqs)      # 3 prompts (6 samples) fill the slots
    assert be.calls == [3, 2]       # prompts 0-2 together, then 3-4 when their slots free up
    one = CountingBackend(model)
    ref = Engine(one, slots=6, sync_every=3, batch_prefill=False).generate(reqs)
    assert one.calls == [1] * 5
    for a, b in zip(res, ref):
        assert a.token_ids == b.token_ids
        assert max(abs(x - y) for x, y in zip(a.model_logprobs, b.model_logprobs)) < 1e-4
    eng = Engine(be, slots=6, sync_every=3)
    eng.generate(reqs)
    assert eng.last_stats.n_prefills == 5 and eng.last_stats.prefill_batches == 2


def test_prefill_many_names_a_bad_prompt(model):
    be = TorchBackend(model)
    be.allocate(2, 32)
    with pytest.raises(BitMambaError, match="prompt 1 is empty"):
        be.prefill_many([[1, 2], []])
    with pytest.raises(BitMambaError, match="prompt 0 of 40 tokens does not fit max_len 32"):
        be.prefill_many([[1] * 40, [2]])
