"""Decode kernels (rollout/kernels) vs their pure-torch references, in Triton's interpreter on CPU.

TRITON_INTERPRET=1 must be set before the kernels are defined: tests/conftest.py sets it (no CUDA) before any import.
Small shapes only (the interpreter is slow); real sizes run in tests/test_gpu_decode.py.
"""



import pytest  # noqa: E402
import torch  # noqa: E402

from rollout.kernels import _dispatch  # noqa: E402
from rollout.kernels.act_quant import rmsnorm_quant, rmsnorm_quant_ref  # noqa: E402
from rollout.kernels.mamba_step import MambaDims, mamba_step, mamba_step_ref  # noqa: E402
from rollout.kernels.ternary_matmul import ternary_matmul, ternary_matmul_ref, unpack_codes  # noqa: E402

INTERP = _dispatch.interpreting()
needs_interp = pytest.mark.skipif(not INTERP, reason="rollout.kernels was imported before TRITON_INTERPRET=1 was set")


@needs_interp
@pytest.mark.parametrize("M", [1, 3, 17])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("has_norm", [True, False])
def test_rmsnorm_quant_matches_ref(M, groups, has_norm):
    K = 96
    x = torch.randn(M, K) * 4
    w = torch.randn(K) if has_norm else None
    q, s = rmsnorm_quant(x, w, 1e-6, True, groups, impl="triton")
    qr, sr = rmsnorm_quant_ref(x, w, 1e-6, True, groups)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert torch.equal(q, qr)
    torch.testing.assert_close(s, sr, rtol=1e-6, atol=0)
    n, none = rmsnorm_quant(x, w, 1e-6, False, groups, impl="triton")
    nr, _ = rmsnorm_quant_ref(x, w, 1e-6, False, groups)
    assert none is None
    torch.testing.assert_close(n, nr, rtol=1e-6, atol=1e-6)


def test_rmsnorm_quant_ref_matches_bitlinear_formula():
    from model.bitlinear import act_quant
    from model.norm import rms_norm

    x = torch.randn(5, 64)
    w = torch.randn(64)
    q, s = rmsnorm_quant_ref(x, w, 1e-5, True)
    qm, sm = act_quant(rms_norm(x, w, 1e-5))
    assert torch.equal(q.float(), qm)
    torch.testing.assert_close(s, sm[:, 0], rtol=1e-6, atol=0)


def test_round_half_away_ties():
    from rollout.kernels.act_quant import round_half_away

    x = torch.tensor([[0.5, -0.5, 1.5, -2.5, 0.49]])

    assert round_half_away(x).tolist() == [[1.0, -1.0, 2.0, -3.0, 0.0]]


def _rand_layer(N, K, group_size):
    codes = torch.randint(0, 3, (N, K)).to(torch.uint8)          # code = w + 1
    c = codes.view(N, K // 4, 4)
    packed = c[..., 0] | (c[..., 1] << 2) | (c[..., 2] << 4) | (c[..., 3] << 6)
    scale = torch.rand(1, 1) + 0.5 if group_size == K else torch.rand(N, K // group_size) + 0.5
    return packed, scale, codes.to(torch.int8) - 1


def test_unpack_matches_model_packing():
    from model.bitlinear import pack_ternary, unpack_ternary

    w = torch.randint(-1, 2, (8, 32)).to(torch.int8)
    p = pack_ternary(w)
    assert torch.equal(unpack_codes(p, 32), w)
    assert torch.equal(unpack_ternary(p, 32), w)


@needs_interp
@pytest.mark.parametrize("M", [1, 5, 24])
@pytest.mark.parametrize("K,gs", [(256, 256), (256, 128), (132, 132)])
def test_ternary_matmul_int8_exact(M, K, gs):
    N = 40
    packed, scale, _ = _rand_layer(N, K, gs)
    x = torch.randint(-128, 128, (M, K), dtype=torch.int8)
    s_x = torch.rand(M) * 10 + 1
    y = ternary_matmul(x, s_x, packed, scale, gs, impl="triton")
    yr = ternary_matmul_ref(x, s_x, packed, scale, gs)
    if gs == K:
        assert torch.equal(y, yr)   # one division of an exact int32 sum: bitwise equal
    else:
        torch.testing.assert_close(y, yr, rtol=1e-6, atol=1e-5)


@needs_interp
@pytest.mark.parametrize("M", [2, 20])
def test_ternary_matmul_a16_and_residual(M):
    N, K, gs = 24, 256, 128
    packed, scale, _ = _rand_layer(N, K, gs)
    x = torch.randn(M, K)
    r = torch.randn(M, N)
    y = ternary_matmul(x, None, packed, scale, gs, residual=r, impl="triton")
    yr = ternary_matmul_ref(x, None, packed, scale, gs, residual=r)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-4)
    # in place: out aliases the residual (the fast backend's residual stream)
    r2 = r.clone()
    ternary_matmul(x, None, packed, scale, gs, residual=r2, out=r2, impl="triton")
    torch.testing.assert_close(r2, yr, rtol=1e-5, atol=1e-4)


def test_ternary_matmul_ref_matches_bitlinear_eval():
    from model.bitlinear import BitLinear
    from model.config import QuantConfig
    for quant in (QuantConfig(), QuantConfig(weight_scale="group", group_size=32),
                  QuantConfig(activation="none")):
        lin = BitLinear(64, 48, quant, norm=True, norm_eps=1e-6).eval()
        with torch.no_grad():
            lin.norm.weight.normal_()
            x = torch.randn(7, 64)
            want = lin(x)
            p = lin.pack()
            xq, sx = rmsnorm_quant_ref(x, p.norm_weight, p.norm_eps, p.act_quant)
            got = ternary_matmul_ref(xq, sx, p.codes, p.scale, p.group_size)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_dispatch_refuses_triton_without_cuda_or_interpreter(monkeypatch):
    monkeypatch.setattr(_dispatch, "interpreting", lambda: False)
    with pytest.raises(_dispatch.FastPathUnavailable):
        _dispatch.resolve("x", "cpu", "triton")
    assert _dispatch.resolve("x", "cpu", None) == "ref"
    monkeypatch.setenv("BITMAMBA_KERNELS", "triton")
    with pytest.raises(_dispatch.FastPathUnavailable):
        _dispatch.resolve("x", "cpu", None)


def _mamba_inputs(d: MambaDims, Bsz, state_dtype=torch.float32):
    zx = torch.randn(Bsz, d.d_in_proj)
    conv = torch.randn(Bsz, d.conv_dim, d.d_conv - 1).to(state_dtype)
    w = torch.randn(d.conv_dim, 1, d.d_conv) * 0.5
    b = torch.randn(d.conv_dim) * 0.1
    dtb = torch.randn(d.n_heads)
    alog = torch.rand(d.n_heads) * 2
    D = torch.randn(d.d_inner if d.d_per_channel else d.n_heads)
    ssm = torch.randn(Bsz, d.n_heads, d.headdim, d.d_state).to(state_dtype)
    return zx, conv, w, b, dtb, alog, D, ssm


LAYOUTS = {
    "standard": MambaDims(d_inner=64, n_heads=4, headdim=16, ngroups=1, d_state=16, d_conv=4, conv_bc=True,
                          d_per_channel=False),
    "standard-g2": MambaDims(d_inner=64, n_heads=4, headdim=16, ngroups=2, d_state=8, d_conv=4, conv_bc=True,
                             d_per_channel=False),
    "bitmamba2": MambaDims(d_inner=64, n_heads=4, headdim=16, ngroups=4, d_state=1, d_conv=4, conv_bc=False,
                           d_per_channel=True),
}


@needs_interp
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_mamba_step_matches_ref(layout, state_dtype):
    d = LAYOUTS[layout]
    args = _mamba_inputs(d, 3, state_dtype)
    ref_args = [a.clone() for a in args]
    for _ in range(3):  # a few steps: the states must evolve identically
        g = mamba_step(*args, d, impl="triton")
        gr = mamba_step_ref(*ref_args, d)
        tol = dict(rtol=1e-5, atol=1e-5) if state_dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)  # 1-2 bf16 ulps of the stored state
        torch.testing.assert_close(g, gr, **tol)
        torch.testing.assert_close(args[1], ref_args[1], **tol)   # conv state
        torch.testing.assert_close(args[7], ref_args[7], **tol)   # ssm state
        args[0].normal_()
        ref_args[0].copy_(args[0])


@pytest.mark.parametrize("preset", ["tiny", "tiny-bitmamba2"])
def test_mamba_step_ref_matches_mixer_step(preset):
    from model.config import BitMambaConfig
    from model.mamba2 import Mamba2Mixer
    from model.norm import gated_rms_norm

    cfg = BitMambaConfig.preset(preset)
    mixer = Mamba2Mixer(cfg, 0).eval()
    d = MambaDims.from_config(cfg)
    st = mixer.allocate_state(2)
    st.conv.normal_()
    st.ssm.normal_()
    conv2, ssm2 = st.conv.clone(), st.ssm.clone()
    with torch.no_grad():
        if mixer.norm is not None:
            mixer.norm.weight.normal_()
        u = torch.randn(2, cfg.d_model)
        want = mixer.step(u, st)
        zx = mixer.in_proj(u)
        g = mamba_step_ref(zx, conv2, mixer.conv1d.weight, mixer.conv1d.bias, mixer.dt_bias, mixer.A_log,
                           mixer.D, ssm2, d)
        if mixer.norm is not None:
            z = zx[:, : d.d_inner]
            # model: gated_rms_norm(y, z); ours: the norm of g = y * silu(z) (same math)
            y = g / torch.nn.functional.silu(z)
            ref_in = gated_rms_norm(y, z, mixer.norm.weight, mixer.norm.eps, mixer.norm.group_size)
            torch.testing.assert_close(
                rmsnorm_quant_ref(g, mixer.norm.weight, mixer.norm.eps, False, cfg.ngroups)[0], ref_in,
                rtol=1e-5, atol=1e-5)
            got = mixer.out_proj(ref_in)
        else:
            got = mixer.out_proj(g)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(conv2, st.conv, rtol=0, atol=0)
    torch.testing.assert_close(ssm2, st.ssm, rtol=0, atol=0)


@needs_interp
@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("K,gs", [(256, 256), (256, 128), (132, 132)])
@pytest.mark.parametrize("has_norm", [True, False])
@pytest.mark.parametrize("act_quant", [True, False])
def test_norm_ternary_matmul_fused_matches_two_kernels(M, K, gs, has_norm, act_quant):
    from rollout.kernels.ternary_matmul import norm_ternary_matmul

    N = 24
    packed, scale, _ = _rand_layer(N, K, gs)
    x = torch.randn(M, K) * 3
    w = torch.randn(K) if has_norm else None
    r = torch.randn(M, N)
    y = norm_ternary_matmul(x, w, 1e-6, act_quant, packed, scale, gs, residual=r, impl="triton")
    xq, sx = rmsnorm_quant_ref(x, w, 1e-6, act_quant)
    yr = ternary_matmul_ref(xq, sx, packed, scale, gs, residual=r)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("K,gs", [(64, 64), (132, 132), (256, 128), (2048, 128), (4096, 4096), (4608, 4608),
                                  (96, 32)])
def test_kernel_layout_round_trip_and_slices(K, gs):
    """words (kernel layout) unpack to the same weights as the model packing; slice j of chunk c holds
    W consecutive columns, and W divides the scale group (so no slice straddles a group)."""
    from rollout.kernels.ternary_matmul import kernel_layout, layout_width, unpack_words

    N = 6
    packed, _, w = _rand_layer(N, K, gs)
    words = kernel_layout(packed, K, gs)
    W = layout_width(K, gs)
    assert words.dtype == torch.int32 and words.shape == (N, -(-K // (16 * W)) * W)
    assert gs == K or gs % W == 0
    assert torch.equal(unpack_words(words, K, gs), w)
    j, i = 3, 1                                        # column j*W + i of chunk 0 is bits 2j..2j+1 of word i
    if j * W + i < K:
        assert ((words[:, i] >> (2 * j)) & 3).to(torch.int8).sub(1).equal(w[:, j * W + i])


def test_kernel_layout_rejects_bad_codes():
    from rollout.kernels.ternary_matmul import kernel_layout

    with pytest.raises(ValueError, match="uint8 codes"):
        kernel_layout(torch.zeros(4, 8, dtype=torch.int32), 32, 32)
    with pytest.raises(ValueError, match="kernel-layout words"):
        ternary_matmul(torch.zeros(1, 64), None, torch.zeros(4, 3, dtype=torch.int32), torch.ones(1, 1), 64,
                       impl="ref")


@needs_interp
@pytest.mark.parametrize("M", [1, 2])
def test_gemv_long_rows_padding_and_multi_tile_prologue(M):
    """K = 4608: three chunks of 2048 columns (the last one padded) and a norm prologue that loops over
    tiles of 4096; words and model codes give the same result."""
    from rollout.kernels.ternary_matmul import kernel_layout, norm_ternary_matmul

    N, K = 8, 4608
    packed, scale, _ = _rand_layer(N, K, K)
    words = kernel_layout(packed, K, K)
    x = torch.randn(M, K) * 3
    w = torch.randn(K)
    r = torch.randn(M, N)
    y = norm_ternary_matmul(x, w, 1e-6, True, words, scale, K, residual=r, impl="triton")
    xq, sx = rmsnorm_quant_ref(x, w, 1e-6, True)
    torch.testing.assert_close(y, ternary_matmul_ref(xq, sx, packed, scale, K, residual=r), rtol=1e-5, atol=1e-4)
    yi = ternary_matmul(xq, sx, words, scale, K, impl="triton")
    assert torch.equal(yi, ternary_matmul_ref(xq, sx, packed, scale, K))


@needs_interp
@pytest.mark.parametrize("B,V", [(1, 7), (3, 1024), (5, 2500)])
def test_hash_uniform_kernel_is_bitwise_the_torch_reference(B, V):
    """The sampling noise's hash in one Triton kernel: integer-exact, so the uniforms (and the
    Exponential draws built from them) equal the torch reference bit for bit, for keys of any sign and
    size and a vocabulary that does not fill the last block."""
    from rollout.kernels.hash_noise import hash_uniform, hash_uniform_ref
    from rollout.sampling import sample_seed

    keys = torch.tensor([sample_seed(s, i) for s, i in zip(range(B), range(7, 7 + B))], dtype=torch.int64)
    keys[0] = -(1 << 62) + 12345                       # a negative key
    counters = torch.arange(B, dtype=torch.int64) * 977 + 3
    u = hash_uniform(keys, counters, V, impl="triton")
    ref = hash_uniform_ref(keys, counters, V)
    assert u.shape == (B, V) and u.dtype == torch.float32
    assert torch.equal(u, ref)
    assert float(u.min()) > 0.0 and float(u.max()) < 1.0
    assert len(torch.unique(u)) > 0.99 * B * V             # distinct draws, not a constant
