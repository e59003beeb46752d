"""Decode backends, the seam between the engine (`rollout/engine.py`) and the fast path:
`base` (the protocol and shared helpers), `torch_backend` (pure torch, the reference), `triton_backend`
(packed 2-bit weights, Triton kernels, CUDA graphs). `make_backend` picks one.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from model.errors import BitMambaError
from rollout.backends.torch_backend import TorchBackend

if TYPE_CHECKING:
    from model.lm import BitMambaLM

log = logging.getLogger(__name__)


_logged_choice: set[str] = set()


def _log_once(msg: str) -> None:
    if msg not in _logged_choice:
        _logged_choice.add(msg)
        log.info(msg)


def make_backend(model: "BitMambaLM", kind: str = "auto", state_dtype: torch.dtype = torch.float32,
                 ssm_dtype: torch.dtype | None = None):
    """Pick a decode backend; the choice is logged once. `ssm_dtype` (default: `state_dtype`) is the SSM
    state's dtype: bf16 halves the decode step's largest memory traffic, at some rollout/learner mismatch.

    "torch": TorchBackend. "fast": rollout.backends.triton_backend.FastBackend, on any device (on CPU it runs its
    reference kernels eagerly, for tests); raises `BitMambaError` when it cannot be imported or
    refuses the model, never falls back. "auto": FastBackend on CUDA when it imports and accepts the
    model, else TorchBackend (on CUDA with a warning saying why).
    """
    if kind not in ("auto", "torch", "fast"):
        raise BitMambaError(f"backend: unknown kind {kind!r} (auto | torch | fast)")
    device = next(model.parameters()).device
    if kind == "torch":
        _log_once("decode backend: torch (asked for)")
        return TorchBackend(model, state_dtype=state_dtype, ssm_dtype=ssm_dtype)
    if kind == "auto" and device.type != "cuda":
        _log_once("decode backend: torch (auto, no CUDA)")
        return TorchBackend(model, state_dtype=state_dtype, ssm_dtype=ssm_dtype)
    why = None
    try:
        from rollout.backends.triton_backend import FastBackend
        from rollout.kernels._dispatch import FastPathUnavailable
    except ImportError as e:  # the fast path is optional: say why it is missing
        why = f"cannot import rollout.backends.triton_backend.FastBackend ({e})"
    else:
        try:
            backend = FastBackend(model, state_dtype=state_dtype, ssm_dtype=ssm_dtype or state_dtype)
        except FastPathUnavailable as e:
            why = str(e)
        else:
            _log_once(f"decode backend: fast ({kind}, {device.type})")
            return backend
    if kind == "fast":
        raise BitMambaError(f"backend 'fast' is not available: {why}")
    log.warning("decode backend: torch (auto): the fast path is unavailable on CUDA: %s; decoding will be slow",
                why)
    return TorchBackend(model, state_dtype=state_dtype, ssm_dtype=ssm_dtype)
