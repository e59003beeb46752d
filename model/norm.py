"""RMSNorm and gated RMSNorm (pure torch, computed in fp32, output in the input dtype).

`GatedRMSNorm` follows mamba-ssm's `RMSNormGated(norm_before_gate=False)`:
    out = rmsnorm(y * silu(z)) * weight, normalized over groups of `group_size` channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """x / sqrt(mean(x^2, -1) + eps) * weight, in fp32; returns x.dtype. x [..., D], weight [D]."""
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        out = out * weight.float()
    return out.to(x.dtype)


def gated_rms_norm(y: Tensor, z: Tensor, weight: Tensor, eps: float, group_size: int) -> Tensor:
    """rmsnorm(y * silu(z)) per group of `group_size` channels, times weight. y, z [..., D]."""
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
