"""Import mamba-ssm's Triton Mamba-2 kernels without its compiled CUDA extension.

mamba-ssm 2.3.2's package `__init__` imports the compiled `selective_scan_cuda` (Mamba-1 only)
without a guard, so `mamba_ssm.ops.triton.*` cannot be imported when the package was installed with
MAMBA_SKIP_CUDA_BUILD=TRUE. We install a placeholder module under that name first (ANCHORS §2);
anything that really needs the CUDA extension then fails loudly when called, not at import.
"""

from __future__ import annotations

import importlib
import sys
import types
from functools import lru_cache


def _install_placeholder() -> None:
    if "selective_scan_cuda" in sys.modules:
        return
    try:
        importlib.import_module("selective_scan_cuda")
        return
    except ImportError:
        pass
    mod = types.ModuleType("selective_scan_cuda")
    mod.__doc__ = "placeholder installed by model/_mamba_ssm.py (mamba-ssm built without CUDA extensions)"

    def _missing(*args, **kwargs):
        raise RuntimeError("selective_scan_cuda is a placeholder: mamba-ssm was installed without its "
                           "CUDA extension; only the Triton Mamba-2 kernels are usable")

    mod.fwd = _missing
    mod.bwd = _missing
    sys.modules["selective_scan_cuda"] = mod


@lru_cache(maxsize=None)
def mamba_chunk_scan_combined():
    """Return mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined (ImportError if absent)."""
    _install_placeholder()
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as fn

    return fn


@lru_cache(maxsize=None)
def rmsnorm_fn():
    """Return mamba_ssm.ops.triton.layernorm_gated.rmsnorm_fn (fused (gated) RMSNorm, fwd + bwd)."""
    _install_placeholder()
    from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn as fn

    return fn


@lru_cache(maxsize=None)
def mamba2_module():
    """Return mamba_ssm.modules.mamba2.Mamba2 (for benchmarks against the unquantized stack)."""
    _install_placeholder()
    from mamba_ssm.modules.mamba2 import Mamba2

    return Mamba2


@lru_cache(maxsize=None)
def available() -> bool:
    """True if the Triton SSD kernel can be imported (answer cached: failed imports are not)."""
    try:
        mamba_chunk_scan_combined()
        return True
    except ImportError:
        return False
