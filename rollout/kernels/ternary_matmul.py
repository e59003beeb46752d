"""Ternary (1.58-bit) matmul over packed 2-bit weights: the decode-time BitLinear.

    y = ternary_matmul(x_q, s_x, codes, scale, group_size)          # int8 activations (W1.58A8)
    y = ternary_matmul(x_n, None, codes, scale, group_size)         # 16/32-bit activations (W1.58A16)

Shapes: x [M, K] (int8, or fp32/bf16), s_x fp32 [M] (int8 case), codes uint8 [N, K // 4]
(code = w + 1 in {0, 1, 2}; four per byte c0 | c1<<2 | c2<<4 | c3<<6, row-major along K),
scale fp32 [N, K // group_size] (grouped) or [1, 1] (per tensor; group_size == K), y [M, N].

Math (exactly the BitLinear eval formula, DESIGN.md):
    y[m, n] = (sum_g (sum_{k in g} x[m, k] * W_t[n, k]) / scale[n, g]) / s_x[m]
With int8 activations the inner sums are exact int32; per tensor there is one fp32 division per output.

GPU kernels (Triton), picked by M:
  * M <= GEMV_MAX_M: `_tmm_gemv_kernel`, no tensor cores; each program owns BLOCK_N weight rows, unpacks
    the 2-bit codes in registers and reduces with int32 multiply-add (decode at small batch is purely
    a matter of streaming the 2-bit weights once);
  * larger M: `_tmm_dot_kernel`, int8 x int8 -> int32 `tl.dot` (bf16/fp32 dot for A16), the ternary
    tile unpacked in registers as four strided K/4 slices (no reshape).
`residual` (optional [M, N]) is added in the epilogue (saves the residual-add launch).
"""

from __future__ import annotations

import torch

from rollout.kernels._dispatch import FastPathUnavailable, interpreting, next_pow2, resolve

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

GEMV_MAX_M = 8
_MIN_GROUP = 128  # the Triton path needs group_size % 128 == 0 (K tiles never straddle a group)


def unpack_codes(codes: torch.Tensor, in_features: int) -> torch.Tensor:
    """uint8 [N, K//4] -> int8 ternary weights [N, K] in {-1, 0, 1}."""
    c = codes.to(torch.int16)
    parts = [((c >> (2 * j)) & 3) for j in range(4)]
    w = torch.stack(parts, dim=-1).reshape(codes.shape[0], -1)[:, :in_features]
    return (w - 1).to(torch.int8)


def ternary_matmul_ref(
    x: torch.Tensor,
    s_x: torch.Tensor | None,
    codes: torch.Tensor,
    scale: torch.Tensor,
    group_size: int,
    *,
    out_dtype: torch.dtype = torch.float32,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pure-torch oracle, fp32 throughout (int8 partial sums are exact in fp32 up to 2^24)."""
    M, K = x.shape
    N = codes.shape[0]
    w = unpack_codes(codes, K).float()                    # [N, K]
    xf = x.float()
    if scale.numel() == 1:
        y = (xf @ w.t()) / scale.reshape(()).float()
    else:
        G = K // group_size
        part = torch.einsum("mgk,ngk->mng", xf.view(M, G, group_size), w.view(N, G, group_size))
        y = (part / scale.float()[None]).sum(-1)          # [M, N]
    if s_x is not None:
        y = y / s_x.float()[:, None]
    if residual is not None:
        y = residual.float() + y
    return y.to(out_dtype)


if triton is not None:

    @triton.jit
    def _tmm_dot_kernel(
        x_ptr, sx_ptr, c_ptr, sc_ptr, y_ptr, r_ptr,
        M, N, K, GS, NG,
        stride_xm, stride_cn, stride_sn, stride_ym, stride_rm,
        ACT_INT8: tl.constexpr, IEEE: tl.constexpr, HAS_RES: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        BK4: tl.constexpr = BLOCK_K // 4
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k4 = tl.arange(0, BK4)
        mask_m = offs_m < M
        mask_n = offs_n < N
        K4 = K // 4
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for g in range(NG):
            if ACT_INT8:
                part = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
            else:
                part = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for kb in range(0, GS, BLOCK_K):
                kk4 = (g * GS + kb) // 4 + offs_k4                       # byte index along K
                mask_k = kk4 < K4
                c = tl.load(c_ptr + offs_n[None, :] * stride_cn + kk4[:, None],
                            mask=mask_k[:, None] & mask_n[None, :], other=1)   # [BK4, BN] uint8
                for j in tl.static_range(4):
                    xj = tl.load(x_ptr + offs_m[:, None] * stride_xm + (kk4 * 4 + j)[None, :],
                                 mask=mask_m[:, None] & mask_k[None, :], other=0)   # [BM, BK4]
                    if ACT_INT8:
                        w = (((c >> (2 * j)) & 3).to(tl.int8) - 1).to(tl.int8)
                        part += tl.dot(xj, w, out_dtype=tl.int32)
                    else:
                        w = (((c >> (2 * j)) & 3).to(tl.float32) - 1.0).to(xj.dtype)
                        if IEEE:
                            part += tl.dot(xj, w, input_precision="ieee")
                        else:
                            part += tl.dot(xj, w)
            sc = tl.load(sc_ptr + offs_n * stride_sn + g, mask=mask_n, other=1.0)
            acc += tl.math.div_rn(part.to(tl.float32), tl.zeros([BLOCK_M, BLOCK_N], tl.float32) + sc[None, :])
        if ACT_INT8:
            sx = tl.load(sx_ptr + offs_m, mask=mask_m, other=1.0)
            acc = tl.math.div_rn(acc, tl.zeros([BLOCK_M, BLOCK_N], tl.float32) + sx[:, None])
        mask = mask_m[:, None] & mask_n[None, :]
        if HAS_RES:
            acc += tl.load(r_ptr + offs_m[:, None] * stride_rm + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _tmm_gemv_kernel(
        x_ptr, sx_ptr, c_ptr, sc_ptr, y_ptr, r_ptr,
        M, N, K, GS, NG,
        stride_xm, stride_cn, stride_sn, stride_ym, stride_rm,
        ACT_INT8: tl.constexpr, HAS_RES: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        BK4: tl.constexpr = BLOCK_K // 4
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k4 = tl.arange(0, BK4)
        mask_m = offs_m < M
        mask_n = offs_n < N
        K4 = K // 4
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for g in range(NG):
            # elementwise accumulation, one cross-thread reduction per group (not per K tile)
            if ACT_INT8:
                acc3 = tl.zeros([BLOCK_M, BLOCK_N, BK4], dtype=tl.int32)
            else:
                acc3 = tl.zeros([BLOCK_M, BLOCK_N, BK4], dtype=tl.float32)
            for kb in range(0, GS, BLOCK_K):
                kk4 = (g * GS + kb) // 4 + offs_k4
                mask_k = kk4 < K4
                c = tl.load(c_ptr + offs_n[:, None] * stride_cn + kk4[None, :],
                            mask=mask_n[:, None] & mask_k[None, :], other=1)    # [BN, BK4] uint8
                for j in tl.static_range(4):
                    xj = tl.load(x_ptr + offs_m[:, None] * stride_xm + (kk4 * 4 + j)[None, :],
                                 mask=mask_m[:, None] & mask_k[None, :], other=0)   # [BM, BK4]
                    if ACT_INT8:
                        w = ((c >> (2 * j)) & 3).to(tl.int32) - 1
                        acc3 += xj.to(tl.int32)[:, None, :] * w[None, :, :]
                    else:
                        w = ((c >> (2 * j)) & 3).to(tl.float32) - 1.0
                        acc3 += xj.to(tl.float32)[:, None, :] * w[None, :, :]
            part = tl.sum(acc3, axis=2)
            sc = tl.load(sc_ptr + offs_n * stride_sn + g, mask=mask_n, other=1.0)
            acc += tl.math.div_rn(part.to(tl.float32), tl.zeros([BLOCK_M, BLOCK_N], tl.float32) + sc[None, :])
        if ACT_INT8:
            sx = tl.load(sx_ptr + offs_m, mask=mask_m, other=1.0)
            acc = tl.math.div_rn(acc, tl.zeros([BLOCK_M, BLOCK_N], tl.float32) + sx[:, None])
        mask = mask_m[:, None] & mask_n[None, :]
        if HAS_RES:
            acc += tl.load(r_ptr + offs_m[:, None] * stride_rm + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _tmm_gemv_norm_kernel(
        x_ptr, nw_ptr, c_ptr, sc_ptr, y_ptr, r_ptr,
        M, N, K, GS, NG, eps,
        stride_xm, stride_cn, stride_sn, stride_ym, stride_rm,
        HAS_NORM: tl.constexpr, ACT_INT8: tl.constexpr, HAS_RES: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """GEMV with the RMSNorm + int8 quant of the (few) input rows fused in as a prologue: every
        program recomputes the rows' rsqrt(mean x^2) and absmax from L2 (cheap at M <= 8) instead of
        a separate launch. Same math and op order as rmsnorm_quant followed by _tmm_gemv_kernel."""
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        BK4: tl.constexpr = BLOCK_K // 4
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_kc = tl.arange(0, BLOCK_K)
        offs_k4 = tl.arange(0, BK4)
        mask_m = offs_m < M
        mask_n = offs_n < N
        K4 = K // 4
        xrow = x_ptr + offs_m[:, None] * stride_xm
        rs = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
        if HAS_NORM:
            ss = tl.zeros([BLOCK_M], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + offs_kc
                xv = tl.load(xrow + kk[None, :], mask=mask_m[:, None] & (kk < K)[None, :], other=0.0).to(tl.float32)
                ss += tl.sum(xv * xv, axis=1)
            rs = tl.rsqrt(ss / K + eps)
        s = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
        if ACT_INT8:
            am = tl.zeros([BLOCK_M], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + offs_kc
                mk = kk < K
                xv = tl.load(xrow + kk[None, :], mask=mask_m[:, None] & mk[None, :], other=0.0).to(tl.float32)
                if HAS_NORM:
                    wv = tl.load(nw_ptr + kk, mask=mk, other=0.0).to(tl.float32)
                    xv = xv * rs[:, None] * wv[None, :]
                am = tl.maximum(am, tl.max(tl.abs(xv), axis=1))
            s = tl.math.div_rn(tl.full([BLOCK_M], 127.0, tl.float32), am + 1e-5)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for g in range(NG):
            if ACT_INT8:
                acc3 = tl.zeros([BLOCK_M, BLOCK_N, BK4], dtype=tl.int32)
            else:
                acc3 = tl.zeros([BLOCK_M, BLOCK_N, BK4], dtype=tl.float32)
            for kb in range(0, GS, BLOCK_K):
                kk4 = (g * GS + kb) // 4 + offs_k4
                mask_k = kk4 < K4
                c = tl.load(c_ptr + offs_n[:, None] * stride_cn + kk4[None, :],
                            mask=mask_n[:, None] & mask_k[None, :], other=1)    # [BN, BK4] uint8
                for j in tl.static_range(4):
                    kj = kk4 * 4 + j
                    xj = tl.load(xrow + kj[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
                    if HAS_NORM:
                        wj = tl.load(nw_ptr + kj, mask=mask_k, other=0.0).to(tl.float32)
                        xj = xj * rs[:, None] * wj[None, :]
                    if ACT_INT8:
                        v = xj * s[:, None]
                        q = tl.where(v >= 0, tl.floor(v + 0.5), -tl.floor(-v + 0.5))
                        q = tl.minimum(tl.maximum(q, -128.0), 127.0).to(tl.int32)
                        w = ((c >> (2 * j)) & 3).to(tl.int32) - 1
                        acc3 += q[:, None, :] * w[None, :, :]
                    else:
                        w = ((c >> (2 * j)) & 3).to(tl.float32) - 1.0
                        acc3 += xj[:, None, :] * w[None, :, :]
            part = tl.sum(acc3, axis=2)
            sc = tl.load(sc_ptr + offs_n * stride_sn + g, mask=mask_n, other=1.0)
            acc += tl.math.div_rn(part.to(tl.float32), tl.zeros([BLOCK_M, BLOCK_N], tl.float32) + sc[None, :])
        if ACT_INT8:
            acc = tl.math.div_rn(acc, tl.zeros([BLOCK_M, BLOCK_N], tl.float32) + s[:, None])
        mask = mask_m[:, None] & mask_n[None, :]
        if HAS_RES:
            acc += tl.load(r_ptr + offs_m[:, None] * stride_rm + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)

    def _prune(configs, named_args, **kwargs):
        """Drop configs whose K tile straddles a scale group, whose M tile is far larger than M, or
        whose GEMV register tile (BLOCK_M x BLOCK_N x BLOCK_K/4) would spill."""
        def arg(name, default):
            return named_args.get(name, kwargs.get(name, default))

        gs, ng, M = arg("GS", 1), arg("NG", 1), arg("M", 1)
        bm_fixed = arg("BLOCK_M", 1)
        keep = []
        for c in configs:
            bk = c.kwargs["BLOCK_K"]
            bm = c.kwargs.get("BLOCK_M", bm_fixed)
            if ng > 1 and gs % bk:
                continue
            if "BLOCK_M" in c.kwargs and bm > max(16, next_pow2(M)):
                continue
            if "BLOCK_M" not in c.kwargs and bm * c.kwargs["BLOCK_N"] * bk // 4 > 8192:
                continue
            keep.append(c)
        return keep or configs[:1]

    if interpreting():
        _dot = _tmm_dot_kernel
        _gemv = _tmm_gemv_kernel
        _gemv_norm = _tmm_gemv_norm_kernel
    else:
        _DOT_CONFIGS = [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
            for bm, bn, bk, w, st in [
                (16, 16, 256, 4, 4), (16, 32, 256, 4, 4), (16, 16, 128, 4, 4), (32, 32, 256, 4, 4),
                (32, 32, 128, 4, 4), (32, 64, 128, 4, 4), (64, 32, 256, 4, 3), (64, 64, 128, 4, 4),
                (64, 64, 256, 8, 3), (128, 64, 128, 8, 3),
            ]
        ]
        _GEMV_CONFIGS = [
            triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
            for bn, bk, w, st in [
                (16, 1024, 4, 3), (8, 1024, 4, 3), (16, 512, 4, 4), (32, 512, 8, 3), (8, 512, 2, 4),
                (4, 512, 2, 4), (16, 128, 4, 4), (32, 128, 4, 4), (8, 128, 2, 4),
            ]
        ]
        _prune_by = {"early_config_prune": _prune}
        # y may alias the residual (in-place residual stream): restore it after each tuning run
        _restore = ["y_ptr"]
        _dot = triton.autotune(configs=_DOT_CONFIGS, key=["M", "N", "K", "NG"],
                               prune_configs_by=_prune_by, restore_value=_restore)(_tmm_dot_kernel)
        _gemv = triton.autotune(configs=_GEMV_CONFIGS, key=["N", "K", "NG", "BLOCK_M"],
                                prune_configs_by=_prune_by, restore_value=_restore)(_tmm_gemv_kernel)
        _gemv_norm = triton.autotune(configs=_GEMV_CONFIGS, key=["N", "K", "NG", "BLOCK_M"],
                                     prune_configs_by=_prune_by, restore_value=_restore)(_tmm_gemv_norm_kernel)


def ternary_matmul(
    x: torch.Tensor,
    s_x: torch.Tensor | None,
    codes: torch.Tensor,
    scale: torch.Tensor,
    group_size: int,
    *,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    residual: torch.Tensor | None = None,
    impl: str | None = None,
) -> torch.Tensor:
    """y [M, N] = ternary BitLinear of x; s_x None means x is already 16/32-bit (A16). See module doc."""
    if x.dim() != 2 or codes.dim() != 2:
        raise ValueError(f"ternary_matmul: x [M,K] and codes [N,K/4] expected, got {tuple(x.shape)}, {tuple(codes.shape)}")
    M, K = x.shape
    N = codes.shape[0]
    if codes.shape[1] * 4 != K:
        raise ValueError(f"ternary_matmul: codes {tuple(codes.shape)} do not match K={K} (need [N, K//4])")
    per_tensor = scale.numel() == 1
    if not per_tensor and tuple(scale.shape) != (N, K // group_size):
        raise ValueError(f"ternary_matmul: scale {tuple(scale.shape)} != [{N}, {K // group_size}]")
    act_int8 = x.dtype == torch.int8
    if act_int8 != (s_x is not None):
        raise ValueError("ternary_matmul: s_x is required with int8 x and must be None otherwise")
    if resolve("ternary_matmul", x.device, impl) == "ref":
        y = ternary_matmul_ref(x, s_x, codes, scale, group_size, out_dtype=out.dtype if out is not None else out_dtype,
                               residual=residual)
        if out is not None:
            out.copy_(y)
            return out
        return y
    if not per_tensor and K // group_size > 1 and group_size % _MIN_GROUP:
        raise FastPathUnavailable(f"ternary_matmul: Triton path needs group_size % {_MIN_GROUP} == 0, got {group_size}")
    if x.stride(1) != 1:
        x = x.contiguous()
    codes = codes.contiguous()
    scale = scale.float().contiguous()
    if out is None:
        out = torch.empty(M, N, device=x.device, dtype=out_dtype)
    gs, ng, stride_sn = (K, 1, 0) if per_tensor else (group_size, K // group_size, scale.stride(0))
    res = residual if residual is not None else out
    sx = s_x if s_x is not None else scale
    common = (x, sx, codes, scale, out, res, M, N, K, gs, ng,
              x.stride(0), codes.stride(0), stride_sn, out.stride(0), res.stride(0))
    if M <= GEMV_MAX_M:
        bm = next_pow2(M)
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(M, bm))  # noqa: E731
        extra = {} if not interpreting() else {"BLOCK_N": 16, "BLOCK_K": 128}
        _gemv[grid](*common, ACT_INT8=act_int8, HAS_RES=residual is not None, BLOCK_M=bm, **extra)
    else:
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(M, meta["BLOCK_M"]))  # noqa: E731
        extra = {} if not interpreting() else {"BLOCK_M": min(64, max(16, next_pow2(M))), "BLOCK_N": 32,
                                               "BLOCK_K": 128}
        _dot[grid](*common, ACT_INT8=act_int8, IEEE=x.dtype == torch.float32, HAS_RES=residual is not None,
                   **extra)
    return out


def norm_ternary_matmul(
    x: torch.Tensor,
    norm_w: torch.Tensor | None,
    eps: float,
    act_quant: bool,
    codes: torch.Tensor,
    scale: torch.Tensor,
    group_size: int,
    *,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    residual: torch.Tensor | None = None,
    impl: str | None = None,
) -> torch.Tensor:
    """rmsnorm_quant(x, norm_w, eps, act_quant) followed by ternary_matmul, in one launch when M is
    small (x [M, K] float; norm_w None = no norm, quant only). Larger M (or the reference) runs the two
    kernels; the result is the same up to fp rounding of the row statistics."""
    from rollout.kernels.act_quant import rmsnorm_quant

    M, K = x.shape
    N = codes.shape[0]
    which = resolve("norm_ternary_matmul", x.device, impl)
    per_tensor = scale.numel() == 1
    grouped_ok = per_tensor or K // group_size == 1 or group_size % _MIN_GROUP == 0
    if which == "ref" or M > GEMV_MAX_M or not grouped_ok:
        xq, sx = rmsnorm_quant(x, norm_w, eps, act_quant, impl=which)
        return ternary_matmul(xq, sx, codes, scale, group_size, out=out, out_dtype=out_dtype, residual=residual,
                              impl=which)
    if codes.shape[1] * 4 != K:
        raise ValueError(f"norm_ternary_matmul: codes {tuple(codes.shape)} do not match K={K}")
    if x.stride(1) != 1:
        x = x.contiguous()
    scale = scale.float().contiguous()
    if out is None:
        out = torch.empty(M, N, device=x.device, dtype=out_dtype)
    gs, ng, stride_sn = (K, 1, 0) if per_tensor else (group_size, K // group_size, scale.stride(0))
    res = residual if residual is not None else out
    bm = next_pow2(M)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(M, bm))  # noqa: E731
    extra = {} if not interpreting() else {"BLOCK_N": 16, "BLOCK_K": 128}
    _gemv_norm[grid](x, norm_w if norm_w is not None else x, codes, scale, out, res, M, N, K, gs, ng, float(eps),
                     x.stride(0), codes.stride(0), stride_sn, out.stride(0), res.stride(0),
                     HAS_NORM=norm_w is not None, ACT_INT8=act_quant, HAS_RES=residual is not None, BLOCK_M=bm,
                     **extra)
    return out
