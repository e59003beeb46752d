"""BitLinear: ternary (1.58-bit) linear layer with quantization-aware training (BitNet b1.58).

Formulas (docs/DESIGN.md, ANCHORS §1), all computed in fp32 (also under autocast):
    weights   s   = 1 / max(mean|W|, 1e-5)         per tensor, or per (row, group of group_size inputs)
              W_t = clip(round_half_away(W * s), -1, 1);  effective W_t / s
    acts      s_x = 127 / (max|x| + 1e-5)           per token (row of x)
              x_q = clip(round_half_away(x * s_x), -128, 127);  effective x_q / s_x
Training (module.training or grad enabled): straight-through estimator, y = x_eff @ W_eff^T, with
`w + (q(w) - w).detach()` so d loss / d W = d loss / d W_eff, and an identity backward for x_eff.
Eval mode under no_grad: exactly what the packed path computes, in fp32:
    y = (x_q @ W_t^T) / (s_x * s)        grouped: sum_g (x_q[:, g] @ W_t[:, g]^T) / s[:, g] / s_x
An optional own RMSNorm (`norm=True`) acts on the input before quantization.
The training path's activation quantization runs as one fused Triton kernel on CUDA
(`act_quant_dequant_triton`) beside its pure-torch twin (`act_quant_dequant_ref`, used on CPU); the
choice is logged once and `BITMAMBA_ACTQ=torch|triton` forces one. Both give identical fp32 numbers.
`quant.ternary=False` makes it a plain linear layer (still with the optional norm).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import QuantConfig
from model.errors import ConfigError
from model.norm import RMSNorm, rms_norm

log = logging.getLogger(__name__)
_logged: set[str] = set()


def round_half_away(x: Tensor) -> Tensor:
    """sign(x) * floor(|x| + 0.5) (the engine's rounding; torch.round rounds half to even)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def weight_quant(w: Tensor, group_size: int | None) -> tuple[Tensor, Tensor]:
    """Absmean ternary quantization of w [out, in] (any dtype; computed in fp32).

    Returns codes (fp32 values in {-1, 0, 1}) [out, in] and scale s fp32: [1, 1] per tensor
    (group_size None) or [out, in // group_size].
    """
    wf = w.float()
    if group_size is None:
        s = 1.0 / wf.abs().mean().clamp(min=1e-5).reshape(1, 1)
        codes = round_half_away(wf * s).clamp(-1, 1)
        return codes, s
    out_f, in_f = wf.shape
    wg = wf.reshape(out_f, in_f // group_size, group_size)
    s = 1.0 / wg.abs().mean(-1).clamp(min=1e-5)  # [out, G]
    codes = round_half_away(wg * s[..., None]).clamp(-1, 1).reshape(out_f, in_f)
    return codes, s


def expand_scale(s: Tensor, in_features: int) -> Tensor:
    """Scale [out, G] or [1, 1] -> broadcastable to [out, in]."""
    if s.shape == (1, 1):
        return s
    return s.repeat_interleave(in_features // s.shape[1], dim=1)


def act_quant(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token int8 absmax: x [..., in] -> (x_q fp32 integer values [..., in], s_x fp32 [..., 1])."""
    xf = x.float()
    den = xf.abs().amax(-1, keepdim=True) + 1e-5
    s_x = torch.full_like(den, 127.0) / den  # true division (`127.0 / t` is reciprocal * 127 in torch)
    x_q = round_half_away(xf * s_x).clamp(-128, 127)
    return x_q, s_x


def act_quant_dequant_ref(x: Tensor) -> Tensor:
    """x_q / s_x computed in fp32 (pure torch), returned in x.dtype. x [..., in]."""
    x_q, s_x = act_quant(x)
    return (x_q / s_x).to(x.dtype)


# Triton is imported (and the kernel defined) only where it can run: with CUDA, or under TRITON_INTERPRET=1.
# Importing triton.language on a CPU-only process would fix its interpreter mode for the whole process (Triton
# decides it when a kernel is defined), breaking later TRITON_INTERPRET=1 users in the same process.
TRITON_OK = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if TRITON_OK:
    import triton
    import triton.language as tl

    @triton.jit
    def _act_quant_dequant_kernel(X, Y, K, stride_x, stride_y, BLOCK: tl.constexpr):
        """One row per program: y = clip(round_half_away(x * s), -128, 127) / s, s = 127 / (max|x| + 1e-5)."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < K
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        den = tl.zeros([BLOCK], dtype=tl.float32) + (tl.max(tl.abs(x), axis=0) + 1e-5)  # row scalar, as a block
        s = tl.math.div_rn(tl.full([BLOCK], 127.0, tl.float32), den)  # correctly rounded, like the engine
        v = x * s
        q = tl.where(v >= 0, tl.floor(v + 0.5), -tl.floor(-v + 0.5))
        q = tl.minimum(tl.maximum(q, -128.0), 127.0)
        tl.store(Y + row * stride_y + cols, tl.math.div_rn(q, s).to(Y.dtype.element_ty), mask=mask)


def act_quant_dequant_triton(x: Tensor) -> Tensor:
    """Fused Triton twin of `act_quant_dequant_ref` (one kernel instead of ~12 elementwise ops)."""
    if not TRITON_OK:
        raise RuntimeError("act_quant_dequant_triton needs CUDA or TRITON_INTERPRET=1 set before importing "
                           "model.bitlinear")
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        block = triton.next_power_of_2(K)
        warps = 4 if block <= 2048 else (8 if block <= 8192 else 16)
        _act_quant_dequant_kernel[(x2.shape[0],)](x2, y, K, x2.stride(0), y.stride(0), BLOCK=block,
                                                  num_warps=warps)
    return y.reshape(x.shape)


def _act_backend(x: Tensor) -> str:
    forced = os.environ.get("BITMAMBA_ACTQ", "").strip().lower()
    if forced not in ("", "torch", "triton"):
        raise ValueError(f"BITMAMBA_ACTQ must be 'torch' or 'triton', got {forced!r}")
    backend = forced or ("triton" if x.is_cuda else "torch")
    if backend not in _logged:
        _logged.add(backend)
        log.info("BitLinear activation quantization (training path): %s%s", backend,
                 " (forced by BITMAMBA_ACTQ)" if forced else "")
    return backend


class _ActQuantSTE(torch.autograd.Function):
    """Forward: x_q / s_x (fp32 math, output in x.dtype); backward: straight-through (identity)."""

    @staticmethod
    def forward(ctx, x):
        return act_quant_dequant_triton(x) if _act_backend(x) == "triton" else act_quant_dequant_ref(x)

    @staticmethod
    def backward(ctx, g):
        return g


def act_quant_ste(x: Tensor) -> Tensor:
    """Straight-through int8 per-token activation quantization, x [..., in] -> same shape and dtype."""
    return _ActQuantSTE.apply(x)


def _linear(x: Tensor, w: Tensor) -> Tensor:
    """x @ w^T in the wider of the two dtypes (autocast decides itself), output in x's dtype: bf16 x bf16
    runs in bf16; an fp32 input (the head's, for fp32 log-probs) against bf16 weights runs in fp32."""
    if torch.is_autocast_enabled(x.device.type):
        return F.linear(x, w)
    dt = torch.promote_types(x.dtype, w.dtype)
    return F.linear(x.to(dt), w.to(dt)).to(x.dtype)


def pack_ternary(codes: Tensor) -> Tensor:
    """Ternary codes [out, in] (values -1/0/1, any dtype) -> uint8 [out, in // 4].

    code = w + 1 in {0, 1, 2}; byte = c0 | c1 << 2 | c2 << 4 | c3 << 6 (the .bin layout).
    """
    if codes.dim() != 2 or codes.shape[1] % 4:
        raise ValueError(f"pack_ternary: need [out, in] with in % 4 == 0, got {tuple(codes.shape)}")
    c = (codes.to(torch.int16) + 1).to(torch.uint8).reshape(codes.shape[0], -1, 4)
    if (c > 2).any():
        raise ValueError("pack_ternary: codes must be in {-1, 0, 1}")
    return c[..., 0] | (c[..., 1] << 2) | (c[..., 2] << 4) | (c[..., 3] << 6)


def unpack_ternary(packed: Tensor, in_features: int | None = None) -> Tensor:
    """uint8 [out, in // 4] -> int8 codes in {-1, 0, 1} [out, in]. Inverse of pack_ternary."""
    p = packed.to(torch.uint8)
    parts = [((p >> (2 * k)) & 3) for k in range(4)]
    codes = torch.stack(parts, dim=-1).reshape(p.shape[0], -1).to(torch.int8) - 1
    if in_features is not None and codes.shape[1] != in_features:
        raise ValueError(f"unpack_ternary: packed width {p.shape[1]} does not give {in_features} inputs")
    if (codes > 1).any():
        raise ValueError("unpack_ternary: invalid code 3 in packed data")
    return codes


@dataclass
class PackedTernary:
    """A BitLinear exported for inference (see docs/DESIGN.md)."""

    codes: Tensor  # uint8 [out, in // 4]
    scale: Tensor  # fp32 [out, n_groups] or [1, 1]: s = 1 / mean|W|
    in_features: int
    out_features: int
    group_size: int  # == in_features for per-tensor
    norm_weight: Tensor | None  # fp32 [in] or None
    norm_eps: float
    act_quant: bool

    def unpack(self) -> Tensor:
        """int8 codes [out, in]."""
        return unpack_ternary(self.codes, self.in_features)


def packed_linear_ref(x: Tensor, p: PackedTernary) -> Tensor:
    """Pure-torch inference of a PackedTernary on x [..., in] -> fp32 [..., out] (the eval formula)."""
    if p.norm_weight is not None:
        x = rms_norm(x.float(), p.norm_weight, p.norm_eps)
    codes = p.unpack().float()
    return _exact_ternary_matmul(x, codes, p.scale, p.act_quant)


def _group_sums(part, s: Tensor, gs: int) -> Tensor:
    """sum over scale groups g of part(columns of g) / s[:, g]."""
    y = None
    for g in range(s.shape[1]):
        t = part(slice(g * gs, (g + 1) * gs)) / s[:, g]
        y = t if y is None else y + t
    return y


_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        log.warning(msg)


def _exact_ternary_matmul(x: Tensor, codes: Tensor, s: Tensor, quant_act: bool, int_mm: bool | None = None) -> Tensor:
    """(x_q @ codes^T) / (s_x * s) in fp32, grouped by the shape of s. x [..., in] -> [..., out].

    codes: int8 or float [out, in]. With int8 activations and `int_mm` (default: on CUDA, for more than
    16 rows) the integer sums come from `torch._int_mm` (int8 tensor cores, exact int32): the same
    numbers as the fp32 matmul of the integer-valued operands (exact below 2^24), many times faster.
    """
    lead = x.shape[:-1]
    xf = x.reshape(-1, x.shape[-1]).float()
    if quant_act:
        xq, s_x = act_quant(xf)
    else:
        xq, s_x = xf, None
    M, K = xq.shape
    N = codes.shape[0]
    gs = K // s.shape[1]                      # s: [1, 1] per tensor, [out, groups] grouped
    if int_mm is None:
        int_mm = x.is_cuda
    y = None
    if int_mm and quant_act and M > 16 and gs % 8 == 0 and N % 8 == 0:
        xi, ci = xq.to(torch.int8), codes.to(torch.int8)
        try:
            y = _group_sums(lambda sl: torch._int_mm(xi[:, sl].contiguous(), ci[:, sl].contiguous().t()).float(),
                            s, gs)
        except RuntimeError as e:   # cuBLAS refuses some int8 problems (seen under a near-full memory cap)
            if "CUBLAS_STATUS" not in str(e):
                raise
            _warn_once(f"torch._int_mm refused [{M}x{K}] @ [{K}x{N}] int8 ({str(e).splitlines()[0][:120]}); "
                       "computing the same integer sums with the fp32 matmul")
    if y is None:
        cf = codes.float()
        y = _group_sums(lambda sl: xq[:, sl] @ cf[:, sl].t(), s, gs)
    if s_x is not None:
        y = y / s_x
    return y.reshape(*lead, N)


class BitLinear(nn.Module):
    """Linear layer with ternary weights and int8 activations (QAT via STE). No bias.

    x [..., in] -> y [..., out]. Parameters: `weight` [out, in] (latent, high precision) and
    `norm.weight` [in] if `norm`. The scale is always recomputed from the latent weight.
    """

    def __init__(self, in_features: int, out_features: int, quant: QuantConfig | None = None,
                 norm: bool = False, norm_eps: float = 1e-5, name: str = "BitLinear"):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.quant = quant or QuantConfig()
        self.name = name
        if self.quant.ternary:
            if in_features % 4:
                raise ConfigError(f"{name}: in_features = {in_features} must be a multiple of 4 for ternary packing")
            if self.quant.weight_scale == "group" and in_features % self.quant.group_size:
                raise ConfigError(f"{name}: quant.group_size = {self.quant.group_size} does not divide "
                                  f"in_features = {in_features}")
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.norm = RMSNorm(in_features, norm_eps) if norm else None
        self._eval_cache: tuple | None = None  # (weight key, int8 codes, scale) for the no-grad eval path
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)  # nn.Linear's default

    @property
    def ternary(self) -> bool:
        return self.quant.ternary

    @property
    def group_size(self) -> int | None:
        """Input columns per scale, or None for a per-tensor scale."""
        return self.quant.group_size if self.quant.weight_scale == "group" else None

    @property
    def act_quant(self) -> bool:
        return self.quant.ternary and self.quant.activation == "int8"

    def effective_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """Weight used in training: STE `w + (codes/s - w).detach()`, computed in fp32 and returned in
        `dtype` (default: the weight's, so a bf16 learner runs its matmuls on bf16 tensor cores, not fp32
        CUDA cores; the head asks for fp32); the plain weight if not ternary."""
        if not self.ternary:
            return self.weight
        codes, s = weight_quant(self.weight.detach(), self.group_size)
        w_eff = codes / expand_scale(s, self.in_features)
        w = self.weight.float()
        return (w + (w_eff - w).detach()).to(dtype or self.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_weight(x, None)

    def forward_with_weight(self, x: Tensor, w_eff: Tensor | None) -> Tensor:
        """Forward with a precomputed `effective_weight()` (lets chunked heads quantize W once)."""
        if self.norm is not None:
            x = self.norm(x)
        if not self.ternary:
            return _linear(x, self.weight if w_eff is None else w_eff)
        if not self.training and not torch.is_grad_enabled():
            codes, s = self.eval_codes()
            return _exact_ternary_matmul(x, codes, s, self.act_quant).to(x.dtype)
        if w_eff is None:
            w_eff = self.effective_weight()
        if self.act_quant:
            x = act_quant_ste(x)
        return _linear(x, w_eff)

    @torch.no_grad()
    def eval_codes(self) -> tuple[Tensor, Tensor]:
        """(int8 codes [out, in], scale) of the current weight, cached for the eval path.

        Re-quantizing every call costs ~8 fp32 passes over the weight, more than the matmul itself at
        decode/prefill sizes. The cache key is the weight's storage, dtype and version counter, which
        every in-place change (optimizer step, load_state_dict, copy_) bumps, so it never goes stale.
        """
        w = self.weight
        key = (w.data_ptr(), w._version, w.dtype, w.device, w.shape)
        if self._eval_cache is None or self._eval_cache[0] != key:
            codes, s = weight_quant(w.detach(), self.group_size)
            self._eval_cache = (key, codes.to(torch.int8), s)
        return self._eval_cache[1], self._eval_cache[2]

    def invalidate_eval_cache(self) -> None:
        """Forget the cached eval quantization. Needed only after writing the weight through `.data`
        (e.g. DeepSpeed's flat buffers), which does not bump the version counter."""
        self._eval_cache = None

    def _apply(self, fn, recurse=True):
        self._eval_cache = None  # .to()/.cuda()/.half() move or replace the weight
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def pack(self, to_cpu: bool = True) -> PackedTernary:
        """The exported form (codes, scale, norm) on the CPU; `to_cpu=False` keeps it on the weight's
        device (the fast decode backend re-packs on the GPU without a round trip through the host)."""
        if not self.ternary:
            raise ValueError(f"{self.name}: pack() needs a ternary layer (quant.ternary is False)")
        codes, s = weight_quant(self.weight, self.group_size)
        dev = "cpu" if to_cpu else self.weight.device
        return PackedTernary(
            codes=pack_ternary(codes.to(torch.int8)).to(dev), scale=s.float().to(dev),
            in_features=self.in_features, out_features=self.out_features,
            group_size=self.group_size or self.in_features,
            norm_weight=None if self.norm is None else self.norm.weight.detach().float().to(dev),
            norm_eps=self.norm.eps if self.norm is not None else 0.0, act_quant=self.act_quant)

    @torch.no_grad()
    def zero_ratio(self) -> float:
        """Share of ternary codes equal to 0 (watch for zero-ratio collapse)."""
        codes, _ = weight_quant(self.weight, self.group_size)
        return float((codes == 0).float().mean())

    def extra_repr(self) -> str:
        q = self.quant
        kind = (f"ternary, scale={q.weight_scale}" + (f"/{q.group_size}" if q.weight_scale == "group" else "")
                + f", act={q.activation}") if q.ternary else "fp"
        return f"{self.in_features} -> {self.out_features}, {kind}, norm={self.norm is not None}"
