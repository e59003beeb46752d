"""RMSNorm / gated RMSNorm: formulas, and mamba-ssm's fused Triton kernel equals the torch twin."""

import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model import norm
from model.norm import gated_rms_norm, rms_norm


def test_rms_norm_formula():
    x, w = torch.randn(3, 5, 16), torch.rand(16) + 0.5
    ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    torch.testing.assert_close(rms_norm(x, w, 1e-6), ref)
    assert rms_norm(x.bfloat16(), w, 1e-6).dtype == torch.bfloat16


def test_gated_rms_norm_groups():
    """mamba-ssm semantics (norm_before_gate=False): rmsnorm(y * silu(z)) per group of channels."""
    y, z, w = torch.randn(2, 3, 12), torch.randn(2, 3, 12), torch.rand(12) + 0.5
    g = y * F.silu(z)
    parts = [gi / torch.sqrt(gi.pow(2).mean(-1, keepdim=True) + 1e-5) for gi in g.split(4, dim=-1)]
    torch.testing.assert_close(gated_rms_norm(y, z, w, 1e-5, 4), torch.cat(parts, -1) * w)
    one_group = g / torch.sqrt(g.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    torch.testing.assert_close(gated_rms_norm(y, z, w, 1e-5, 12), one_group)
    assert (gated_rms_norm(y, z, w, 1e-5, 4) - one_group).abs().max() > 1e-3  # groups matter


def test_backend_choice_and_forcing(monkeypatch, caplog):
    monkeypatch.setattr(norm, "_logged", set())
    monkeypatch.delenv("BITMAMBA_NORM", raising=False)
    x = torch.randn(2, 8)
    with caplog.at_level(logging.INFO, logger="model.norm"):
        assert norm._backend(x) == "torch"
        norm._backend(x)
    assert sum("RMSNorm backend: torch" in r.getMessage() for r in caplog.records) == 1
    monkeypatch.setenv("BITMAMBA_NORM", "nope")
    with pytest.raises(ValueError, match="BITMAMBA_NORM"):
        norm._backend(x)


_SCRIPT = r"""
import contextlib, os, types
import torch
import triton.runtime.autotuner as autotuner
autotuner.Autotuner._bench = lambda self, *a, config=None, **k: [1.0, 1.0, 1.0]
torch.cuda.device = lambda idx: contextlib.nullcontext()
torch.cuda.get_device_properties = lambda d: types.SimpleNamespace(multi_processor_count=4)
from model.norm import gated_rms_norm, gated_rms_norm_ref, rms_norm, rms_norm_ref
os.environ["BITMAMBA_NORM"] = "triton"
worst = 0.0
for dtype in (torch.float32, torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 64, generator=g).to(dtype)
    z = torch.randn(2, 7, 64, generator=g).to(dtype)
    w = torch.rand(64, generator=g) + 0.5
    for fast, ref, args in ((rms_norm, rms_norm_ref, ()), (gated_rms_norm, gated_rms_norm_ref, (16,))):
        outs = []
        for fn in (fast, ref):
            xi, zi, wi = (t.clone().requires_grad_() for t in (x, z, w))
            y = fn(xi, wi, 1e-5) if not args else fn(xi, zi, wi, 1e-5, *args)
            (y.float() * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
            outs.append([y] + [t.grad for t in (xi, wi)] + ([zi.grad] if args else []))
        assert outs[0][0].dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        for a, b in zip(*outs):
            err = ((a.float() - b.float()).norm() / b.float().norm()).item()
            assert err < tol, (fast.__name__, dtype, err)
            worst = max(worst, err if dtype == torch.float32 else 0.0)
print("OK", worst)
"""


@pytest.mark.slow
def test_mamba_ssm_triton_norm_in_interpreter_matches_torch(tmp_path):
    if importlib.util.find_spec("mamba_ssm") is None:
        pytest.skip("mamba-ssm not installed")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(root)] + sys.path)}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
