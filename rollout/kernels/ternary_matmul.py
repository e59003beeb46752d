"""Ternary (1.58-bit) matmul over packed 2-bit weights: the decode-time BitLinear.

    words = kernel_layout(codes, K, group_size)                     # once per weight refresh
    y = ternary_matmul(x_q, s_x, words, scale, group_size)          # int8 activations (W1.58A8)
    y = ternary_matmul(x_n, None, words, scale, group_size)         # 16/32-bit activations (W1.58A16)
    y = norm_ternary_matmul(x, norm_w, eps, True, words, scale, gs) # RMSNorm + int8 quant fused (M <= 8)

Shapes: x [M, K] (int8, or fp32/bf16), s_x fp32 [M] (int8 case), scale fp32 [N, K // group_size] (grouped)
or [1, 1] (per tensor; group_size == K), y [M, N]. The weights come in one of two layouts:
  * `codes` uint8 [N, K // 4], the model's packing (code = w + 1 in {0, 1, 2}; four per byte
    c0 | c1<<2 | c2<<4 | c3<<6, row-major along K; `BitLinear.pack()`), accepted everywhere and converted
    per call (tests, one-off use);
  * `words` int32 [N, Kp // 16], the kernel layout from `kernel_layout` (what FastBackend keeps): K is
    cut into chunks of 16*W columns (Kp = K rounded up to a chunk, padding codes = 0 weight), and bits
    2j..2j+1 of word i of chunk c hold the code of column c*16*W + j*W + i. Unpacking slice j of a chunk
    therefore yields the weights of W *consecutive* columns: activation loads are contiguous, each slice
    lies inside one scale group (W divides group_size), and one 4-byte load carries 16 weights.
    W = `layout_width(K, group_size)` (128 for every real layer; smaller for tiny or odd shapes).

Math (exactly the BitLinear eval formula, DESIGN.md):
    y[m, n] = (sum_g (sum_{k in g} x[m, k] * W_t[n, k]) / scale[n, g]) / s_x[m]
With int8 activations the inner sums are exact int32; per tensor there is one fp32 division per output.

GPU kernels (Triton), picked by M:
  * M <= GEMV_MAX_M: `_gemv_kernel`, no tensor cores: each program owns one activation row and BLOCK_N
    weight rows, streams
    their words once, unpacks in registers and accumulates int32 elementwise (one cross-thread reduction
    per output, or per scale group). With float input it also computes the RMSNorm + int8 quant of the
    (few) rows in a prologue (`norm_ternary_matmul`: one launch per BitLinear at decode batch <= 2).
  * larger M: `_dot_kernel`, int8 x int8 -> int32 `tl.dot` (bf16/fp32 dot for A16) over [BLOCK_M, W] x
    [W, BLOCK_N] tiles, the weight slice unpacked in registers; needs W >= 32 on the GPU (int8 MMA depth),
    smaller W runs the GEMV kernel (one program per row).
`residual` (optional [M, N]) is added in the epilogue (saves the residual-add launch); `out` may alias it.
"""

from __future__ import annotations

import os

import torch

from rollout.kernels._dispatch import interpreting, next_pow2, resolve

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# slices of a 16-slice chunk unrolled per loop iteration of the tensor-core kernel (autotuned: 1 or 8).
# All 16 made Triton 3.6 take minutes per config to compile for sm_90 (timed offline with its ptxas);
# 8 takes ~3 s (fp32 IEEE dots ~20 s: those use 1). On the H100 neither wins everywhere (bitmamba2-1b,
# M=64: in_proj 14.6 us at 1 vs 25.9 at 8, out_proj 20.0 vs 16.4, bench/kernels.py).
_DOT_UNROLLS = (1, 8)
GEMV_MAX_M = 2   # above this the weights are read once by the tensor-core kernel (M tile 16+)
MAX_W = 128
_MIN_DOT_W = 32


def unpack_codes(codes: torch.Tensor, in_features: int) -> torch.Tensor:
    """uint8 [N, K//4] -> int8 ternary weights [N, K] in {-1, 0, 1}."""
    c = codes.to(torch.int16)
    parts = [((c >> (2 * j)) & 3) for j in range(4)]
    w = torch.stack(parts, dim=-1).reshape(codes.shape[0], -1)[:, :in_features]
    return (w - 1).to(torch.int8)


def layout_width(K: int, group_size: int) -> int:
    """W of the kernel layout for a [*, K] weight with scale groups of `group_size` (== K: per tensor)."""
    w = min(MAX_W, next_pow2(-(-K // 16)))
    if 0 < group_size < K:
        w = min(w, group_size & -group_size)    # a slice of W columns never straddles a scale group
    return w


def kernel_layout(codes: torch.Tensor, K: int, group_size: int) -> torch.Tensor:
    """uint8 codes [N, K//4] (model packing) -> int32 words [N, Kp//16] (kernel layout; module doc)."""
    if codes.dtype != torch.uint8 or codes.dim() != 2 or codes.shape[1] * 4 < K:
        raise ValueError(f"kernel_layout: expected uint8 codes [N, {-(-K // 4)}], got {codes.dtype} "
                         f"{tuple(codes.shape)}")
    N = codes.shape[0]
    W = layout_width(K, group_size)
    chunk = 16 * W
    nch = -(-K // chunk)
    # one byte per weight while unpacking (the lm_head of a 1B model: ~100 MB of temporaries, not 4x that)
    raw = torch.stack([(codes >> (2 * j)) & 3 for j in range(4)], dim=-1).reshape(N, -1)[:, :K]   # codes 0..2
    if nch * chunk > K:
        raw = torch.cat([raw, raw.new_ones(N, nch * chunk - K)], dim=1)                          # 1 = weight 0
    v = raw.view(N, nch, 16, W)
    words = torch.zeros(N, nch, W, dtype=torch.int64, device=codes.device)
    for j in range(16):
        words |= v[:, :, j].long() << (2 * j)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32).reshape(N, nch * W).contiguous()


def unpack_words(words: torch.Tensor, K: int, group_size: int) -> torch.Tensor:
    """int32 words (kernel layout) -> int8 ternary weights [N, K]; the inverse of `kernel_layout`."""
    N = words.shape[0]
    W = layout_width(K, group_size)
    v = words.view(N, -1, 1, W)
    parts = torch.cat([(v >> (2 * j)) & 3 for j in range(16)], dim=2)     # [N, nch, 16, W]
    return (parts.reshape(N, -1)[:, :K] - 1).to(torch.int8)


def _weights(codes: torch.Tensor, K: int, group_size: int) -> torch.Tensor:
    return unpack_words(codes, K, group_size) if codes.dtype == torch.int32 else unpack_codes(codes, K)


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
    """Pure-torch oracle, fp32 throughout (int8 partial sums are exact in fp32 up to 2^24); `codes` in
    either layout."""
    M, K = x.shape
    N = codes.shape[0]
    w = _weights(codes, K, group_size).float()             # [N, K]
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
    def _flush_group(acc, part, sc_ptr, offs_n, mask_n, stride_sn, c, j, W: tl.constexpr, GS, K,
                     ROW: tl.constexpr):
        """After slice j of chunk c: if a scale group ends there, acc += part / scale[n, group]; part = 0
        (one division per group of an exact partial sum, the reference's op order). acc, part: [BN] (ROW)
        or [BM, BN]."""
        end = c * (16 * W) + (j + 1) * W
        g = tl.minimum((end - 1) // GS, (K - 1) // GS)            # padding slices past K carry x = 0
        sc = tl.load(sc_ptr + offs_n * stride_sn + g, mask=mask_n, other=1.0)
        if ROW:
            den = sc
        else:
            den = tl.zeros_like(acc) + sc[None, :]
        flush = (end % GS) == 0
        upd = acc + tl.math.div_rn(part.to(tl.float32), den)
        acc = tl.where(flush, upd, acc)
        part = tl.where(flush, tl.zeros_like(part), part)
        return acc, part

    @triton.jit
    def _gemv_kernel(
        x_ptr, nw_ptr, sx_ptr, c_ptr, sc_ptr, y_ptr, r_ptr,
        M, N, K, GS, NCH, eps,
        stride_xm, stride_cn, stride_sn, stride_ym, stride_rm,
        X_INT8: tl.constexpr, HAS_NORM: tl.constexpr, QUANT: tl.constexpr, PER_TENSOR: tl.constexpr,
        HAS_RES: tl.constexpr, W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        """One activation row m per program (grid (N / BLOCK_N, M)); all tiles are 2-D [BLOCK_N, W].
        y[m] = [norm + quant](x[m]) @ W_t^T over kernel-layout words. X_INT8: x is int8 with s_x given;
        else x is float, normed (HAS_NORM) and int8-quantized (QUANT) in a prologue that every program
        recomputes from L2 (one row load when K <= BLOCK_P), or used as is (A16)."""
        pid_n = tl.program_id(0)
        m = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_w = tl.arange(0, W)
        mask_n = offs_n < N
        xrow = x_ptr + m * stride_xm
        rs = 1.0
        s = 1.0
        sq = 1.0
        if X_INT8:
            s = tl.load(sx_ptr + m)
        elif HAS_NORM or QUANT:
            offs_p = tl.arange(0, BLOCK_P)
            if BLOCK_P >= K:     # the whole row in registers: one load for both statistics
                mk = offs_p < K
                xv = tl.load(xrow + offs_p, mask=mk, other=0.0).to(tl.float32)
                if HAS_NORM:
                    rs = tl.rsqrt(tl.sum(xv * xv, axis=0) / K + eps)
                    xv = xv * rs * tl.load(nw_ptr + offs_p, mask=mk, other=0.0).to(tl.float32)
                am = tl.max(tl.abs(xv), axis=0)
            else:
                if HAS_NORM:
                    ss = tl.zeros([BLOCK_P], dtype=tl.float32)
                    for k0 in range(0, K, BLOCK_P):
                        kk = k0 + offs_p
                        xv = tl.load(xrow + kk, mask=kk < K, other=0.0).to(tl.float32)
                        ss += xv * xv
                    rs = tl.rsqrt(tl.sum(ss, axis=0) / K + eps)
                amv = tl.zeros([BLOCK_P], dtype=tl.float32)
                for k0 in range(0, K, BLOCK_P):
                    kk = k0 + offs_p
                    mk = kk < K
                    xv = tl.load(xrow + kk, mask=mk, other=0.0).to(tl.float32)
                    if HAS_NORM:
                        xv = xv * rs * tl.load(nw_ptr + kk, mask=mk, other=0.0).to(tl.float32)
                    amv = tl.maximum(amv, tl.abs(xv))
                am = tl.max(amv, axis=0)
            if QUANT:
                s = tl.math.div_rn(tl.full([BLOCK_N], 127.0, tl.float32), tl.zeros([BLOCK_N], tl.float32) + (am + 1e-5))
                sq = tl.max(s, axis=0)
        INT: tl.constexpr = X_INT8 or QUANT
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        if INT:
            acc2 = tl.zeros([BLOCK_N, W], dtype=tl.int32)
            gpart = tl.zeros([BLOCK_N], dtype=tl.int32)
        else:
            acc2 = tl.zeros([BLOCK_N, W], dtype=tl.float32)
            gpart = tl.zeros([BLOCK_N], dtype=tl.float32)
        for c in range(NCH):
            words = tl.load(c_ptr + offs_n[:, None] * stride_cn + (c * W + offs_w)[None, :],
                            mask=mask_n[:, None], other=0)                               # [BN, W] int32
            for j in tl.static_range(16):
                k = c * (16 * W) + j * W + offs_w
                mk = k < K
                if X_INT8:
                    q = tl.load(xrow + k, mask=mk, other=0).to(tl.int32)
                else:
                    xv = tl.load(xrow + k, mask=mk, other=0.0).to(tl.float32)
                    if HAS_NORM:
                        xv = xv * rs * tl.load(nw_ptr + k, mask=mk, other=0.0).to(tl.float32)
                    if QUANT:
                        v = xv * sq
                        q = tl.where(v >= 0, tl.floor(v + 0.5), -tl.floor(-v + 0.5))
                        q = tl.minimum(tl.maximum(q, -128.0), 127.0).to(tl.int32)
                    else:
                        q = xv
                wj = (words >> (2 * j)) & 3
                if INT:
                    prod = q[None, :] * (wj - 1)
                else:
                    prod = q[None, :] * (wj.to(tl.float32) - 1.0)
                if PER_TENSOR:
                    acc2 += prod
                else:
                    gpart += tl.sum(prod, axis=1)
                    acc, gpart = _flush_group(acc, gpart, sc_ptr, offs_n, mask_n, stride_sn, c, j, W, GS, K, True)
        if PER_TENSOR:
            acc = tl.math.div_rn(tl.sum(acc2, axis=1).to(tl.float32), tl.zeros([BLOCK_N], tl.float32) + tl.load(sc_ptr))
        if INT:
            acc = tl.math.div_rn(acc, tl.zeros([BLOCK_N], tl.float32) + s)
        if HAS_RES:
            acc += tl.load(r_ptr + m * stride_rm + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        tl.store(y_ptr + m * stride_ym + offs_n, acc.to(y_ptr.dtype.element_ty), mask=mask_n)

    @triton.jit
    def _dot_kernel(
        x_ptr, sx_ptr, c_ptr, sc_ptr, y_ptr, r_ptr,
        M, N, K, GS, NCH, M_BUCKET,
        stride_xm, stride_cn, stride_sn, stride_ym, stride_rm,
        X_INT8: tl.constexpr, PER_TENSOR: tl.constexpr, IEEE: tl.constexpr, HAS_RES: tl.constexpr,
        W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UNROLL: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_w = tl.arange(0, W)
        mask_m = offs_m < M
        mask_n = offs_n < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if X_INT8:
            part = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        else:
            part = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for c in range(NCH):
            words = tl.load(c_ptr + offs_n[None, :] * stride_cn + (c * W + offs_w)[:, None],
                            mask=mask_n[None, :], other=0)                                # [W, BN] int32
            for jj in range(16 // UNROLL):   # UNROLL slices per iteration (module doc: compile time)
                for j2 in tl.static_range(UNROLL):
                    j = jj * UNROLL + j2
                    k = c * (16 * W) + j * W + offs_w
                    a = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :],
                                mask=mask_m[:, None] & (k < K)[None, :], other=0)             # [BM, W]
                    wj = (words >> (2 * j)) & 3
                    if X_INT8:
                        b = (wj - 1).to(tl.int8)
                        p = tl.dot(a, b, out_dtype=tl.int32)
                    else:
                        b = (wj.to(tl.float32) - 1.0).to(a.dtype)
                        if IEEE:
                            p = tl.dot(a, b, input_precision="ieee")
                        else:
                            p = tl.dot(a, b)
                    part += p
                    if not PER_TENSOR:
                        acc, part = _flush_group(acc, part, sc_ptr, offs_n, mask_n, stride_sn, c, j, W, GS, K, False)
        if PER_TENSOR:
            sc0 = tl.load(sc_ptr)
            acc = tl.math.div_rn(part.to(tl.float32), tl.zeros([BLOCK_M, BLOCK_N], tl.float32) + sc0)
        if X_INT8:
            sx = tl.load(sx_ptr + offs_m, mask=mask_m, other=1.0)
            acc = tl.math.div_rn(acc, tl.zeros([BLOCK_M, BLOCK_N], tl.float32) + sx[:, None])
        mask = mask_m[:, None] & mask_n[None, :]
        if HAS_RES:
            acc += tl.load(r_ptr + offs_m[:, None] * stride_rm + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)

    def _prune(configs, named_args, **kwargs):
        """Drop configs whose M tile is far larger than M, or whose GEMV register tile
        (BLOCK_N x W int32 accumulator) would spill."""
        def arg(name, default):
            return named_args.get(name, kwargs.get(name, default))

        M, W = arg("M", 1), arg("W", MAX_W)
        keep = []
        for c in configs:
            if "BLOCK_M" not in c.kwargs:    # GEMV
                if c.kwargs["BLOCK_N"] * W > 64 * 32 * c.num_warps:
                    continue
            elif c.kwargs["BLOCK_M"] > max(16, next_pow2(M)):
                continue
            elif c.kwargs["UNROLL"] > 1 and arg("IEEE", False):
                continue
            keep.append(c)
        return keep or configs[:1]

    if interpreting():
        _gemv = _gemv_kernel
        _dot = _dot_kernel
    else:
        _GEMV_CONFIGS = [
            triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=st)
            for bn, w, st in [(2, 1, 2), (4, 1, 2), (4, 2, 2), (8, 2, 2), (16, 4, 2), (32, 4, 1), (32, 8, 1)]
        ]
        _DOT_CONFIGS = [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "UNROLL": u}, num_warps=w, num_stages=2)
            for bm, bn, w in [(16, 16, 2), (16, 32, 4), (16, 64, 4), (32, 32, 4), (64, 16, 4), (64, 32, 4),
                              (64, 64, 4), (128, 32, 4), (128, 64, 8)] for u in _DOT_UNROLLS
        ]
        if os.environ.get("BITMAMBA_AUTOTUNE", "1") == "0":   # GPU tests: two configs each, fewer compiles
            _GEMV_CONFIGS = [_GEMV_CONFIGS[1], _GEMV_CONFIGS[4]]
            _DOT_CONFIGS = [_DOT_CONFIGS[3], _DOT_CONFIGS[12]]     # (16, 32) unrolled 8; (64, 64) not
        _prune_by = {"early_config_prune": _prune}
        # y may alias the residual (in-place residual stream): restore it after each tuning run
        _restore = ["y_ptr"]
        _gemv = triton.autotune(configs=_GEMV_CONFIGS, key=["N", "K", "W", "X_INT8", "HAS_NORM", "QUANT", "PER_TENSOR"],
                                prune_configs_by=_prune_by, restore_value=_restore)(_gemv_kernel)
        _dot = triton.autotune(configs=_DOT_CONFIGS, key=["M_BUCKET", "N", "K", "W", "PER_TENSOR", "X_INT8"],
                               prune_configs_by=_prune_by, restore_value=_restore)(_dot_kernel)


def _check(name: str, x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, group_size: int) -> tuple:
    if x.dim() != 2 or codes.dim() != 2:
        raise ValueError(f"{name}: x [M,K] and codes [N,*] expected, got {tuple(x.shape)}, {tuple(codes.shape)}")
    M, K = x.shape
    N = codes.shape[0]
    if codes.dtype == torch.int32:
        W = layout_width(K, group_size)
        want = -(-K // (16 * W)) * W
        if codes.shape[1] != want:
            raise ValueError(f"{name}: kernel-layout words {tuple(codes.shape)} do not match K={K}, "
                             f"group_size={group_size} (need [N, {want}]; see kernel_layout)")
    elif codes.dtype == torch.uint8:
        if codes.shape[1] * 4 != K:
            raise ValueError(f"{name}: codes {tuple(codes.shape)} do not match K={K} (need [N, K//4])")
    else:
        raise ValueError(f"{name}: codes must be uint8 [N, K//4] or int32 kernel-layout words, got {codes.dtype}")
    per_tensor = scale.numel() == 1
    if not per_tensor and tuple(scale.shape) != (N, K // group_size):
        raise ValueError(f"{name}: scale {tuple(scale.shape)} != [{N}, {K // group_size}]")
    return M, K, N, per_tensor


def _operands(x, codes, scale, group_size, per_tensor, out, out_dtype):
    """(group size, kernel-layout words, contiguous x, fp32 scale, output buffer) for a launch."""
    M, K = x.shape
    gs = K if per_tensor else group_size
    words = codes if codes.dtype == torch.int32 else kernel_layout(codes, K, gs)
    if x.stride(1) != 1:
        x = x.contiguous()
    if out is None:
        out = torch.empty(M, codes.shape[0], device=x.device, dtype=out_dtype)
    return gs, words, x, scale.float().contiguous(), out


def _launch_gemv(x, nw, sx, words, scale, out, residual, M, N, K, gs, per_tensor, eps, *, x_int8, has_norm, quant):
    res = residual if residual is not None else out
    W = layout_width(K, gs)
    nch = words.shape[1] // W
    stride_sn = 0 if per_tensor else scale.stride(0)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), M)  # noqa: E731
    extra = {} if not interpreting() else {"BLOCK_N": 8}
    _gemv[grid](x, nw, sx, words, scale, out, res, M, N, K, gs, nch, float(eps),
                x.stride(0), words.stride(0), stride_sn, out.stride(0), res.stride(0),
                X_INT8=x_int8, HAS_NORM=has_norm, QUANT=quant, PER_TENSOR=per_tensor, HAS_RES=residual is not None,
                W=W, BLOCK_P=min(next_pow2(K), 4096), **extra)


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
    M, K, N, per_tensor = _check("ternary_matmul", x, codes, scale, group_size)
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
    gs, words, x, scale, out = _operands(x, codes, scale, group_size, per_tensor, out, out_dtype)
    res = residual if residual is not None else out
    sx = s_x if s_x is not None else scale
    W = layout_width(K, gs)
    if M <= GEMV_MAX_M or (W < _MIN_DOT_W and not interpreting()):
        _launch_gemv(x, x, sx, words, scale, out, residual, M, N, K, gs, per_tensor, 0.0,
                     x_int8=act_int8, has_norm=False, quant=False)
        return out
    nch = words.shape[1] // W
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(M, meta["BLOCK_M"]))  # noqa: E731
    extra = {} if not interpreting() else {"BLOCK_M": 16, "BLOCK_N": 16, "UNROLL": 1 if act_int8 else 8}
    # tuned per power-of-two bucket of M, not per M: a caller with many row counts (up to 18 configs
    # benchmarked for each new key) pays the tuning once per bucket
    _dot[grid](x, sx, words, scale, out, res, M, N, K, gs, nch, next_pow2(M),
               x.stride(0), words.stride(0), 0 if per_tensor else scale.stride(0), out.stride(0), res.stride(0),
               X_INT8=act_int8, PER_TENSOR=per_tensor, IEEE=x.dtype == torch.float32, HAS_RES=residual is not None,
               W=W, **extra)
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

    M, K, N, per_tensor = _check("norm_ternary_matmul", x, codes, scale, group_size)
    which = resolve("norm_ternary_matmul", x.device, impl)
    if which == "ref" or M > GEMV_MAX_M:
        xq, sx = rmsnorm_quant(x, norm_w, eps, act_quant, impl=which)
        return ternary_matmul(xq, sx, codes, scale, group_size, out=out, out_dtype=out_dtype, residual=residual,
                              impl=which)
    gs, words, x, scale, out = _operands(x, codes, scale, group_size, per_tensor, out, out_dtype)
    _launch_gemv(x, norm_w if norm_w is not None else x, scale, words, scale, out, residual, M, N, K, gs, per_tensor, eps,
                 x_int8=False, has_norm=norm_w is not None, quant=act_quant)
    return out
