"""FastBackend (rollout/backends/triton_backend.py) on CPU: same Python step as on the GPU, reference kernels, no graphs.

Teacher-forced: prefill (parallel forward) + step-by-step logits == the model's full forward logits
(fp32, 1e-4) and == TorchBackend's step logits, for pure-Mamba, hybrid and BitMamba-2-layout models,
odd prompt lengths, rows at different positions, a state copied to several rows, grouped / A16 quant.
One test runs the real Triton kernels in the interpreter.
"""



import pytest  # noqa: E402
import torch  # noqa: E402

from model.config import BitMambaConfig  # noqa: E402
from model.lm import BitMambaLM  # noqa: E402
from rollout.backends import TorchBackend  # noqa: E402
from rollout.backends.triton_backend import FastBackend, bucket_for  # noqa: E402
from rollout.kernels import _dispatch  # noqa: E402

TOL = dict(rtol=1e-4, atol=1e-4)

CASES = {
    "tiny": ("tiny", {}),
    "tiny-hybrid": ("tiny-hybrid", {}),
    "tiny-bitmamba2": ("tiny-bitmamba2", {}),
    "tiny-group": ("tiny", {"quant": {"weight_scale": "group", "group_size": 32}, "ternary_head": True}),
    "tiny-a16": ("tiny-hybrid", {"quant": {"activation": "none"}}),
}


def _model(case: str) -> BitMambaLM:
    preset, over = CASES[case]
    torch.manual_seed(0)
    m = BitMambaLM(BitMambaConfig.preset(preset, **over)).eval()
    with torch.no_grad():  # non-trivial norm weights and D so every term is exercised
        for name, p in m.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                p.normal_(1.0, 0.3)
            if name.endswith(".D"):
                p.normal_(1.0, 0.5)
    return m


def _full_logits(m, ids):
    with torch.no_grad():
        return m(ids[None]).logits[0].float()


@pytest.mark.parametrize("case", list(CASES))
def test_teacher_forced_prefill_then_step(case):
    m = _model(case)
    V = m.config.vocab_size
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, V, (12,), generator=g), torch.randint(0, V, (12,), generator=g)]
    plen = [5, 2]  # odd and different prompt lengths: rows sit at different positions
    full = [_full_logits(m, s) for s in seqs]
    fast, ref = FastBackend(m), TorchBackend(m)
    slots = 3  # rows 0 and 2 share prompt 0 (a state copied to two rows), row 1 has prompt 1
    for be in (fast, ref):
        be.allocate(slots, 32)
    for be in (fast, ref):
        for which, rows in ((0, [0, 2]), (1, [1])):
            logits, st = be.prefill(seqs[which][: plen[which]])
            torch.testing.assert_close(logits, full[which][plen[which] - 1], **TOL)
            be.load_rows(st, torch.tensor(rows))
    order = [0, 1, 0]
    for t in range(6):
        toks = torch.stack([seqs[order[r]][plen[order[r]] + t] for r in range(slots)])
        lf = fast.step(toks)
        lr = ref.step(toks)
        assert lf.shape == (slots, V) and lf.dtype == torch.float32
        torch.testing.assert_close(lf, lr, **TOL)
        for r in range(slots):
            torch.testing.assert_close(lf[r], full[order[r]][plen[order[r]] + t], **TOL)


def test_extend_and_refill():
    m = _model("tiny-hybrid")
    V = m.config.vocab_size
    ids = torch.randint(0, V, (10,))
    full = _full_logits(m, ids)
    fast = FastBackend(m)
    fast.allocate(2, 32)
    _, st = fast.prefill(ids[:3])
    fast.load_rows(st, torch.tensor([0, 1]))
    lf = fast.step(ids[3:4].repeat(2))
    torch.testing.assert_close(lf[0], full[3], **TOL)
    # row 1 gets a tool result (extend), row 0 keeps stepping
    le = fast.extend(torch.tensor([1]), ids[4:7][None])
    torch.testing.assert_close(le[0], full[6], **TOL)
    lf = fast.step(torch.stack([ids[4], ids[7]]))
    torch.testing.assert_close(lf[0], full[4], **TOL)
    torch.testing.assert_close(lf[1], full[7], **TOL)
    # slot refill: row 0 takes a new prompt while row 1 continues
    ids2 = torch.randint(0, V, (6,))
    full2 = _full_logits(m, ids2)
    _, st2 = fast.prefill(ids2[:2])
    fast.load_rows(st2, torch.tensor([0]))
    lf = fast.step(torch.stack([ids2[2], ids[8]]))
    torch.testing.assert_close(lf[0], full2[2], **TOL)
    torch.testing.assert_close(lf[1], full[8], **TOL)


def test_refresh_weights_repacks():
    m = _model("tiny")
    fast = FastBackend(m)
    fast.allocate(1, 16)
    ids = torch.randint(0, 256, (4,))
    with torch.no_grad():
        for _, lin in m.bitlinears():
            lin.weight.mul_(-1.0).add_(0.01)
    fast.refresh_weights()
    fast.allocate(1, 16)
    _, st = fast.prefill(ids[:3])
    fast.load_rows(st, torch.tensor([0]))
    torch.testing.assert_close(fast.step(ids[3:4])[0], _full_logits(m, ids)[3], **TOL)


def test_buckets():
    assert [bucket_for(n) for n in (1, 3, 16, 17, 256, 257)] == [1, 4, 16, 32, 256, 512]
    fast = FastBackend(_model("tiny"))
    fast.allocate(3, 16)
    assert fast.state.batch_size == 4 and fast.step(torch.zeros(3, dtype=torch.long)).shape == (3, 256)
    with pytest.raises(ValueError):
        fast.step(torch.zeros(4, dtype=torch.long))


def test_bf16_ssm_state_option():
    m = _model("tiny-bitmamba2")
    ids = torch.randint(0, 256, (8,))
    full = _full_logits(m, ids)
    fast = FastBackend(m, ssm_dtype=torch.bfloat16)
    fast.allocate(1, 16)
    _, st = fast.prefill(ids[:4])
    fast.load_rows(st, torch.tensor([0]))
    assert fast.state.layers[0].ssm.dtype == torch.bfloat16
    for t in range(4, 8):
        torch.testing.assert_close(fast.step(ids[t:t + 1])[0], full[t], rtol=3e-2, atol=3e-2)


@pytest.mark.skipif(not _dispatch.interpreting(), reason="kernels imported before TRITON_INTERPRET=1")
@pytest.mark.parametrize("case", ["tiny-hybrid", "tiny-bitmamba2"])
def test_triton_kernels_in_interpreter_end_to_end(case):
    m = _model(case)
    ids = torch.randint(0, m.config.vocab_size, (7,))
    full = _full_logits(m, ids)
    fast = FastBackend(m, impl="triton")
    fast.allocate(2, 16)
    _, st = fast.prefill(ids[:4])
    fast.load_rows(st, torch.tensor([0, 1]))
    for t in range(4, 7):
        lf = fast.step(ids[t:t + 1].repeat(2))
        for r in range(2):
            torch.testing.assert_close(lf[r], full[t], **TOL)


def test_fast_refuses_graphs_on_cpu():
    with pytest.raises(_dispatch.FastPathUnavailable):
        FastBackend(_model("tiny"), use_graphs=True)


def test_engine_on_fast_backend_matches_torch_backend():
    """The engine (continuous batching, group sampling) gives the same samples on either backend."""
    from rollout.engine import Engine
    from rollout.types import GenRequest, SamplingParams

    m = _model("tiny-hybrid")
    reqs = [GenRequest(prompt_ids=[1, 2, 3, 4, 5]), GenRequest(prompt_ids=[9, 8]), GenRequest(prompt_ids=[7] * 7)]
    params = SamplingParams(max_new_tokens=6, temperature=0.8, top_k=20, n=2, seed=3)
    outs = []
    for be in (FastBackend(m), TorchBackend(m)):
        res = Engine(be, slots=4, sync_every=3, max_len=32).generate(reqs, params)
        outs.append(res)
    for a, b in zip(*outs):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(a.model_logprobs), torch.tensor(b.model_logprobs), rtol=1e-4,
                                   atol=1e-4)


@pytest.mark.skipif(not _dispatch.interpreting(), reason="kernels imported before TRITON_INTERPRET=1")
def test_fused_and_unfused_norm_paths_agree_in_interpreter():
    m = _model("tiny-bitmamba2")
    ids = torch.randint(0, m.config.vocab_size, (6,))
    outs = []
    for fuse in (True, False):
        fast = FastBackend(m, impl="triton", fuse_norm=fuse)
        fast.allocate(1, 16)
        _, st = fast.prefill(ids[:4])
        fast.load_rows(st, torch.tensor([0]))
        outs.append(torch.stack([fast.step(ids[t:t + 1])[0] for t in range(4, 6)]))
    torch.testing.assert_close(outs[0], outs[1], **TOL)


def test_make_backend_ssm_dtype_sets_only_the_ssm_state():
    """`model.ssm_dtype: bfloat16` (GRPO workers) -> bf16 SSM state, conv window in state_dtype; the
    engine decodes with it and stays close to the fp32-state log-probs."""
    import torch

    from model.config import BitMambaConfig
    from model.lm import BitMambaLM
    from rollout.backends import make_backend
    from rollout.engine import Engine
    from rollout.types import GenRequest, SamplingParams

    torch.manual_seed(0)
    model = BitMambaLM(BitMambaConfig.preset("tiny")).eval()
    be = make_backend(model, "torch", ssm_dtype=torch.bfloat16)
    be.allocate(2, 32)
    conv, ssm = be.state.mamba_stack
    assert ssm.dtype == torch.bfloat16 and conv.dtype == torch.float32
    assert make_backend(model, "torch").ssm_dtype == torch.float32
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    out = {dt: Engine(make_backend(model, "torch", ssm_dtype=dt), slots=2).generate([GenRequest([3, 5, 7])], params)[0]
           for dt in (torch.float32, torch.bfloat16)}
    a, b = out[torch.float32].model_logprobs, out[torch.bfloat16].model_logprobs
    assert len(b) == 6 and max(abs(x - y) for x, y in zip(a, b)) < 0.05
