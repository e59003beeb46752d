"""Decode throughput: our FastBackend vs mamba-ssm generate, HF transformers generate, and the bandwidth limit.

    python bench/decode.py --preset bitmamba2-1b --batch 1 16 64 256 --prompt 128 --new 512 \
        --out bench/results/decode.json            # add --quick for a short end-to-end check

Random weights, greedy decoding. Ours: FastBackend (packed 2-bit weights, Triton kernels, CUDA graph
per batch bucket) in a tight loop with argmax on the device and no host sync until the end; the time
includes the (batched) prefill with the model's parallel forward. Reported per config: tokens/s
(new tokens of all rows / wall time incl. prefill), decode-only ms/step, time to first token, peak
memory and peak memory per sequence (above the weights).
(a) mamba-ssm `MambaLMHeadModel.generate(cg=True)` of the same dimensions in bf16 (which fast paths it
    had is recorded); (b) transformers `Mamba2ForCausalLM.generate` (bf16, fewer tokens, batch 1 and 64);
(c) bandwidth limit = bytes per step / measured device copy bandwidth, bytes = packed weights (+ the fp
    head if any) + 2 x recurrent state per sequence (+ the KV cache read) + embeddings + fp32 logits.
Every config runs in try/except: an OOM or error is recorded in the JSON instead of stopping the run.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.config import BitMambaConfig  # noqa: E402
from model.lm import BitMambaLM  # noqa: E402
from model.state import MambaState  # noqa: E402
from rollout.backends.triton_backend import FastBackend  # noqa: E402

DEV = "cuda"


def sync():
    torch.cuda.synchronize()


def free():
    gc.collect()
    torch.cuda.empty_cache()


def copy_bandwidth() -> float:
    """Device copy bandwidth in bytes/s, counting bytes read + written (1 GiB tensor, best of 10)."""
    a = torch.empty(2**28, dtype=torch.float32, device=DEV)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    best = float("inf")
    for _ in range(10):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        b.copy_(a)
        e1.record()
        sync()
        best = min(best, e0.elapsed_time(e1) / 1e3)
    n = a.numel() * 4 * 2
    del a, b
    free()
    return n / best


def err_record(e: BaseException) -> dict:
    oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()
    return {"error": ("OOM: " if oom else "") + f"{type(e).__name__}: {str(e)[:400]}",
            "trace": traceback.format_exc()[-1500:]}


# ---------------------------------------------------------------- ours
def bench_ours(model: BitMambaLM, batch: int, prompt: int, new: int, state_dtype, ssm_dtype) -> dict:
    V = model.config.vocab_size
    max_len = prompt + new + 1
    free()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t_setup = time.perf_counter()
    be = FastBackend(model, state_dtype=state_dtype, ssm_dtype=ssm_dtype)
    be.allocate(batch, max_len)   # graph capture (and Triton autotune) happen here, outside the timing
    sync()
    setup_s = time.perf_counter() - t_setup
    ids = torch.randint(0, V, (batch, prompt), device=DEV)
    rows = torch.arange(batch, device=DEV)

    def run(n_new: int):
        st = model.allocate_state(batch, max_len, dtype=state_dtype, device=DEV)
        logits = model(ids, state=st).logits[:, -1].float()      # batched prefill (parallel scan)
        be.load_rows(st, rows)
        tok = logits.argmax(-1)
        e_first = torch.cuda.Event(enable_timing=True)
        e_first.record()
        out = [tok]
        for _ in range(n_new - 1):
            tok = be.step(tok).argmax(-1)
            out.append(tok)
        return e_first, torch.stack(out, 1)

    be.allocate(batch, max_len)
    run(4)                      # warm-up (prefill kernels, allocator)
    sync()
    be.allocate(batch, max_len)
    torch.cuda.reset_peak_memory_stats()
    e0 = torch.cuda.Event(enable_timing=True)
    e1 = torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    e0.record()
    e_first, toks = run(new)
    e1.record()
    sync()
    wall = time.perf_counter() - t0
    ttft = e0.elapsed_time(e_first) / 1e3
    total = e0.elapsed_time(e1) / 1e3
    peak = torch.cuda.max_memory_allocated()
    assert toks.shape == (batch, new)
    del be
    free()
    return dict(tok_s=batch * new / total, total_s=total, wall_s=wall, ttft_s=ttft,
                ms_per_step=(total - ttft) / max(1, new - 1) * 1e3, setup_s=setup_s,
                peak_mem_GB=peak / 1e9, peak_mem_per_seq_MB=(peak - base) / batch / 1e6)


def bytes_per_step(model: BitMambaLM, be_packed_bytes: int, batch: int, prompt: int, new: int,
                   state_dtype, ssm_dtype) -> dict:
    c = model.config
    st = model.allocate_state(1, prompt + new + 1, dtype=state_dtype, device="meta")
    rec = 0
    kv = 0
    for ls in st.layers:
        if isinstance(ls, MambaState):
            rec += ls.conv.numel() * ls.conv.element_size()
            rec += ls.ssm.numel() * torch.empty((), dtype=ssm_dtype).element_size()
        else:  # KV cache read each step up to the average position, one new row written
            per_tok = 2 * ls.k[0, 0].numel() * ls.k.element_size()
            kv += per_tok * (prompt + new / 2)
    head = 0 if model.lm_head.ternary else model.lm_head.weight.numel() * 2
    emb = c.d_model * model.embedding.weight.element_size()
    per_seq = 2 * rec + kv + emb + c.vocab_size * 4
    return dict(weights=be_packed_bytes + head, state_per_seq=rec, kv_read_per_seq=kv,
                total=be_packed_bytes + head + batch * per_seq)


# ---------------------------------------------------------------- (a) mamba-ssm
def mamba_ssm_info() -> dict:
    info = {}
    try:
        from model import _mamba_ssm

        _mamba_ssm._install_placeholder()
        import mamba_ssm

        info["mamba_ssm"] = getattr(mamba_ssm, "__version__", "?")
    except Exception as e:  # noqa: BLE001
        info["mamba_ssm"] = f"missing ({e})"
        return info
    for mod in ("causal_conv1d", "causal_conv1d_cuda", "selective_scan_cuda", "flash_attn"):
        try:
            m = __import__(mod)
            info[mod] = "placeholder" if "placeholder" in (m.__doc__ or "") else "present"
        except Exception as e:  # noqa: BLE001
            info[mod] = f"missing ({type(e).__name__})"
    return info


def build_mamba_ssm(c: BitMambaConfig, d_state: int):
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    attn = c.attention_layer_indices
    try:  # mamba-ssm's MHA needs flash-attn's rotary embedding; without it, attention runs without RoPE
        import flash_attn.layers.rotary  # noqa: F401
        rotary = c.attn_head_dim
    except ImportError:
        rotary = 0
    mc = MambaConfig(
        d_model=c.d_model, d_intermediate=0, n_layer=c.n_layers, vocab_size=c.vocab_size,
        ssm_cfg=dict(layer="Mamba2", d_state=d_state, headdim=c.headdim, ngroups=c.ngroups,
                     d_conv=c.d_conv, expand=c.expand),
        attn_layer_idx=attn, attn_cfg=(dict(num_heads=c.attn_heads, num_heads_kv=c.attn_kv_heads,
                                            head_dim=c.attn_head_dim, rotary_emb_dim=rotary)
                                       if attn else {}),
        rms_norm=True, residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=16,
        tie_embeddings=False)
    return MambaLMHeadModel(mc, device=DEV, dtype=torch.bfloat16).eval()


def bench_generate(gen_fn, batch: int, prompt: int, new: int, V: int) -> dict:
    ids = torch.randint(0, V, (batch, prompt), device=DEV)
    gen_fn(ids, min(new, 8))  # warm-up (graph capture / compile for this batch)
    sync()
    gen_fn(ids, new)  # mamba-ssm's graph cache is keyed by max_length: capture the timed length too
    sync()
    free()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    n_out = gen_fn(ids, new)
    sync()
    total = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated()
    return dict(tok_s=batch * n_out / total, total_s=total, new_tokens=n_out, peak_mem_GB=peak / 1e9,
                peak_mem_per_seq_MB=(peak - base) / batch / 1e6)


def baseline_rows(label, gen, batches, prompt, new, vocab, res: dict, on_row) -> None:
    """res[str(b)] = bench_generate(gen, b, ...) per batch (an error is recorded, not raised)."""
    for b in batches:
        try:
            res[str(b)] = bench_generate(gen, b, prompt, new, vocab)
        except Exception as e:  # noqa: BLE001
            res[str(b)] = err_record(e)
        free()
        print(f"  {label} batch {b}: {res[str(b)].get('tok_s', res[str(b)].get('error'))}", flush=True)
        on_row()


def bench_mamba_ssm(c: BitMambaConfig, batches, prompt, new, res: dict, on_row=lambda: None) -> dict:
    info = mamba_ssm_info()
    res["info"] = info
    if str(info.get("mamba_ssm", "")).startswith("missing"):
        res["error"] = "mamba-ssm not installed"
        return res
    model = None
    for d_state in dict.fromkeys([c.d_state, 16]):
        try:
            model = build_mamba_ssm(c, d_state)
            res["d_state"] = d_state
            ids = torch.randint(0, c.vocab_size, (1, 8), device=DEV)
            model.generate(ids, max_length=12, cg=True, top_k=1)   # smoke test of this d_state
            break
        except Exception as e:  # noqa: BLE001
            res[f"d_state_{d_state}_failed"] = err_record(e)["error"]
            model = None
            free()
    if model is None:
        return res

    def gen(ids, n):
        out = model.generate(ids, max_length=ids.shape[1] + n, cg=True, top_k=1, return_dict_in_generate=True,
                             output_scores=False)
        return out.sequences.shape[1] - ids.shape[1]

    baseline_rows("mamba-ssm", gen, batches, prompt, new, c.vocab_size, res, on_row)
    del model
    free()
    return res


# ---------------------------------------------------------------- (b) transformers
def bench_hf(c: BitMambaConfig, batches, prompt, new, res: dict, on_row=lambda: None) -> dict:
    try:
        import transformers
        from transformers import Mamba2Config, Mamba2ForCausalLM

        res["transformers"] = transformers.__version__
        hc = Mamba2Config(num_heads=c.n_heads, head_dim=c.headdim, hidden_size=c.d_model, state_size=c.d_state,
                          expand=c.expand, n_groups=c.ngroups, conv_kernel=c.d_conv, num_hidden_layers=c.n_layers,
                          vocab_size=c.vocab_size, chunk_size=c.chunk_size, tie_word_embeddings=False,
                          layer_norm_epsilon=c.norm_eps, rms_norm=True, eos_token_id=None, pad_token_id=0,
                          bos_token_id=None)
        model = Mamba2ForCausalLM(hc).to(DEV, torch.bfloat16).eval()
        if c.attention_layer_indices:
            res["note"] = "transformers' Mamba2 has no attention layers: pure-Mamba stack of the same dims"
    except Exception as e:  # noqa: BLE001
        res.update(err_record(e))
        return res

    def gen(ids, n):
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             attention_mask=torch.ones_like(ids))
        return out.shape[1] - ids.shape[1]

    with torch.no_grad():
        baseline_rows("transformers", gen, batches, prompt, new, c.vocab_size, res, on_row)
    del model
    free()
    return res


# ---------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", nargs="+", default=["bitmamba2-1b"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=512)
    ap.add_argument("--hf-new", type=int, default=64)
    ap.add_argument("--hf-batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="our model's fp params/activations")
    ap.add_argument("--ssm-dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--skip", nargs="*", default=[], choices=["mamba_ssm", "hf"])
    ap.add_argument("--quick", action="store_true", help="prompt 32, 64 new, batch 1 16, HF batch 1, 16 new")
    ap.add_argument("--out", default="bench/results/decode.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/decode.py needs CUDA", file=sys.stderr)
        return 2
    if args.quick:
        args.prompt, args.new, args.batch, args.hf_batch, args.hf_new = 32, 64, [1, 16], [1], 16
    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}
    mdtype, ssm_dtype = dt[args.dtype], dt[args.ssm_dtype]
    state_dtype = mdtype
    bw = copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}: copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    report = dict(command=" ".join(sys.argv), device=torch.cuda.get_device_name(), torch=torch.__version__,
                  copy_bandwidth_TBps=bw / 1e12, prompt=args.prompt, new=args.new, dtype=args.dtype,
                  ssm_dtype=args.ssm_dtype, presets={})
    try:
        import triton

        report["triton"] = triton.__version__
    except ImportError:
        pass
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():   # after every measured row: a run cut off by a time limit keeps what it measured
        out.write_text(json.dumps(report, indent=1, default=str))

    for preset in args.preset:
        c = BitMambaConfig.preset(preset)
        print(f"== {preset}", flush=True)
        pr = report["presets"][preset] = {"config": c.to_dict(), "ours": {}, "limit": {}}
        torch.manual_seed(0)
        model = BitMambaLM(c).to(DEV, mdtype).eval()
        torch.set_grad_enabled(False)
        packed = FastBackend(model, use_graphs=False)
        packed_bytes = sum(p.codes.numel() * p.codes.element_size() + p.scale.numel() * 4 for p in packed.packed.values())
        del packed
        for b in args.batch:
            by = bytes_per_step(model, packed_bytes, b, args.prompt, args.new, state_dtype, ssm_dtype)
            pr["limit"][str(b)] = dict(bytes_per_step=by, tok_s=b / (by["total"] / bw),
                                       ms_per_step=by["total"] / bw * 1e3)
            try:
                pr["ours"][str(b)] = bench_ours(model, b, args.prompt, args.new, state_dtype, ssm_dtype)
            except Exception as e:  # noqa: BLE001
                pr["ours"][str(b)] = err_record(e)
            free()
            o = pr["ours"][str(b)]
            print(f"  ours batch {b}: {o.get('tok_s', o.get('error'))}  (limit {pr['limit'][str(b)]['tok_s']:.0f})",
                  flush=True)
            save()
        del model
        free()
        if "mamba_ssm" not in args.skip:
            bench_mamba_ssm(c, args.batch, args.prompt, args.new, pr.setdefault("mamba_ssm", {}), save)
        if "hf" not in args.skip:
            bench_hf(c, list(args.hf_batch), args.prompt, args.hf_new, pr.setdefault("hf", {}), save)
        print_table(preset, pr, args.batch)
        save()
    print(f"wrote {args.out}")
    return 0


def print_table(preset: str, pr: dict, batches) -> None:
    def tok(d, b):
        v = (d or {}).get(str(b), {})
        return v.get("tok_s") if isinstance(v, dict) else None

    print(f"\n{preset}: tokens/s (ours incl. prefill) and ratios")
    print(f"{'batch':>6} {'ours':>10} {'ttft ms':>8} {'MB/seq':>8} {'mamba-ssm':>10} {'x(a)':>6} {'HF':>8} {'x(b)':>7} "
          f"{'limit':>10} {'%(c)':>6}")
    for b in batches:
        o = pr["ours"].get(str(b), {})
        ours = o.get("tok_s")
        a, h, lim = tok(pr.get("mamba_ssm"), b), tok(pr.get("hf"), b), pr["limit"][str(b)]["tok_s"]

        def f(v, w=10, p=0):
            return f"{v:>{w}.{p}f}" if isinstance(v, (int, float)) else f"{'-':>{w}}"

        ra = ours / a if ours and a else None
        rb = ours / h if ours and h else None
        rc = 100 * ours / lim if ours else None
        print(f"{b:>6} {f(ours)} {f(o.get('ttft_s', 0) * 1e3 if ours else None, 8, 1)} "
              f"{f(o.get('peak_mem_per_seq_MB'), 8, 1)} {f(a)} {f(ra, 6, 2)} {f(h, 8)} {f(rb, 7, 1)} {f(lim)} "
              f"{f(rc, 6, 1)}")
    print()


if __name__ == "__main__":
    raise SystemExit(main())
