"""BitLinear: quantization formulas, STE gradients, exact eval path, packing, zero ratio."""

import pytest
import torch
import torch.nn.functional as F

from model.bitlinear import (BitLinear, pack_ternary, packed_linear_ref, round_half_away, unpack_ternary,
                             weight_quant)
from model.config import QuantConfig

TENSOR = QuantConfig()
GROUP = QuantConfig(weight_scale="group", group_size=8)


def manual_eval(x, w, group_size=None, act=True, norm_w=None, eps=1e-5):
    """The packed engine's formula written out in float64."""
    x = x.double()
    if norm_w is not None:
        x = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * norm_w.double()
    w = w.double()
    gs = group_size or w.shape[1]
    wg = w.reshape(w.shape[0], -1, gs)
    if group_size is None:
        s = (1 / w.abs().mean().clamp(min=1e-5)).expand(w.shape[0], 1)
    else:
        s = 1 / wg.abs().mean(-1).clamp(min=1e-5)
    codes = (torch.sign(wg * s[..., None]) * torch.floor((wg * s[..., None]).abs() + 0.5)).clamp(-1, 1)
    if act:
        sx = 127 / (x.abs().amax(-1, keepdim=True) + 1e-5)
        xq = (torch.sign(x * sx) * torch.floor((x * sx).abs() + 0.5)).clamp(-128, 127)
    else:
        sx, xq = torch.ones_like(x[..., :1]), x
    xg = xq.reshape(*x.shape[:-1], -1, gs)
    y = torch.einsum("ngk,ogk->nog", xg, codes) / s  # per-group partial sums / group scale
    return y.sum(-1) / sx


def test_round_half_away():
    x = torch.tensor([0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 0.49, 0.0])
    assert round_half_away(x).tolist() == [1, -1, 2, -2, 3, -3, 0, 0]


@pytest.mark.parametrize("quant, gs", [(TENSOR, None), (GROUP, 8)])
@pytest.mark.parametrize("norm", [False, True])
def test_eval_equals_manual_int8_ternary_formula(quant, gs, norm):
    layer = BitLinear(32, 12, quant, norm=norm).eval()
    if norm:
        with torch.no_grad():
            layer.norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(5, 7, 32) * 3
    with torch.no_grad():
        y = layer(x)
    ref = manual_eval(x.reshape(-1, 32), layer.weight, gs, True, layer.norm.weight if norm else None)
    torch.testing.assert_close(y.reshape(-1, 12).double(), ref, rtol=1e-5, atol=1e-5)


def test_training_forward_matches_eval_numbers():
    layer = BitLinear(32, 12, GROUP)
    x = torch.randn(4, 32)
    y_train = layer(x)
    with torch.no_grad():
        y_eval = layer.eval()(x)
    torch.testing.assert_close(y_train.detach(), y_eval, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("quant", [TENSOR, GROUP, QuantConfig(activation="none")])
def test_ste_gradients(quant):
    """d loss / d latent W equals d loss / d W_eff, and d loss / d x passes straight through."""
    layer = BitLinear(16, 8, quant)
    x = torch.randn(6, 16, requires_grad=True)
    g = torch.randn(6, 8)
    (layer(x) * g).sum().backward()
    codes, s = weight_quant(layer.weight.detach(), layer.group_size)
    w_eff = (codes / (s if s.shape == (1, 1) else s.repeat_interleave(16 // s.shape[1], 1))).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    if layer.act_quant:
        sx = 127 / (x2.detach().abs().amax(-1, keepdim=True) + 1e-5)
        xq = round_half_away(x2.detach() * sx).clamp(-128, 127) / sx
        x_eff = x2 + (xq - x2).detach()
    else:
        x_eff = x2
    (F.linear(x_eff, w_eff) * g).sum().backward()
    torch.testing.assert_close(layer.weight.grad, w_eff.grad)
    torch.testing.assert_close(x.grad, x2.grad)
    assert layer.weight.grad.abs().sum() > 0


def test_weight_quant_scales():
    w = torch.randn(4, 16)
    codes, s = weight_quant(w, None)
    assert s.shape == (1, 1)
    torch.testing.assert_close(s[0, 0], 1 / w.abs().mean())
    codes_g, s_g = weight_quant(w, 8)
    assert s_g.shape == (4, 2)
    torch.testing.assert_close(s_g, 1 / w.reshape(4, 2, 8).abs().mean(-1))
    assert set(codes_g.unique().tolist()) <= {-1.0, 0.0, 1.0}
    # zero weights: scale clamped, codes 0
    c0, s0 = weight_quant(torch.zeros(2, 4), None)
    assert (c0 == 0).all() and s0.item() == pytest.approx(1e5)


def test_pack_layout_and_roundtrip():
    codes = torch.tensor([[-1, 0, 1, 1, 0, 0, 0, -1]], dtype=torch.int8)
    packed = pack_ternary(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (1, 2)
    assert packed[0, 0].item() == 0 | (1 << 2) | (2 << 4) | (2 << 6)
    assert packed[0, 1].item() == 1 | (1 << 2) | (1 << 4) | (0 << 6)
    rnd = torch.randint(-1, 2, (7, 24), dtype=torch.int8)
    assert torch.equal(unpack_ternary(pack_ternary(rnd)), rnd)
    with pytest.raises(ValueError):
        pack_ternary(torch.zeros(2, 6))
    with pytest.raises(ValueError):
        unpack_ternary(torch.full((1, 1), 3, dtype=torch.uint8))  # code 3 is invalid


@pytest.mark.parametrize("quant", [TENSOR, GROUP, QuantConfig(activation="none")])
def test_pack_reproduces_eval(quant):
    layer = BitLinear(32, 10, quant, norm=True, norm_eps=1e-6).eval()
    p = layer.pack()
    assert p.codes.shape == (10, 8) and p.in_features == 32 and p.out_features == 10
    assert p.scale.shape == ((10, 4) if quant.weight_scale == "group" else (1, 1))
    assert p.group_size == (8 if quant.weight_scale == "group" else 32)
    assert p.act_quant == (quant.activation == "int8") and p.norm_eps == 1e-6
    x = torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(packed_linear_ref(x, p), layer(x), rtol=0, atol=0)


def test_zero_ratio():
    layer = BitLinear(8, 2, TENSOR)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.01, -1.0, 0.02, 1.0, 1.0, 0.0, -1.0],
                                         [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]]))
    codes, _ = weight_quant(layer.weight, None)
    assert layer.zero_ratio() == pytest.approx(float((codes == 0).float().mean()))
    assert layer.zero_ratio() == pytest.approx(3 / 16)


def test_non_ternary_is_plain_linear():
    layer = BitLinear(10, 6, QuantConfig(ternary=False), norm=True)
    x = torch.randn(4, 10)
    ref = F.linear(x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5), layer.weight)
    torch.testing.assert_close(layer(x), ref)
    with torch.no_grad():
        torch.testing.assert_close(layer.eval()(x), ref)
    with pytest.raises(ValueError, match="ternary"):
        layer.pack()


def test_autocast_keeps_quantization_in_fp32():
    """Under bf16 autocast the codes/scales are those of fp32 math; only the matmul runs in bf16."""
    layer = BitLinear(64, 16, GROUP)
    x = torch.randn(8, 64)
    y32 = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = layer(x)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32.detach(), rtol=2e-2, atol=2e-2)


_ACTQ_SCRIPT = r"""
import torch
from model.bitlinear import act_quant_dequant_ref, act_quant_dequant_triton
torch.manual_seed(0)
for K in (4, 100, 1024, 3000):
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(7, K) * torch.logspace(-3, 3, 7)[:, None]).to(dtype)
        x[3] = 0  # an all-zero row
        x[4, 0] = 0.5 * 127 / (x[4].float().abs().max() + 1e-5)  # lands on a rounding tie... or close to it
        y_t, y_r = act_quant_dequant_triton(x), act_quant_dequant_ref(x)
        assert y_t.dtype == dtype and y_t.shape == x.shape
        if dtype == torch.float32:
            assert torch.equal(y_t, y_r), (K, dtype, (y_t.float() - y_r.float()).abs().max())
        else:  # the CPU interpreter's fp32 -> bf16 cast may truncate (CUDA rounds to nearest: GPU test)
            ulp = torch.finfo(torch.bfloat16).eps * y_r.float().abs().clamp_min(1e-30)
            assert ((y_t.float() - y_r.float()).abs() <= ulp).all(), (K, dtype)
    xs = torch.randn(5, 2 * K)[:, ::2]  # strided input
    assert torch.equal(act_quant_dequant_triton(xs), act_quant_dequant_ref(xs))
print("OK")
"""


def test_act_quant_triton_kernel_equals_torch_twin(tmp_path):
    """The fused Triton activation-quantization kernel (run by Triton's CPU interpreter here) returns
    exactly the pure-torch numbers for fp32 (odd widths, zero rows, strided input); bf16 within 1 ulp."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(root)] + sys.path)}
    proc = subprocess.run([sys.executable, "-c", _ACTQ_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]


def test_act_quant_backend_forcing(monkeypatch):
    from model import bitlinear

    x = torch.randn(3, 8)
    monkeypatch.setenv("BITMAMBA_ACTQ", "bogus")
    with pytest.raises(ValueError, match="BITMAMBA_ACTQ"):
        bitlinear.act_quant_ste(x)
    monkeypatch.setenv("BITMAMBA_ACTQ", "torch")
    torch.testing.assert_close(bitlinear.act_quant_ste(x), bitlinear.act_quant_dequant_ref(x), rtol=0, atol=0)


def test_model_import_does_not_import_triton_on_cpu(tmp_path):
    """Triton fixes its interpreter mode when kernels are defined: a CPU process importing the model must
    leave triton alone so later TRITON_INTERPRET=1 users (rollout kernel tests) still work."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    if torch.cuda.is_available():
        pytest.skip("with CUDA the model imports triton on purpose")
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + sys.path)
    # import + build only: at run time torch itself may import triton (torch._dynamo, loaded by
    # non-reentrant checkpointing); pytest imports every test module (which sets TRITON_INTERPRET) first
    code = ("import sys, torch, model, model.lm, model.checkpoint, model.ssd, model.norm\n"
            "m = model.lm.BitMambaLM(model.config.BitMambaConfig.preset('tiny-hybrid'))\n"
            "print('triton' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def test_eval_code_cache_follows_in_place_weight_changes():
    """The cached eval quantization must never go stale: optimizer steps, load_state_dict and .to() refresh it."""
    from model.bitlinear import BitLinear

    torch.manual_seed(0)
    layer = BitLinear(64, 32).eval()
    x = torch.randn(3, 64)

    def fresh(lay):  # what the eval path must compute: a quantization of the current weight
        ref = BitLinear(64, 32).eval()
        ref.load_state_dict(lay.state_dict())
        ref._eval_cache = None
        with torch.no_grad():
            return ref(x)

    with torch.no_grad():
        y0 = layer(x)
    assert layer._eval_cache is not None
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer.train()
    layer(x).pow(2).sum().backward()
    opt.step()
    layer.eval()
    with torch.no_grad():
        y1 = layer(x)
    assert not torch.equal(y0, y1) and torch.equal(y1, fresh(layer))
    other = BitLinear(64, 32)
    layer.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert torch.equal(layer(x), fresh(layer))
    layer.double()
    with torch.no_grad():
        assert layer(x.double()).dtype == torch.float64


@pytest.mark.parametrize("group", [None, 32])
def test_int_mm_eval_path_equals_fp32_path(group):
    """The int8 tensor-core path (used on CUDA for prefill) gives bitwise the fp32 path's numbers."""
    from model.bitlinear import _exact_ternary_matmul, weight_quant

    torch.manual_seed(0)
    w = torch.randn(48, 128)
    codes, s = weight_quant(w, group)
    x = torch.randn(2, 40, 128) * 3
    y_int = _exact_ternary_matmul(x, codes.to(torch.int8), s, True, int_mm=True)
    y_f32 = _exact_ternary_matmul(x, codes.float(), s, True, int_mm=False)
    assert y_int.shape == (2, 40, 48)
    assert torch.equal(y_int, y_f32)


def test_int_mm_refusal_falls_back_to_same_numbers_with_one_warning(monkeypatch, caplog):
    """cuBLAS can refuse an int8 problem (CUBLAS_STATUS_NOT_SUPPORTED was seen on the H100 under a
    2 GiB memory cap): the eval path then computes the same sums in fp32 and says so once; other
    RuntimeErrors still propagate."""
    import model.bitlinear as bl

    torch.manual_seed(1)
    codes, s = bl.weight_quant(torch.randn(48, 128), 32)
    x = torch.randn(40, 128)
    want = bl._exact_ternary_matmul(x, codes.float(), s, True, int_mm=False)

    def refuse(a, b):
        raise RuntimeError("CUDA error: CUBLAS_STATUS_NOT_SUPPORTED when calling cublasLtMatmul")

    monkeypatch.setattr(torch, "_int_mm", refuse)
    monkeypatch.setattr(bl, "_warned", set())
    with caplog.at_level("WARNING", logger="model.bitlinear"):
        for _ in range(2):
            assert torch.equal(bl._exact_ternary_matmul(x, codes.to(torch.int8), s, True, int_mm=True), want)
    assert sum("_int_mm refused [40x128] @ [128x48]" in r.message for r in caplog.records) == 1

    def broken(a, b):
        raise RuntimeError("something else")

    monkeypatch.setattr(torch, "_int_mm", broken)
    with pytest.raises(RuntimeError, match="something else"):
        bl._exact_ternary_matmul(x, codes.to(torch.int8), s, True, int_mm=True)


@pytest.mark.parametrize("ternary_head", [True, False])
def test_bf16_training_runs_projections_in_bf16_and_the_head_in_fp32(monkeypatch, ternary_head):
    """A bf16 learner's BitLinear matmuls run in bf16 (tensor cores on GPU; they used to be upcast to fp32),
    while the head computes fp32 logits from the bf16 trunk (log-probs for the RL ratio)."""
    from model.config import BitMambaConfig
    from model.lm import BitMambaLM

    torch.manual_seed(0)
    model = BitMambaLM(BitMambaConfig.preset("tiny", ternary_head=ternary_head)).to(torch.bfloat16).train()
    ids = torch.randint(0, 256, (2, 12))
    calls, real = [], F.linear
    monkeypatch.setattr(F, "linear", lambda x, w, b=None: calls.append((x.dtype, w.dtype)) or real(x, w, b))
    lp = model.token_logprobs(ids, ids.roll(-1, 1))
    assert lp.dtype == torch.float32 and torch.isfinite(lp).all()
    assert calls[-1] == (torch.float32, torch.float32)                   # the head
    assert set(calls[:-1]) == {(torch.bfloat16, torch.bfloat16)}         # every projection of the trunk
    lp.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for _, m in model.bitlinears()
               for p in [m.weight])
    # the head's fp32 logits equal an fp32 head on the same (bf16) hidden states
    with torch.no_grad():
        h = model.hidden_states(ids).float()
        head = model.lm_head.float()
        ref = torch.log_softmax(head.forward_with_weight(h, head.effective_weight()), -1)
        ref = ref.gather(-1, ids.roll(-1, 1)[..., None])[..., 0]
    assert (lp.detach() - ref).abs().max() < 1e-4
