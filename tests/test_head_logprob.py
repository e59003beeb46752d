"""Fused head log-probs (model/head_logprob.py) against plain autograd and the previous chunked head;
its Triton row kernels (model/kernels_head.py) against their torch twins in Triton's CPU interpreter.

The kernels are defined at their first call, under TRITON_INTERPRET=1 when tests/conftest.py set it (no CUDA).
"""



import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

from model import head_logprob, kernels_head as kh  # noqa: E402
from model.config import BitMambaConfig  # noqa: E402
from model.head_logprob import head_chunk, head_logprobs  # noqa: E402
from model.lm import CE_CHUNK, BitMambaLM  # noqa: E402


def _ref(x, w, tg):
    logp = torch.log_softmax(x.float() @ w.float().T, -1)
    return logp.gather(-1, tg[:, None])[:, 0], -(logp.exp() * logp).sum(-1)


def test_head_chunk():
    assert head_chunk(50257) == 2670                     # 2670 x 50257 fp32 ~ 512 MB
    assert head_chunk(256) == 8192 and head_chunk(10 ** 7) == 256


def _inputs(n: int, d: int, v: int, xdt: torch.dtype):
    """x [n, d] (xdt), w [v, d], targets [n], upstream grads [n] (every third 0: tokens without gradient)."""
    torch.manual_seed(0)
    x = torch.randn(n, d).to(xdt).requires_grad_()
    w = (0.7 * torch.randn(v, d)).requires_grad_()
    tg = torch.randint(0, v, (n,))
    g = torch.randn(n)
    g[::3] = 0
    return x, w, tg, g


@pytest.mark.parametrize("xdt", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [None, 8, 37])
def test_fused_equals_reference(xdt, chunk):
    x, w, tg, g = _inputs(37, 16, 50, xdt)
    lp, ent = head_logprobs(x, w, tg, chunk, want_entropy=True)
    lp_r, ent_r = _ref(x, w, tg)
    assert lp.dtype == ent.dtype == torch.float32 and not ent.requires_grad and lp.requires_grad
    torch.testing.assert_close(lp, lp_r.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ent_r.detach(), rtol=1e-5, atol=1e-5)
    gx, gw = torch.autograd.grad((lp * g).sum(), (x, w))
    rx, rw = torch.autograd.grad((lp_r * g).sum(), (x, w))
    assert gx.dtype == xdt and gw.dtype == torch.float32
    torch.testing.assert_close(gx.float(), rx.float(), rtol=1e-5, atol=1e-5 * rx.float().abs().max().item())
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-5 * rw.abs().max().item())
    assert head_logprobs(x, w, tg, chunk)[1] is None


def test_fused_grad_only_where_needed():
    x, w, tg = torch.randn(5, 4, requires_grad=True), torch.randn(7, 4, dtype=torch.bfloat16), torch.arange(5)
    lp, _ = head_logprobs(x, w, tg, 2)
    lp.sum().backward()
    assert x.grad is not None and w.grad is None
    w.requires_grad_()
    head_logprobs(x.detach(), w, tg, 2)[0].sum().backward()
    assert w.grad.dtype == torch.bfloat16                # bf16 weight: fp32 accumulation, cast once


def test_gradcheck_float64():
    torch.manual_seed(0)
    x = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    tg = torch.randint(0, 9, (7,))
    assert torch.autograd.gradcheck(lambda a, b: head_logprobs(a, b, tg, 3)[0], (x, w))


# ---- BitMambaLM.token_logprobs with grad == the previous implementation ----

def old_token_logprobs(m: BitMambaLM, ids, targets, chunk=CE_CHUNK):
    """The head path before the fused Function: checkpointed chunks of log_softmax + gather + entropy."""
    def lp_chunk(hc, w, tg):
        logp_all = torch.log_softmax(m.lm_head.forward_with_weight(hc.float(), w).float(), dim=-1)
        return logp_all.gather(-1, tg[:, None]).squeeze(-1), -(logp_all.exp() * logp_all).sum(-1)

    h = m.hidden_states(ids)
    hf, tg = h.reshape(-1, h.shape[-1]), targets.reshape(-1).long()
    w = m._head_weight()
    lps, ents = zip(*[checkpoint(lp_chunk, hf[s:s + chunk], w, tg[s:s + chunk], use_reentrant=False)
                      for s in range(0, hf.shape[0], chunk)])
    return torch.cat(lps).reshape(targets.shape), torch.cat(ents).reshape(targets.shape)


MODELS = {
    "tiny": dict(),                                                    # fp head, no own norm
    "tiny-tied": dict(tie_embeddings=True),                            # fp head = embedding
    "tiny-ternary": dict(ternary_head=True),                           # ternary head + int8 acts
    "tiny-bitmamba2": dict(),                                          # ternary head + own norm
    "tiny-bitmamba2-fphead": dict(ternary_head=False),                 # fp head + own norm
}


def make(name):
    torch.manual_seed(0)
    preset = "tiny-bitmamba2" if name.startswith("tiny-bitmamba2") else "tiny"
    m = BitMambaLM(BitMambaConfig.preset(preset, **MODELS[name]))
    with torch.no_grad():
        m.embedding.weight.normal_(0, 1.0)
    return m.train()


def _grads(m):
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("chunk", [None, 5, 7])                       # 26 tokens: one chunk / 5+1 / 3+5 rows
def test_token_logprobs_equal_previous(name, chunk):
    m = make(name)
    assert m.lm_head.ternary == ("ternary" in name or name == "tiny-bitmamba2")
    ids, tg = torch.randint(0, 256, (2, 13)), torch.randint(0, 256, (2, 13))
    wts = torch.randn(2, 13)
    wts[0, :4] = 0
    m.zero_grad(set_to_none=True)
    lp, ent = m.token_logprobs(ids, tg, chunk=chunk, return_entropy=True)
    assert "HeadLogprob" in type(lp.grad_fn.next_functions[0][0]).__name__   # the fused path ran
    assert lp.shape == ent.shape == (2, 13) and not ent.requires_grad
    (lp * wts).sum().backward()
    got = _grads(m)
    m.zero_grad(set_to_none=True)
    lp_o, ent_o = old_token_logprobs(m, ids, tg, chunk or CE_CHUNK)
    (lp_o * wts).sum().backward()
    want = _grads(m)
    torch.testing.assert_close(lp, lp_o.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ent_o.detach(), rtol=1e-5, atol=1e-5)
    assert got.keys() == want.keys() and len(got) == len(list(m.parameters()))
    for k in want:
        scale = want[k].abs().max().item()
        assert scale > 0, k
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5 * scale, msg=k)
    # the full-sequence fp32 log_softmax of the logits agrees too
    ref = torch.log_softmax(m(ids).logits.float(), -1).gather(-1, tg[..., None])[..., 0]
    torch.testing.assert_close(lp, ref.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny-bitmamba2", "tiny"])
def test_no_grad_path_unchanged(name):
    """Without grad (eval: exact int8 head; train mode: STE numbers) the chunked path is bit-for-bit the old one."""
    m = make(name)
    ids, tg = torch.randint(0, 256, (2, 13)), torch.randint(0, 256, (2, 13))
    for train in (False, True):
        m.train(train)
        with torch.no_grad():
            lp, ent = m.token_logprobs(ids, tg, chunk=5, return_entropy=True)
            lp_o, ent_o = old_token_logprobs(m, ids, tg, 5)
            assert lp.grad_fn is None
        assert torch.equal(lp, lp_o) and torch.equal(ent, ent_o)


def test_bf16_trunk():
    """bf16 model (trunk and weights): fused head in fp32, same values and grads as before."""
    m = make("tiny-bitmamba2-fphead").to(torch.bfloat16)
    ids, tg = torch.randint(0, 256, (2, 13)), torch.randint(0, 256, (2, 13))
    m.zero_grad(set_to_none=True)
    lp, ent = m.token_logprobs(ids, tg, chunk=5, return_entropy=True)
    assert lp.dtype == ent.dtype == torch.float32
    lp.sum().backward()
    got = _grads(m)
    m.zero_grad(set_to_none=True)
    lp_o, ent_o = old_token_logprobs(m, ids, tg, 5)
    lp_o.sum().backward()
    want = _grads(m)
    torch.testing.assert_close(lp, lp_o.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ent_o.detach(), rtol=1e-5, atol=1e-5)
    for k in want:   # bf16 grads: the old path summed per-chunk bf16 head grads, the fused one sums in fp32
        assert got[k].dtype == torch.bfloat16
        torch.testing.assert_close(got[k].float(), want[k].float(), rtol=2e-2,
                                   atol=2e-2 * want[k].float().abs().max().item(), msg=k)


# ---- Triton row kernels (interpreter) vs the torch twins ----

@pytest.fixture
def interp():
    if not kh.interpreting() or type(kh._kernels()[0]).__name__ != "InterpretedFunction":
        pytest.skip("head kernels not defined under TRITON_INTERPRET=1 (run with TRITON_INTERPRET=1)")


def _logits(c, v, scale):
    """[c, V] logits with edge rows: a huge max in the last (tail) block, one at column 0, a constant row."""
    g = torch.Generator().manual_seed(v)
    z = torch.randn(c, v, generator=g) * scale
    z[1, v - 3] = 80.0 * max(scale, 1.0)           # the running max jumps late: earlier sums are rescaled
    z[2, 0] = 80.0 * max(scale, 1.0)               # ... or never moves after the first element
    z[3] = 0.5                                     # uniform: entropy log V
    tg = torch.randint(0, v, (c,), generator=g)
    tg[:4] = torch.tensor([v - 1, v - 3, 0, v // 2])
    return z, tg


@pytest.mark.parametrize("v", [1000, 2500])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 30.0])
@pytest.mark.parametrize("block", [256, kh.BLOCK])
def test_row_stats_kernel_matches_torch(interp, v, scale, block):
    z, tg = _logits(7, v, scale)
    z0 = z.clone()
    lp, lse, ent = kh.row_stats(z, tg, True, block=block)
    assert torch.equal(z, z0)                      # one read, z untouched
    rlp, rlse, rent = kh.row_stats_ref_(z.clone(), tg, True)
    assert lp.shape == lse.shape == ent.shape == (7,) and lp.dtype == torch.float32
    torch.testing.assert_close(lse, rlse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lp, rlp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, rent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent[3], torch.tensor(v).log(), rtol=1e-5, atol=1e-5)
    lp2, lse2, ent2 = kh.row_stats(z, tg, False, block=block)
    assert ent2.numel() == 0 and torch.equal(lp2, lp) and torch.equal(lse2, lse)


@pytest.mark.parametrize("v", [1000, 2500])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 30.0])
@pytest.mark.parametrize("block", [256, kh.BLOCK])
def test_grad_logits_kernel_matches_torch(interp, v, scale, block):
    z, tg = _logits(7, v, scale)
    _, lse, _ = kh.row_stats_ref_(z.clone(), tg, False)
    g = torch.randn(7)
    g[4] = 0                                       # a token without gradient: not read, all zero
    want = kh.grad_logits_ref_(z.clone(), lse, g, tg)
    out = kh.grad_logits_(z, lse, g, tg, block=block)
    assert out.data_ptr() == z.data_ptr()          # in place
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)
    assert bool((out[4] == 0).all())
    torch.testing.assert_close(out.sum(-1), torch.zeros(7), rtol=0, atol=1e-5)   # rows of g (onehot - p)


@pytest.mark.parametrize("chunk", [None, 8])
@pytest.mark.parametrize("xdt", [torch.float32, torch.bfloat16])
def test_head_logprobs_triton_equals_torch(interp, monkeypatch, chunk, xdt):
    """HeadLogprob forward / backward through the kernels == through the torch twins (V 2100: a tail block)."""
    calls = []
    for name in ("row_stats", "grad_logits_"):
        fn = getattr(head_logprob, name)
        monkeypatch.setattr(head_logprob, name, lambda *a, _f=fn, _n=name, **k: calls.append(_n) or _f(*a, **k))
    n = 37
    x, w, tg, g = _inputs(n, 16, 2100, xdt)
    out = {}
    for impl in ("torch", "triton"):
        lp, ent = head_logprobs(x, w, tg, chunk, want_entropy=True, impl=impl)
        out[impl] = (lp.detach(), ent, *torch.autograd.grad((lp * g).sum(), (x, w)))
    assert calls.count("row_stats") == calls.count("grad_logits_") == -(-n // (chunk or n))
    for a, b in zip(out["triton"], out["torch"]):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-5 * b.float().abs().max().item())


def test_token_logprobs_triton_path(interp, monkeypatch):
    """The model's learner path with BITMAMBA_HEAD=triton: same log-probs, entropy and grads as before."""
    monkeypatch.setenv("BITMAMBA_HEAD", "triton")
    m = make("tiny-bitmamba2")
    ids, tg = torch.randint(0, 256, (2, 13)), torch.randint(0, 256, (2, 13))
    lp, ent = m.token_logprobs(ids, tg, chunk=5, return_entropy=True)
    lp.sum().backward()
    got = _grads(m)
    m.zero_grad(set_to_none=True)
    lp_o, ent_o = old_token_logprobs(m, ids, tg, 5)
    lp_o.sum().backward()
    torch.testing.assert_close(lp, lp_o.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ent_o.detach(), rtol=1e-5, atol=1e-5)
    for k, want in _grads(m).items():
        torch.testing.assert_close(got[k], want, rtol=1e-4, atol=1e-5 * want.abs().max().item(), msg=k)


def test_impl_dispatch(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("BITMAMBA_HEAD", raising=False)
    assert not kh.use_triton(cpu, torch.float32)                     # auto: torch on CPU, even interpreting
    assert not kh.use_triton(torch.device("cuda"), torch.float64, "triton")   # fp64 always torch
    with pytest.raises(ValueError, match="BITMAMBA_HEAD"):
        kh.use_triton(cpu, torch.float32, "bogus")
    monkeypatch.setenv("BITMAMBA_HEAD", "torch")
    assert not kh.use_triton(torch.device("cuda"), torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="cannot run"):
        kh.use_triton(cpu, torch.float32, "triton")
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)   # fp64 + "triton": the torch twins
    head_logprobs(x, torch.randn(4, 3, dtype=torch.float64), torch.arange(5) % 4, impl="triton")[0].sum().backward()


@pytest.mark.gpu
@pytest.mark.skipif(kh.interpreting(), reason="needs the compiled kernels: run with TRITON_INTERPRET=0")
def test_cuda_kernels_match_torch_at_rl_shapes():
    """On the GPU (compiled): the row kernels vs the torch twins at V 50257."""
    z, tg = _logits(64, 50257, 3.0)
    z, tg = z.cuda(), tg.cuda()
    assert kh.use_triton(z.device, z.dtype)
    got = kh.row_stats(z, tg, True)
    want = kh.row_stats_ref_(z.clone(), tg, True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    g = torch.randn(64, device="cuda")
    g[::4] = 0
    torch.testing.assert_close(kh.grad_logits_(z.clone(), got[1], g, tg), kh.grad_logits_ref_(z, got[1], g, tg),
                               rtol=0, atol=1e-6)
