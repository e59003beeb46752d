"""The engine on CUDA: FastBackend (CUDA graphs) and TorchBackend vs the naive reference, hash noise
on the GPU, seeded replay, the pause hook, bf16 numbers, and the engine's overhead over bare steps.

Run on the GPU machine: BITMAMBA_SSD=ref python -m pytest -q -s tests/test_engine_gpu.py
"""

import time

import pytest
import torch

from model.config import BitMambaConfig
from model.lm import BitMambaLM
from rollout.backends import TorchBackend, make_backend
from rollout.engine import Engine
from rollout.reference import naive_generate
from rollout.sampling import hash_exponential_noise, sample_seed
from rollout.types import GenRequest, SamplingParams

pytestmark = pytest.mark.gpu
PRESETS = ["tiny", "tiny-hybrid", "tiny-bitmamba2"]
CUDA = "cuda"


def _model(name, **kw):
    torch.manual_seed(0)
    return BitMambaLM(BitMambaConfig.preset(name, **kw)).to(CUDA).eval()


def _same_greedy(got, naive, tie):
    for i, (a, b) in enumerate(zip(got, naive.token_ids)):
        if a != b:
            top2 = naive.logits[i].topk(2).values
            assert float(top2[0] - top2[1]) < tie, f"diverged at {i} without a tie"
            return i
    assert len(got) == len(naive.token_ids)
    return None


@pytest.mark.parametrize("kind", ["fast", "torch"])
@pytest.mark.parametrize("name", PRESETS)
def test_engine_greedy_equals_naive_on_cuda(name, kind):
    model = _model(name)
    reqs = [GenRequest(torch.randint(0, 256, (L,)).tolist(), SamplingParams(max_new_tokens=16, temperature=0.0))
            for L in (3, 9, 14, 5, 1)]
    res = Engine(make_backend(model, kind), slots=3, sync_every=4).generate(reqs)
    diverged = [_same_greedy(r.token_ids, naive_generate(model, q.prompt_ids, q.params), tie=5e-2)
                for r, q in zip(res, reqs)]
    print(f"\n{name}/{kind}: divergences at near-ties: {diverged}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["fast", "torch"])
@pytest.mark.parametrize("name", PRESETS)
def test_prefill_many_equals_one_prefill_per_prompt_on_cuda(name, kind, dtype):
    """The left-padded batch through mamba-ssm's Triton scan (seq_idx + final states) = one prompt at a time."""
    model = _model(name, quant=dict(activation="none")).to(dtype)
    be = make_backend(model, kind)
    be.allocate(4, 128)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (L,), generator=g).tolist() for L in (1, 3, 70, 17, 64, 17, 40)]
    lg, st = be.prefill_many(prompts)
    tol = 2e-3 if dtype == torch.float32 else 6e-2
    for p, ids in enumerate(prompts):
        l1, s1 = be.prefill(torch.tensor(ids, device=CUDA))
        scale = float(l1.abs().max())
        assert float((lg[p] - l1).abs().max()) < tol * scale, (p, float((lg[p] - l1).abs().max()), scale)
        assert int(st.pos[p]) == len(ids)
        for la, lb in zip(st.layers, s1.layers):
            for f in vars(la):
                a, b = getattr(la, f)[p].float(), getattr(lb, f)[0].float()
                assert float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max())), (p, f)


def test_hash_noise_on_cuda_equals_cpu():
    keys = torch.tensor([sample_seed(1, i) for i in range(8)])
    counters = torch.arange(8) * 7
    cpu = hash_exponential_noise(keys, counters, 1000)
    gpu = hash_exponential_noise(keys.to(CUDA), counters.to(CUDA), 1000).cpu()
    assert torch.allclose(cpu, gpu, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("noise", ["generator", "hash"])
def test_seeded_replay_on_cuda_fast_backend(noise):
    model = _model("tiny-hybrid")
    reqs = [GenRequest(torch.randint(0, 256, (L,)).tolist()) for L in (4, 11)]
    p = SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.95, n=3, seed=9)
    a = Engine(make_backend(model, "fast"), slots=6, noise=noise).generate(reqs, p)
    b = Engine(make_backend(model, "fast"), slots=2, sync_every=3, noise=noise).generate(reqs, p)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert len({tuple(r.token_ids) for r in a}) > 1


def test_pause_hook_on_cuda_graph_backend():
    model = _model("tiny-hybrid", quant=dict(activation="none"))
    prompt = torch.randint(0, 256, (6,)).tolist()
    ref = naive_generate(model, prompt, SamplingParams(max_new_tokens=30, temperature=0.0)).token_ids
    i = next(k for k in range(3, 30) if ref[k] not in ref[:k])
    inject = [11, 12, 13]
    params = SamplingParams(max_new_tokens=30, temperature=0.0, stop_token_ids=[ref[i]])
    eng = Engine(make_backend(model, "fast"), slots=2, on_stop=lambda v: inject if v.n_pauses == 0 else None)
    r = eng.generate([GenRequest(prompt, params)])[0]
    head = ref[:i + 1] + inject
    assert r.token_ids[:len(head)] == head
    cont = naive_generate(model, prompt + head, SamplingParams(max_new_tokens=30 - len(head), temperature=0.0,
                                                               stop_token_ids=[ref[i]]))
    _same_greedy(r.token_ids[len(head):], cont, tie=1e-3)


def test_bf16_numbers_report():
    """What bf16 gives on the GPU: bf16 weights + fp32 state, and fp32 weights + bf16 state."""
    ids = torch.randint(0, 256, (40,)).tolist()
    for name in PRESETS:
        ref_model = _model(name)
        with torch.no_grad():
            ref = ref_model(torch.tensor([ids], device=CUDA)).logits[0].float()
        out = {}
        for label, model, sd in [("bf16 weights, fp32 state", _model(name).to(torch.bfloat16), torch.float32),
                                 ("fp32 weights, bf16 state", ref_model, torch.bfloat16)]:
            be = TorchBackend(model, state_dtype=sd)
            be.allocate(1, 64)
            lg, s1 = be.prefill(torch.tensor(ids[:9]))
            be.load_rows(s1, torch.tensor([0]))
            err = [(lg - ref[8]).abs().max().item()]
            for t in range(9, 39):
                err.append((be.step(torch.tensor([ids[t]], device=CUDA))[0] - ref[t]).abs().max().item())
            out[label] = (max(err), sorted(err)[len(err) // 2])
            assert max(err) < 1.0
        print(f"\n{name}: max / median |logit diff| vs fp32 forward: {out}")


def test_engine_overhead_over_bare_steps():
    """Engine tokens/s (sampling, buffers, syncs every 8 steps) vs a bare loop of backend.step."""
    torch.manual_seed(0)
    model = BitMambaLM(BitMambaConfig.preset("bitmamba2-255m")).to(CUDA).eval()
    slots, new = 64, 128
    be = make_backend(model, "fast")
    be.allocate(slots, 256)
    tok = torch.zeros(slots, dtype=torch.long, device=CUDA)
    for _ in range(5):
        be.step(tok)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(new):
        tok = be.step(tok).argmax(-1)
    torch.cuda.synchronize()
    bare = slots * new / (time.perf_counter() - t)
    reqs = [GenRequest(torch.randint(0, 50257, (64,)).tolist()) for _ in range(slots)]
    rates = {}
    for label, p, noise in [("greedy", SamplingParams(max_new_tokens=new, temperature=0.0), "generator"),
                            ("T=0.8 generator", SamplingParams(max_new_tokens=new, temperature=0.8, seed=1),
                             "generator"),
                            ("T=0.8 hash", SamplingParams(max_new_tokens=new, temperature=0.8, seed=1), "hash"),
                            ("T=0.8 top-p 0.9 hash", SamplingParams(max_new_tokens=new, temperature=0.8, top_p=0.9,
                                                                   seed=1), "hash")]:
        eng = Engine(be, slots=slots, sync_every=8, noise=noise, max_len=256)
        eng.generate(reqs[:2], SamplingParams(max_new_tokens=4))     # warm-up
        eng.generate(reqs, p)
        s = eng.last_stats
        rates[label] = round(s.new_tokens / s.decode_s)
    print(f"\nbitmamba2-255m, {slots} slots, {new} new tokens: bare step loop {bare:.0f} tok/s; "
          f"engine decode tok/s {rates}")
    assert rates["greedy"] > 0.5 * bare
