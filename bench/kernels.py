"""Decode-kernel microbenchmark (GPU): packed ternary matmul vs bf16 cuBLAS, fused norm+quant, Mamba step.

    python bench/kernels.py --preset bitmamba2-1b --m 1 16 64 256 --out bench/results/kernels.json

Times are CUDA-graph replays (triton.testing.do_bench_cudagraph), so launch overhead is excluded;
GB/s counts the bytes each kernel must move (packed codes + scales + activations in + outputs).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.config import BitMambaConfig  # noqa: E402
from rollout.kernels.act_quant import rmsnorm_quant  # noqa: E402
from rollout.kernels.mamba_step import MambaDims, mamba_step  # noqa: E402
from rollout.kernels.ternary_matmul import GEMV_MAX_M, kernel_layout, norm_ternary_matmul, ternary_matmul  # noqa: E402


def bench_ms(fn) -> float:
    import triton.testing as tt

    fn()
    torch.cuda.synchronize()
    try:
        return float(tt.do_bench_cudagraph(fn, rep=50))
    except Exception:  # noqa: BLE001 - fall back to stream timing, say so in the JSON
        return float(tt.do_bench(fn, rep=50))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="bitmamba2-1b")
    ap.add_argument("--m", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--group-size", type=int, default=128, help="also time grouped scales (0: skip)")
    ap.add_argument("--out", default="bench/results/kernels.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/kernels.py needs CUDA", file=sys.stderr)
        return 2
    dev = "cuda"
    c = BitMambaConfig.preset(args.preset)
    shapes = {"in_proj": (c.d_in_proj, c.d_model), "out_proj": (c.d_model, c.d_inner),
              "lm_head": (c.vocab_size, c.d_model)}
    rows = []
    for name, (N, K) in shapes.items():
        codes = torch.randint(0, 255, (N, K // 4), device=dev, dtype=torch.uint8)
        codes = codes & 0x55  # every 2-bit field in {0, 1}: valid ternary codes
        w_bf16 = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
        variants = [("tensor", torch.ones(1, 1, device=dev), K)]
        if args.group_size and K % args.group_size == 0:
            variants.append(("group", torch.rand(N, K // args.group_size, device=dev) + 0.5, args.group_size))
        for M in args.m:
            x_q = torch.randint(-128, 128, (M, K), device=dev, dtype=torch.int8)
            s_x = torch.rand(M, device=dev) + 1
            x_bf = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            y = torch.empty(M, N, device=dev, dtype=torch.bfloat16)
            t_cublas = bench_ms(lambda: torch.matmul(x_bf, w_bf16.t(), out=y))
            bytes_bf16 = N * K * 2 + M * K * 2 + M * N * 2
            for kind, scale, gs in variants:
                words = kernel_layout(codes, K, gs)     # FastBackend keeps this layout (converted once)
                t = bench_ms(lambda: ternary_matmul(x_q, s_x, words, scale, gs, out=y))
                if M <= GEMV_MAX_M:   # what decode runs at small batch: RMSNorm + int8 quant fused in
                    x_f = torch.randn(M, K, device=dev)
                    nw = torch.randn(K, device=dev)
                    t_f = bench_ms(lambda: norm_ternary_matmul(x_f, nw, 1e-6, True, words, scale, gs, out=y))
                    rows.append(dict(op=name + "+norm", N=N, K=K, M=M, scale=kind, ternary_us=t_f * 1e3,
                                     ternary_GBps=(codes.numel() + M * K * 4) / t_f / 1e6))
                    print(f"{name + '+norm':14s} M={M:4d} {kind:6s} fused norm+quant+GEMV {t_f * 1e3:8.1f} us", flush=True)
                bytes_t = codes.numel() + scale.numel() * 4 + M * K + M * 4 + M * N * 2
                rows.append(dict(op=name, N=N, K=K, M=M, scale=kind, ternary_us=t * 1e3, cublas_bf16_us=t_cublas * 1e3,
                                 speedup=t_cublas / t, ternary_GBps=bytes_t / t / 1e6,
                                 cublas_GBps=bytes_bf16 / t_cublas / 1e6))
                print(f"{name:9s} N={N:6d} K={K:5d} M={M:4d} {kind:6s} ternary {t * 1e3:8.1f} us "
                      f"({bytes_t / t / 1e6:7.0f} GB/s)   cuBLAS bf16 {t_cublas * 1e3:8.1f} us "
                      f"({bytes_bf16 / t_cublas / 1e6:7.0f} GB/s)   x{t_cublas / t:5.2f}", flush=True)
    d = MambaDims.from_config(c)
    for M in args.m:
        x = torch.randn(M, c.d_inner, device=dev)
        w = torch.randn(c.d_inner, device=dev)
        t_nq = bench_ms(lambda: rmsnorm_quant(x, w, 1e-6, True, c.ngroups if c.gated_norm else 1))
        zx = torch.randn(M, d.d_in_proj, device=dev)
        conv = torch.zeros(M, d.conv_dim, d.d_conv - 1, device=dev)
        ssm = torch.zeros(M, d.n_heads, d.headdim, d.d_state, device=dev)
        cw = torch.randn(d.conv_dim, 1, d.d_conv, device=dev)
        cb = torch.randn(d.conv_dim, device=dev)
        h = torch.randn(d.n_heads, device=dev)
        D = torch.randn(d.d_inner if d.d_per_channel else d.n_heads, device=dev)
        t_ms = bench_ms(lambda: mamba_step(zx, conv, cw, cb, h, h, D, ssm, d))
        st_bytes = 2 * (ssm.numel() * 4 + conv.numel() * 4) + zx.numel() * 4 + M * d.d_inner * 4
        rows.append(dict(op="rmsnorm_quant", M=M, K=c.d_inner, us=t_nq * 1e3))
        rows.append(dict(op="mamba_step", M=M, us=t_ms * 1e3, GBps=st_bytes / t_ms / 1e6))
        print(f"rmsnorm_quant M={M:4d} K={c.d_inner}: {t_nq * 1e3:6.1f} us   mamba_step M={M:4d}: {t_ms * 1e3:6.1f} us "
              f"({st_bytes / t_ms / 1e6:6.0f} GB/s)", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(preset=args.preset, device=torch.cuda.get_device_name(),
                                   torch=torch.__version__, rows=rows), indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
