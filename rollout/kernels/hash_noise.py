"""The sampling noise's counter-based hash (`rollout.sampling.hash_exponential_noise`) in one kernel.

    u = hash_uniform(keys, counters, vocab_size)      # [B, V] fp32 in (0, 1), 24-bit
    u_ref = hash_uniform_ref(keys, counters, vocab_size)

splitmix64 of (key * c1 + counter * c2 + token * c3) with wrapping int64 arithmetic, then the top
24 bits as (k + 0.5) / 2^24. The torch reference runs it as ~17 element-wise int64 passes over
[B, V] (at 512 rows x 50K tokens, about 7 GB of memory traffic per decode step); the Triton kernel
computes it in registers and writes the fp32 uniforms once. Both are integer-exact, so the two give
bitwise the same uniforms (tested in the interpreter, and on CUDA against the CPU reference).
"""

from __future__ import annotations

import torch

from rollout.kernels._dispatch import resolve

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def _i64(c: int) -> int:
    """An unsigned 64-bit constant as the signed int64 with the same bits."""
    return c - (1 << 64) if c >= 1 << 63 else c


C_KEY, C_COUNT, C_TOKEN = _i64(0x9E3779B97F4A7C15), _i64(0xD1B54A32D192ED03), _i64(0xC2B2AE3D27D4EB4F)
C_MIX1, C_MIX2 = _i64(0xBF58476D1CE4E5B9), _i64(0x94D049BB133111EB)


def _lsr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def hash_uniform_ref(keys: torch.Tensor, counters: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """keys, counters [B] int64 -> [B, V] fp32 uniforms (pure torch)."""
    v = torch.arange(vocab_size, device=keys.device, dtype=torch.int64)
    x = keys.long()[:, None] * C_KEY + counters.long()[:, None] * C_COUNT + v[None, :] * C_TOKEN
    x = x ^ _lsr(x, 30)
    x = x * C_MIX1
    x = x ^ _lsr(x, 27)
    x = x * C_MIX2
    x = x ^ _lsr(x, 31)
    return (_lsr(x, 40).float() + 0.5) * (1.0 / (1 << 24))


def hash_uniform(keys: torch.Tensor, counters: torch.Tensor, vocab_size: int, impl: str | None = None) -> torch.Tensor:
    """keys, counters [B] int64 -> [B, V] fp32 uniforms; Triton on CUDA, the reference on CPU."""
    if keys.shape != counters.shape or keys.dim() != 1:
        raise ValueError(f"hash_uniform: keys {tuple(keys.shape)} and counters {tuple(counters.shape)} must be "
                         "the same [B]")
    if resolve("hash_noise", keys.device, impl) == "ref":
        return hash_uniform_ref(keys, counters, vocab_size)
    B = keys.shape[0]
    u = torch.empty(B, vocab_size, device=keys.device, dtype=torch.float32)
    if B and vocab_size:
        BLOCK = 1024
        _hash_uniform_kernel[(B, triton.cdiv(vocab_size, BLOCK))](
            keys.long().contiguous(), counters.long().contiguous(), u, vocab_size,
            C_KEY, C_COUNT, C_TOKEN, C_MIX1, C_MIX2, BLOCK=BLOCK)
    return u


if triton is not None:

    @triton.jit
    def _lsr_tl(x, k: tl.constexpr):
        return (x >> k) & ((1 << (64 - k)) - 1)

    @triton.jit
    def hash_uniform_tl(key, count, v, c_key, c_count, c_token, c_mix1, c_mix2):
        """The uniforms of token ids v (a block) for one (key, counter), in registers (also used by
        rollout/kernels/sample_fused.py)."""
        x = key * c_key + count * c_count + v.to(tl.int64) * c_token
        x = x ^ _lsr_tl(x, 30)
        x = x * c_mix1
        x = x ^ _lsr_tl(x, 27)
        x = x * c_mix2
        x = x ^ _lsr_tl(x, 31)
        return (_lsr_tl(x, 40).to(tl.float32) + 0.5) * (1.0 / 16777216.0)

    @triton.jit
    def _hash_uniform_kernel(keys_ptr, counters_ptr, u_ptr, V, c_key, c_count, c_token, c_mix1, c_mix2,
                             BLOCK: tl.constexpr):
        row = tl.program_id(0)
        v = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        u = hash_uniform_tl(tl.load(keys_ptr + row), tl.load(counters_ptr + row), v, c_key, c_count, c_token,
                            c_mix1, c_mix2)
        tl.store(u_ptr + row.to(tl.int64) * V + v, u, mask=v < V)
