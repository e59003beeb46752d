"""Kernel dispatch: Triton on CUDA, the pure-torch reference on CPU, said once in the log.

    impl = resolve("ternary_matmul", x.device, impl)   # -> "triton" | "ref"

`impl` (per call) or the environment variable `BITMAMBA_KERNELS` (`auto` | `triton` | `ref`) forces a
choice. Asking for "triton" where it cannot run (no CUDA and no `TRITON_INTERPRET=1`, or no triton)
raises `FastPathUnavailable`; there is never a silent fallback to the reference.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("rollout.kernels")

IMPLS = ("auto", "triton", "ref")
_said: set[tuple[str, str, str]] = set()


class FastPathUnavailable(RuntimeError):
    """The Triton fast path was asked for but cannot run here."""


def interpreting() -> bool:
    """True when Triton runs kernels on CPU tensors (TRITON_INTERPRET=1, read at kernel definition)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve(kernel: str, device: torch.device | str, impl: str | None = None) -> str:
    """Pick "triton" or "ref" for `kernel` on `device`; log the choice once per (kernel, device, choice)."""
    device = torch.device(device)
    impl = impl or os.environ.get("BITMAMBA_KERNELS", "auto") or "auto"
    if impl not in IMPLS:
        raise ValueError(f"kernel impl must be one of {IMPLS}, got {impl!r} (argument or BITMAMBA_KERNELS)")
    if impl == "auto":
        impl = "triton" if device.type == "cuda" and triton_available() else "ref"
    if impl == "triton":
        if not triton_available():
            raise FastPathUnavailable(f"{kernel}: triton is not installed")
        if device.type != "cuda" and not interpreting():
            raise FastPathUnavailable(
                f"{kernel}: the Triton kernel needs CUDA tensors (got {device}); set TRITON_INTERPRET=1 "
                "before importing rollout.kernels to run it on CPU in Triton's interpreter"
            )
    key = (kernel, device.type, impl)
    if key not in _said:
        _said.add(key)
        log.info("kernel %s on %s: using %s", kernel, device.type, impl)
    return impl


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
