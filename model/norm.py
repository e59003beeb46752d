"""RMSNorm and gated RMSNorm (pure torch, computed in fp32, output in the input dtype).

`GatedRMSNorm` follows mamba-ssm's `RMSNormGated(norm_before_gate=False)`:
    out = rmsnorm(y * silu(z)) * weight, normalized over groups of `group_size` channels.

Backends: pure torch (CPU, and the test oracle) or, for CUDA tensors with mamba-ssm installed, its fused
Triton kernel `layernorm_gated.rmsnorm_fn` (same math in fp32, forward and backward). The choice is logged
once; `BITMAMBA_NORM=torch|triton` forces one; CUDA without mamba-ssm warns once.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model import _mamba_ssm

log = logging.getLogger(__name__)
_logged: set[str] = set()


def _backend(x: Tensor) -> str:
    forced = os.environ.get("BITMAMBA_NORM", "").strip().lower()
    if forced not in ("", "torch", "triton"):
        raise ValueError(f"BITMAMBA_NORM must be 'torch' or 'triton', got {forced!r}")
    if forced == "triton":
        _mamba_ssm.rmsnorm_fn()  # ImportError propagates: asked for, not available
        backend = "triton"
    elif forced == "torch" or not x.is_cuda:
        backend = "torch"
    elif _mamba_ssm.available():
        backend = "triton"
    else:
        backend = "torch"
        if "warned" not in _logged:
            _logged.add("warned")
            log.warning("RMSNorm: CUDA tensors but mamba-ssm is not importable; using the slower pure-torch norm")
    if backend not in _logged:
        _logged.add(backend)
        log.info("RMSNorm backend: %s%s", backend, " (forced by BITMAMBA_NORM)" if forced else "")
    return backend


def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """x / sqrt(mean(x^2, -1) + eps) * weight, in fp32; returns x.dtype. x [..., D], weight [D]."""
    if weight is not None and _backend(x) == "triton":
        return _mamba_ssm.rmsnorm_fn()(x, weight, None, z=None, eps=eps, group_size=None, norm_before_gate=True)
    return rms_norm_ref(x, weight, eps)


def rms_norm_ref(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """Pure-torch rms_norm."""
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        out = out * weight.float()
    return out.to(x.dtype)


def gated_rms_norm(y: Tensor, z: Tensor, weight: Tensor, eps: float, group_size: int) -> Tensor:
    """rmsnorm(y * silu(z)) per group of `group_size` channels, times weight. y, z [..., D] -> y.dtype."""
    if _backend(y) == "triton":
        return _mamba_ssm.rmsnorm_fn()(y, weight, None, z=z, eps=eps, group_size=group_size, norm_before_gate=False)
    return gated_rms_norm_ref(y, z, weight, eps, group_size)


def gated_rms_norm_ref(y: Tensor, z: Tensor, weight: Tensor, eps: float, group_size: int) -> Tensor:
    """Pure-torch gated_rms_norm."""
    g = y.float() * F.silu(z.float())
    shape = g.shape
    g = g.reshape(*shape[:-1], shape[-1] // group_size, group_size)
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)
    return (g.reshape(shape) * weight.float()).to(y.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class GatedRMSNorm(nn.Module):
    """mamba-ssm RMSNormGated(norm_before_gate=False): rmsnorm(y * silu(z)), grouped."""

    def __init__(self, dim: int, eps: float = 1e-5, group_size: int | None = None):
        super().__init__()
        self.eps = eps
        self.group_size = group_size or dim
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        return gated_rms_norm(y, z, self.weight, self.eps, self.group_size)
