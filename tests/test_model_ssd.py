"""Chunked SSD reference vs the sequential oracle; document resets; dispatch."""

import logging

import pytest
import torch

from model import ssd
from model.ssd import ssd_scan, ssd_scan_ref, ssd_sequential_ref


def make_inputs(b=2, l=37, h=4, p=3, g=2, n=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    return dict(x=r(b, l, h, p), dt=r(b, l, h), A=-torch.rand(h, generator=gen) * 3, B=r(b, l, g, n),
                C=r(b, l, g, n), D_head=r(h), D_chan=r(h, p), z=r(b, l, h, p), dt_bias=r(h),
                S0=r(b, h, p, n))


def seq_idx_for(b, l):
    s = torch.zeros(b, l, dtype=torch.int32)
    s[0, 5:] = 1
    s[0, 16:] = 2  # a reset exactly at a chunk start (chunk 8 -> 16)
    s[0, 17:] = 3  # a one-token document
    s[1, l - 1:] = 1  # a reset at the last token
    return s


@pytest.mark.parametrize("chunk", [8, 16, 64])
@pytest.mark.parametrize("use_seq", [False, True])
@pytest.mark.parametrize("d_kind", ["none", "head", "chan"])
@pytest.mark.parametrize("use_z, use_init", [(False, False), (True, True)])
def test_ref_matches_sequential(chunk, use_seq, d_kind, use_z, use_init):
    t = make_inputs()
    b, l = t["x"].shape[:2]
    kw = dict(D={"none": None, "head": t["D_head"], "chan": t["D_chan"]}[d_kind],
              z=t["z"] if use_z else None, dt_bias=t["dt_bias"], initial_states=t["S0"] if use_init else None,
              seq_idx=seq_idx_for(b, l) if use_seq else None, dt_softplus=True, return_final_states=True)
    y1, s1 = ssd_scan_ref(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk, **kw)
    y2, s2 = ssd_sequential_ref(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk, **kw)
    torch.testing.assert_close(y1, y2, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s1, s2, rtol=1e-4, atol=1e-4)
    assert s1.shape == (2, 4, 3, 5) and s1.dtype == torch.float32


def test_gradients_finite_and_equal_with_resets():
    t = make_inputs(l=29)
    seq = seq_idx_for(2, 29)
    grads = []
    for fn in (ssd_scan_ref, ssd_sequential_ref):
        leaves = {k: t[k].clone().requires_grad_() for k in ("x", "dt", "A", "B", "C", "D_chan", "dt_bias", "S0")}
        y, s = fn(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"], 8, D=leaves["D_chan"],
                  dt_bias=leaves["dt_bias"], initial_states=leaves["S0"], seq_idx=seq, dt_softplus=True,
                  return_final_states=True)
        (y.square().sum() + s.sum()).backward()
        grads.append({k: v.grad for k, v in leaves.items()})
    for k in grads[0]:
        assert torch.isfinite(grads[0][k]).all(), k
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-3, atol=1e-3, msg=k)


def test_packed_documents_equal_separate_runs():
    t = make_inputs(b=1, l=20)
    seq = torch.zeros(1, 20, dtype=torch.int32)
    seq[0, 9:] = 1
    args = lambda sl: (t["x"][:, sl], t["dt"][:, sl], t["A"], t["B"][:, sl], t["C"][:, sl], 8)  # noqa: E731
    kw = dict(D=t["D_head"], dt_bias=t["dt_bias"], dt_softplus=True)
    packed = ssd_scan_ref(*args(slice(None)), seq_idx=seq, **kw)
    a = ssd_scan_ref(*args(slice(0, 9)), **kw)
    b = ssd_scan_ref(*args(slice(9, 20)), **kw)
    torch.testing.assert_close(packed, torch.cat([a, b], 1), rtol=1e-5, atol=1e-5)


def test_canonical_seq_idx():
    from model.ssd import canonical_seq_idx

    s = torch.tensor([[4, 4, 1, 1, 4, 9], [0, 0, 0, 0, 0, 0]])
    assert canonical_seq_idx(s).tolist() == [[0, 0, 1, 1, 2, 3], [0] * 6]
    assert canonical_seq_idx(s).dtype == torch.int32


def test_split_with_initial_state_equals_one_call():
    t = make_inputs()
    x, dt, A, B, C = t["x"], t["dt"], t["A"], t["B"], t["C"]
    kw = dict(dt_bias=t["dt_bias"], dt_softplus=True, return_final_states=True)
    y, s = ssd_scan_ref(x, dt, A, B, C, 8, **kw)
    y1, s1 = ssd_scan_ref(x[:, :13], dt[:, :13], A, B[:, :13], C[:, :13], 8, **kw)
    y2, s2 = ssd_scan_ref(x[:, 13:], dt[:, 13:], A, B[:, 13:], C[:, 13:], 8, initial_states=s1, **kw)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s2, s, rtol=1e-5, atol=1e-5)


def test_dt_limit_and_dtype():
    t = make_inputs(l=10)
    kw = dict(dt_bias=t["dt_bias"], dt_softplus=True, dt_limit=(0.01, 0.5))
    y1 = ssd_scan_ref(t["x"].bfloat16(), t["dt"], t["A"], t["B"], t["C"], 4, **kw)
    y2 = ssd_sequential_ref(t["x"].bfloat16(), t["dt"], t["A"], t["B"], t["C"], 4, **kw)
    assert y1.dtype == torch.bfloat16
    torch.testing.assert_close(y1.float(), y2.float(), rtol=2e-2, atol=2e-2)
    unclamped = ssd_scan_ref(t["x"], t["dt"], t["A"], t["B"], t["C"], 4, dt_bias=t["dt_bias"], dt_softplus=True)
    assert (unclamped - y1.float()).abs().max() > 0.05  # the limit changes the result


def test_dispatch_cpu_ref_logged_once_and_forcing(monkeypatch, caplog):
    t = make_inputs(l=6)
    args = (t["x"], t["dt"], t["A"], t["B"], t["C"], 4)
    monkeypatch.setattr(ssd, "_logged", set())
    monkeypatch.delenv("BITMAMBA_SSD", raising=False)
    with caplog.at_level(logging.INFO, logger="model.ssd"):
        y = ssd_scan(*args)
        ssd_scan(*args)
    assert [r.getMessage() for r in caplog.records].count("SSD scan: pure-torch reference (cpu)") == 1
    torch.testing.assert_close(y, ssd_scan_ref(*args))
    monkeypatch.setenv("BITMAMBA_SSD", "bogus")
    with pytest.raises(ValueError, match="BITMAMBA_SSD"):
        ssd_scan(*args)
    monkeypatch.setenv("BITMAMBA_SSD", "ref")
    torch.testing.assert_close(ssd_scan(*args), y)


def test_forcing_triton_without_mamba_ssm_fails_loudly(monkeypatch):
    from model import _mamba_ssm

    if _mamba_ssm.available():
        pytest.skip("mamba-ssm is installed here")
    t = make_inputs(l=6)
    monkeypatch.setenv("BITMAMBA_SSD", "triton")
    with pytest.raises(ImportError):
        ssd_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], 4)


class _FakeCuda:
    is_cuda = True
    device = torch.device("cpu")


def test_cuda_without_mamba_ssm_warns_once(monkeypatch, caplog):
    from model import _mamba_ssm

    monkeypatch.setattr(ssd, "_logged", set())
    monkeypatch.delenv("BITMAMBA_SSD", raising=False)
    monkeypatch.setattr(_mamba_ssm, "available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="model.ssd"):
        assert ssd._backend(_FakeCuda()) == "ref"
        assert ssd._backend(_FakeCuda()) == "ref"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "SLOW pure-torch reference" in warnings[0].getMessage()
    monkeypatch.setattr(_mamba_ssm, "available", lambda: True)
    assert ssd._backend(_FakeCuda()) == "triton"


def test_selective_scan_cuda_placeholder():
    import sys

    from model import _mamba_ssm

    saved = sys.modules.pop("selective_scan_cuda", None)
    try:
        _mamba_ssm._install_placeholder()
        mod = sys.modules["selective_scan_cuda"]
        with pytest.raises(RuntimeError, match="placeholder"):
            mod.fwd()
        _mamba_ssm._install_placeholder()  # idempotent: keeps the same module
        assert sys.modules["selective_scan_cuda"] is mod
    finally:
        sys.modules.pop("selective_scan_cuda", None)
        if saved is not None:
            sys.modules["selective_scan_cuda"] = saved


_INTERPRET_SCRIPT = r"""
import contextlib, json, os, types
import torch
import triton.runtime.autotuner as autotuner
# CPU-only shims for mamba-ssm's host code (test-only): no autotune benchmarking, no CUDA device queries
autotuner.Autotuner._bench = lambda self, *a, config=None, **k: [1.0, 1.0, 1.0]
torch.cuda.device = lambda idx: contextlib.nullcontext()
torch.cuda.get_device_properties = lambda d: types.SimpleNamespace(multi_processor_count=4)
from model.ssd import ssd_scan, ssd_scan_ref
out = {}
for layout, (g, n, dshape) in {"standard": (1, 16, (2,)), "bitmamba2": (2, 1, (2, 16))}.items():
    gen = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen)
    b, l, h, p = 2, 48, 2, 16
    t = [r(b, l, h, p), r(b, l, h), -torch.rand(h, generator=gen) * 2, r(b, l, g, n), r(b, l, g, n), r(*dshape),
         r(h), r(b, h, p, n), r(b, l, h, p)]
    seq = torch.zeros(b, l, dtype=torch.int32)
    seq[0, 20:] = 1; seq[0, 32:] = 2; seq[1, 47:] = 1  # resets inside a chunk, at a chunk edge, at the end
    res = {}
    for name, fn in (("triton", ssd_scan), ("ref", ssd_scan_ref)):
        os.environ["BITMAMBA_SSD"] = "triton" if name == "triton" else "ref"
        lv = [x.clone().requires_grad_() for x in t]
        y, s = fn(*lv[:5], 32, D=lv[5], dt_bias=lv[6], initial_states=lv[7], z=lv[8], seq_idx=seq,
                  return_final_states=True, dt_softplus=True)
        ((y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum() + s.sum()).backward()
        res[name] = [y, s] + [x.grad for x in lv]
    out[layout] = [((a - b_).norm() / b_.norm()).item() for a, b_ in zip(res["triton"], res["ref"])]
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_mamba_ssm_triton_kernel_in_interpreter_matches_ref(tmp_path):
    """The real mamba-ssm Triton SSD kernels (via our dispatch and argument conventions), run by Triton's CPU
    interpreter, equal ssd_scan_ref in forward, final states and every gradient: standard layout and the
    BitMamba-2 layout (d_state 1, D per channel, z gate), with initial states and document resets."""
    import importlib.util
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    if importlib.util.find_spec("mamba_ssm") is None:
        pytest.skip("mamba-ssm not installed (MAMBA_SKIP_CUDA_BUILD=TRUE pip install mamba-ssm==2.3.2.post1)")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(root)] + sys.path)}
    proc = subprocess.run([sys.executable, "-c", _INTERPRET_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    names = ["y", "final_state", "dx", "ddt", "dA", "dB", "dC", "dD", "ddt_bias", "dinitial_states", "dz"]
    for layout, errs in result.items():
        for name, err in zip(names, errs):
            assert err < 1e-4, (layout, name, err)
