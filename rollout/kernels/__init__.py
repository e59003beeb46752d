"""Decode-time kernels, each a Triton kernel beside its pure-torch reference (the test oracle).

    rmsnorm_quant / rmsnorm_quant_ref          fused RMSNorm + per-token int8 quant      (act_quant.py)
    ternary_matmul / ternary_matmul_ref        packed 2-bit ternary matmul               (ternary_matmul.py)
    norm_ternary_matmul                        the two above in one launch for M <= 8    (ternary_matmul.py)
    mamba_step / mamba_step_ref                fused one-token Mamba-2 recurrence        (mamba_step.py)

Dispatch (`_dispatch.resolve`): Triton on CUDA, the reference on CPU, logged once; `impl=` or
BITMAMBA_KERNELS=triton|ref forces one; "triton" where it cannot run raises FastPathUnavailable.
Triton's interpreter (TRITON_INTERPRET=1, set before importing this package) runs the kernels on CPU.
"""

from rollout.kernels._dispatch import FastPathUnavailable, resolve
from rollout.kernels.act_quant import rmsnorm_quant, rmsnorm_quant_ref
from rollout.kernels.mamba_step import MambaDims, mamba_step, mamba_step_ref
from rollout.kernels.ternary_matmul import norm_ternary_matmul, ternary_matmul, ternary_matmul_ref

__all__ = ["FastPathUnavailable", "resolve", "rmsnorm_quant", "rmsnorm_quant_ref", "ternary_matmul",
           "ternary_matmul_ref", "norm_ternary_matmul", "mamba_step", "mamba_step_ref", "MambaDims"]
