"""GPU parity of the decode fast path (run on the GPU machine: `pytest -m gpu tests/test_gpu_decode.py`).

Each Triton kernel vs its torch reference at real sizes, the fused Mamba step vs its reference, and
FastBackend (CUDA graphs) vs the model's eval logits in fp32 and bf16, across batch buckets.

bf16 tolerance: a bf16 model keeps the residual stream and in_proj outputs in bf16 (relative rounding
2^-9 ~ 2e-3 per op, over every layer), and the int8 activation quant amplifies that: a value that moves
across a rounding boundary of x * s_x changes one int8 code (1/127 of the row's absmax). The fast path
normalizes in fp32 without the model's intermediate bf16 casts, so the two legitimately differ by a few
bf16 ulps of the logits' scale. The test therefore measures both against the fp32 eval of the same
weights and requires the fast path's error to be no larger than the model's own bf16 error (x1.25).
fp32: see test_fast_backend_graph_vs_model_fp32 (the same int8 code-flip effect, much rarer).
"""

import os

import pytest
import torch

pytestmark = pytest.mark.gpu

DEV = os.environ.get("BITMAMBA_TEST_DEVICE", "cuda")  # "cpu" only to dry-run the backend tests


def _codes(N, K, gen):
    c = torch.randint(0, 3, (N, K), generator=gen, device=DEV).to(torch.uint8).view(N, K // 4, 4)
    return c[..., 0] | (c[..., 1] << 2) | (c[..., 2] << 4) | (c[..., 3] << 6)


@pytest.mark.parametrize("M", [1, 16, 64, 256])
@pytest.mark.parametrize("K,groups", [(2048, 1), (4096, 2), (4096, 1)])
def test_rmsnorm_quant_gpu(M, K, groups):
    from rollout.kernels.act_quant import rmsnorm_quant, rmsnorm_quant_ref

    x = torch.randn(M, K, device=DEV) * 3
    w = torch.randn(K, device=DEV)
    q, s = rmsnorm_quant(x, w, 1e-6, True, groups, impl="triton")
    qr, sr = rmsnorm_quant_ref(x, w, 1e-6, True, groups)
    torch.testing.assert_close(s, sr, rtol=1e-5, atol=0)
    diff = (q.int() - qr.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3   # rsqrt ulps may flip a rare tie
    xb = x.bfloat16()
    n, _ = rmsnorm_quant(xb, w, 1e-6, False, groups, impl="triton")
    nr, _ = rmsnorm_quant_ref(xb, w, 1e-6, False, groups)
    torch.testing.assert_close(n, nr, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("M", [1, 4, 16, 64, 256])
@pytest.mark.parametrize("N,K,gs", [(4096, 2048, 2048), (2048, 4096, 4096), (8288, 2048, 128), (2048, 4096, 128)])
def test_ternary_matmul_gpu(M, N, K, gs):
    from rollout.kernels.ternary_matmul import ternary_matmul, ternary_matmul_ref

    gen = torch.Generator(device=DEV).manual_seed(0)
    codes = _codes(N, K, gen)
    scale = (torch.rand(1, 1, device=DEV) + 0.5) if gs == K else (torch.rand(N, K // gs, device=DEV) + 0.5)
    x = torch.randint(-128, 128, (M, K), device=DEV, dtype=torch.int8)
    s_x = torch.rand(M, device=DEV) * 10 + 1
    y = ternary_matmul(x, s_x, codes, scale, gs, impl="triton")
    yr = ternary_matmul_ref(x, s_x, codes, scale, gs)
    # grouped scales: K / gs fp32 partials (|part / scale| up to ~1e4) are summed in another order than
    # torch's; where they cancel, a few ulps of 1e4 remain (H100: 1 of 32K outputs off by 1.14e-3 at K/gs=32)
    atol = 1e-3 if gs == K else 1e-3 * (K // 2048)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=atol)
    yb = ternary_matmul(x, s_x, codes, scale, gs, out_dtype=torch.bfloat16, impl="triton")
    torch.testing.assert_close(yb.float(), yr, rtol=1e-2, atol=1e-1)
    r = torch.randn(M, N, device=DEV)
    yres = ternary_matmul(x, s_x, codes, scale, gs, residual=r.clone(), impl="triton")
    torch.testing.assert_close(yres, yr + r, rtol=1e-5, atol=atol)
    # W1.58A16: fp32 and bf16 activations
    xf = torch.randn(M, K, device=DEV)
    ya = ternary_matmul(xf, None, codes, scale, gs, impl="triton")
    torch.testing.assert_close(ya, ternary_matmul_ref(xf, None, codes, scale, gs), rtol=1e-4, atol=1e-3)
    xbf = xf.bfloat16()
    yab = ternary_matmul(xbf, None, codes, scale, gs, impl="triton")
    torch.testing.assert_close(yab, ternary_matmul_ref(xbf, None, codes, scale, gs), rtol=1e-3, atol=1e-2)


@pytest.mark.parametrize("M", [1, 3, 8])
@pytest.mark.parametrize("N,K,gs", [(8288, 2048, 2048), (2048, 4096, 128)])
def test_norm_ternary_matmul_fused_gpu(M, N, K, gs):
    from rollout.kernels.act_quant import rmsnorm_quant_ref
    from rollout.kernels.ternary_matmul import norm_ternary_matmul, ternary_matmul_ref

    gen = torch.Generator(device=DEV).manual_seed(0)
    codes = _codes(N, K, gen)
    scale = (torch.rand(1, 1, device=DEV) + 0.5) if gs == K else (torch.rand(N, K // gs, device=DEV) + 0.5)
    x = torch.randn(M, K, device=DEV) * 3
    w = torch.randn(K, device=DEV)
    r = torch.randn(M, N, device=DEV)
    for act_quant in (True, False):
        y = norm_ternary_matmul(x, w, 1e-6, act_quant, codes, scale, gs, residual=r.clone(), impl="triton")
        xq, sx = rmsnorm_quant_ref(x, w, 1e-6, act_quant)
        yr = ternary_matmul_ref(xq, sx, codes, scale, gs, residual=r)
        # an ulp in the row statistics may move a rare int8 code by one: ~|x|max/127 on one product
        torch.testing.assert_close(y, yr, rtol=1e-3, atol=5e-2)


@pytest.mark.parametrize("preset", ["bitmamba2-1b", "mini-agent-hybrid"])
@pytest.mark.parametrize("Bsz", [1, 64])
@pytest.mark.parametrize("ssm_dtype", [torch.float32, torch.bfloat16])
def test_mamba_step_gpu(preset, Bsz, ssm_dtype):
    from model.config import BitMambaConfig
    from rollout.kernels.mamba_step import MambaDims, mamba_step, mamba_step_ref

    d = MambaDims.from_config(BitMambaConfig.preset(preset))
    zx = torch.randn(Bsz, d.d_in_proj, device=DEV)
    conv = torch.randn(Bsz, d.conv_dim, d.d_conv - 1, device=DEV)
    w = torch.randn(d.conv_dim, 1, d.d_conv, device=DEV) * 0.5
    b = torch.randn(d.conv_dim, device=DEV) * 0.1
    dtb = torch.randn(d.n_heads, device=DEV)
    alog = torch.rand(d.n_heads, device=DEV) * 2
    D = torch.randn(d.d_inner if d.d_per_channel else d.n_heads, device=DEV)
    ssm = torch.randn(Bsz, d.n_heads, d.headdim, d.d_state, device=DEV).to(ssm_dtype)
    args = [zx, conv, w, b, dtb, alog, D, ssm]
    ref = [a.clone() for a in args]
    tol = dict(rtol=1e-4, atol=1e-4) if ssm_dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    for _ in range(4):
        g = mamba_step(*args, d, impl="triton")
        gr = mamba_step_ref(*ref, d)
        torch.testing.assert_close(g, gr, **tol)
        torch.testing.assert_close(args[1], ref[1], rtol=0, atol=0)
        torch.testing.assert_close(args[7].float(), ref[7].float(), **tol)
        args[0].normal_()
        ref[0].copy_(args[0])


def _gpu_model(kind: str, dtype):
    from model.config import BitMambaConfig
    from model.lm import BitMambaLM

    small = dict(vocab_size=4096, chunk_size=64)
    cfgs = {
        "bitmamba2": BitMambaConfig.preset("bitmamba2-255m", n_layers=4, **small),
        "hybrid": BitMambaConfig.preset("mini-agent-hybrid", n_layers=6, attn_fraction=0.0, attn_layers=[2],
                                        d_model=512, **small),
        "grouped": BitMambaConfig.preset("mini-agent-scout", n_layers=3,
                                         quant={"weight_scale": "group", "group_size": 128}, **small),
    }
    torch.manual_seed(0)
    m = BitMambaLM(cfgs[kind]).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                p.normal_(1.0, 0.3)
    return m.to(DEV, dtype)


def _teacher_forced(backend, seqs, plen, steps):
    """Prefill each row's prompt, then feed its own continuation; -> logits [steps, rows, V]."""
    backend.allocate(len(seqs), 128)
    for r, s in enumerate(seqs):
        _, st = backend.prefill(s[: plen[r]])
        backend.load_rows(st, torch.tensor([r], device=DEV))
    out = []
    for t in range(steps):
        toks = torch.stack([s[plen[r] + t] for r, s in enumerate(seqs)])
        out.append(backend.step(toks))
    return torch.stack(out)


def _close_in_scale(got, ref, what):
    """Logit parity where int8 code flips can cascade: bounded relative to the logits' spread, and the
    same greedy token almost everywhere. Prints the numbers for the record."""
    diff = (got - ref).abs()
    scale = ref.std()
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean()
    print(f"{what}: logit std {scale:.4f}, |diff| max {diff.max():.4f} mean {diff.mean():.2e}, "
          f"<=1e-4: {(diff <= 1e-4).float().mean():.3f}, greedy agreement {agree:.3f}")
    assert diff.max() <= 0.15 * scale, (what, diff.max(), scale)
    assert diff.mean() <= 0.01 * scale, (what, diff.mean(), scale)
    assert agree >= 0.95, (what, agree)


@pytest.mark.parametrize("kind", ["bitmamba2", "hybrid", "grouped"])
def test_fast_backend_graph_vs_model_fp32(kind, monkeypatch):
    """fp32, with the model's own GPU kernels (mamba-ssm RMSNorm, Triton act-quant and SSD) switched to
    their pure-torch references so that the comparison is about our path.

    On CPU the same comparison holds to 1e-6 (tests/test_fast_backend.py). On an H100 (2026-11-22) the
    FastBackend with the torch *reference* kernels (eager) already differed from model.step for the
    bitmamba2 and hybrid configs (18% of logits beyond 1e-4, max 0.043; the grouped config matched):
    some GPU op rounds differently between the two torch paths (not root-caused: reduction shapes,
    SDPA kernel choice, bucket padding 5 -> 8 rows are the suspects) and a one-ulp change can move an
    int8 activation code, which cascades. Hence scale-relative bounds for both the reference-kernel
    path and the Triton + CUDA-graph path; tightening this is an open item."""
    from rollout.backends import TorchBackend
    from rollout.backends.triton_backend import FastBackend

    for var, val in (("BITMAMBA_NORM", "torch"), ("BITMAMBA_ACTQ", "torch"), ("BITMAMBA_SSD", "ref")):
        monkeypatch.setenv(var, val)
    m = _gpu_model(kind, torch.float32)
    gen = torch.Generator(device=DEV).manual_seed(1)
    seqs = [torch.randint(0, 4096, (40,), device=DEV, generator=gen) for _ in range(5)]
    plen = [7, 3, 12, 1, 9]
    ref = _teacher_forced(TorchBackend(m), seqs, plen, 16)
    plumbing = _teacher_forced(FastBackend(m, use_graphs=False, impl="ref"), seqs, plen, 16)
    _close_in_scale(plumbing, ref, f"{kind} fast(ref kernels) vs model.step")
    fast = _teacher_forced(FastBackend(m), seqs, plen, 16)
    _close_in_scale(fast, ref, f"{kind} fast(triton+graphs) vs model.step")
    _close_in_scale(fast, plumbing, f"{kind} fast(triton+graphs) vs fast(ref kernels)")


@pytest.mark.parametrize("kind", ["bitmamba2", "hybrid"])
def test_fast_backend_graph_vs_model_bf16(kind):
    """bf16: both the fast path and the model's own bf16 eval are compared with the fp32 eval of the
    same (bf16-rounded) weights; the fast path must be no worse than the model's bf16 path.
    Seen on CPU (hybrid): fast 0.0154 mean / 0.099 max abs error, torch bf16 0.0178 / 0.111
    (logit std 0.45), i.e. fast vs torch-bf16 differ by up to ~0.25 std at single positions."""
    from rollout.backends import TorchBackend
    from rollout.backends.triton_backend import FastBackend

    m = _gpu_model(kind, torch.bfloat16)
    m32 = _gpu_model(kind, torch.float32)
    m32.load_state_dict({k: v.float() for k, v in m.state_dict().items()})
    gen = torch.Generator(device=DEV).manual_seed(2)
    seqs = [torch.randint(0, 4096, (40,), device=DEV, generator=gen) for _ in range(3)]
    plen = [5, 11, 2]
    fast = _teacher_forced(FastBackend(m, state_dtype=torch.bfloat16), seqs, plen, 16)
    ref = _teacher_forced(TorchBackend(m, state_dtype=torch.bfloat16), seqs, plen, 16)
    truth = _teacher_forced(TorchBackend(m32), seqs, plen, 16)
    err_fast = (fast - truth).abs()
    err_ref = (ref - truth).abs()
    scale = truth.std()
    assert err_fast.mean() <= 1.25 * err_ref.mean() + 1e-3, (err_fast.mean(), err_ref.mean())
    assert err_fast.max() <= 0.5 * scale, (err_fast.max(), scale)
    assert err_fast.mean() <= 0.08 * scale, (err_fast.mean(), scale)


@pytest.mark.parametrize("slots", [1, 3, 16, 50])
def test_graph_replay_matches_eager_across_buckets(slots):
    from rollout.backends.triton_backend import FastBackend

    m = _gpu_model("hybrid", torch.float32)
    gen = torch.Generator(device=DEV).manual_seed(slots)
    seqs = [torch.randint(0, 4096, (30,), device=DEV, generator=gen) for _ in range(slots)]
    plen = [1 + (7 * r) % 11 for r in range(slots)]
    graphed = FastBackend(m)
    eager = FastBackend(m, use_graphs=False)
    a = _teacher_forced(graphed, seqs, plen, 8)
    b = _teacher_forced(eager, seqs, plen, 8)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # re-allocating the same bucket reuses its graph and resets the state
    a2 = _teacher_forced(graphed, seqs, plen, 8)
    torch.testing.assert_close(a2, a, rtol=0, atol=0)
