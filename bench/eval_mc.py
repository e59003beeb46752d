"""Benchmark: a local multiple-choice task through lm-eval, our adapter vs transformers' Mamba2.

    python bench/eval_mc.py                 # 2,000 questions x 4 choices, ~100-token contexts, bitmamba2-1b shape
    python bench/eval_mc.py --quick         # 64 questions on the tiny-bitmamba2 shape (CPU smoke run)

Both models have random weights and the same dimensions (d_model, layers, heads, head dim, state size,
groups, vocab): ours is `BitMambaLM` (ternary BitLinears, eval path) through the "bitmamba" adapter
(`rl/eval/lm.py`: one prefill per question, the state copied to the 4 choices); the other is
`transformers.Mamba2ForCausalLM` in bf16 through lm-eval's `hf` model (`HFLM(pretrained=<instance>)`,
which runs every (context + choice) as its own sequence). Variants: ours, ours-noreuse (our adapter
with one full forward per request), hf.

Reported per variant: wall seconds of lm-eval's loglikelihood call (after a warm-up run on a few
questions), request tokens per second (sum over requests of context + continuation tokens, the same
numerator for every variant), forward tokens our adapter actually ran, accuracy (chance level: ~25%),
peak GPU memory. Writes bench/results/eval_mc.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MAMBA_DETERMINISTIC", "1")   # mamba-ssm: one kernel config, no autotune minutes

from model.config import BitMambaConfig  # noqa: E402
from model.lm import BitMambaLM  # noqa: E402
from rollout.tokenizer import build_tiny_tokenizer  # noqa: E402

WORDS = ("state space model token weight ternary answer question river mountain city light energy "
         "water animal plant number language system memory signal value reason power market music "
         "history science forest ocean planet machine people school garden winter summer").split()

TASK_YAML = """task: bench_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}\\nQuestion: which word comes next?\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def make_task(directory: Path, tok, n_questions: int, context_tokens: int, seed: int = 0) -> dict:
    """Write n synthetic questions (4 one/two-word choices, ~context_tokens-token contexts) + task YAML."""
    rng = random.Random(seed)
    path = directory / "bench_mc.jsonl"
    with path.open("w") as f:
        for i in range(n_questions):
            words: list[str] = []
            while len(tok.encode(" ".join(words))) < context_tokens:
                words.append(rng.choice(WORDS))
            choices = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 2))) for _ in range(4)]
            f.write(json.dumps({"context": " ".join(words), "choices": choices, "label": rng.randrange(4)}) + "\n")
    from rl.eval.run import load_task_file

    yaml_path = directory / "bench_mc.yaml"
    yaml_path.write_text(TASK_YAML.format(path=path))
    return load_task_file(yaml_path)


def hf_mamba2(cfg: BitMambaConfig, device: str, dtype: torch.dtype):
    from transformers import Mamba2Config, Mamba2ForCausalLM

    hcfg = Mamba2Config(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                        expand=cfg.expand, head_dim=cfg.headdim, num_heads=cfg.n_heads, n_groups=cfg.ngroups,
                        state_size=cfg.d_state, conv_kernel=cfg.d_conv, chunk_size=cfg.chunk_size,
                        tie_word_embeddings=False, use_cache=False)
    return Mamba2ForCausalLM(hcfg).to(device=device, dtype=dtype).eval()


def request_tokens(requests) -> int:
    return sum(len(ctx) + len(cont) for _, ctx, cont in requests)


class Timer:
    """Wraps an lm-eval model's `loglikelihood` to time it and count its request tokens."""

    def __init__(self, lm):
        self.lm, self.seconds, self.tokens = lm, 0.0, 0
        inner_ll, inner_tok = lm.loglikelihood, lm._loglikelihood_tokens

        def tokens(reqs, *a, **k):
            self.tokens += request_tokens(reqs)
            return inner_tok(reqs, *a, **k)

        def ll(reqs, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = inner_ll(reqs, *a, **k)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - t0
            return out

        lm._loglikelihood_tokens = tokens
        lm.loglikelihood = ll


def run_variant(name: str, make_lm, task: dict, n: int, warmup: int) -> dict:
    from rl.eval.run import run_lm_eval

    lm = make_lm()
    run_lm_eval(lm, [task], limit=warmup, include_defaults=False)          # compile / autotune / caches
    if hasattr(lm, "scorer"):
        lm.scorer.stats = dict.fromkeys(lm.scorer.stats, 0)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    timer = Timer(lm)
    t0 = time.perf_counter()
    res = run_lm_eval(lm, [task], limit=n, include_defaults=False)
    wall = time.perf_counter() - t0
    row = {"variant": name, "questions": n, "requests": 4 * n, "loglikelihood_s": timer.seconds,
           "simple_evaluate_s": wall, "request_tokens": timer.tokens,
           "request_tokens_per_s": timer.tokens / max(timer.seconds, 1e-9),
           "questions_per_s": n / max(timer.seconds, 1e-9),
           "acc": res["results"]["bench_mc"]["acc,none"],
           "peak_gpu_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None}
    stats = getattr(getattr(lm, "scorer", None), "stats", None)
    if stats is not None:
        row["forward_tokens"] = stats["forward_tokens"]
    del lm
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shape, 64 questions (CPU smoke run)")
    p.add_argument("--shape", default=None, help="model preset (default bitmamba2-1b; tiny-bitmamba2 with --quick)")
    p.add_argument("--questions", type=int, default=None, help="default 2000 (64 with --quick)")
    p.add_argument("--context-tokens", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64, help="contexts per batch (ours) / requests per batch (hf)")
    p.add_argument("--variants", default="ours,ours-noreuse,hf")
    p.add_argument("--device", default=None)
    p.add_argument("--warmup", type=int, default=8, help="questions of the untimed warm-up run")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "eval_mc.json"))
    args = p.parse_args(argv)
    import lm_eval  # noqa: F401  (fail early: pip install lm-eval)

    from rl.eval.lm import BitMambaEvalLM

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    shape = args.shape or ("tiny-bitmamba2" if args.quick else "bitmamba2-1b")
    n = args.questions or (64 if args.quick else 2000)
    tok = build_tiny_tokenizer(384)   # any ids < vocab: random weights, so the text's meaning is irrelevant
    cfg = BitMambaConfig.preset(shape)
    if cfg.vocab_size < len(tok):
        cfg = BitMambaConfig.from_dict(dict(cfg.to_dict(), vocab_size=len(tok)))
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        task = make_task(Path(d), tok, n, args.context_tokens)
        for v in variants:
            if v in ("ours", "ours-noreuse"):
                torch.manual_seed(0)
                model = BitMambaLM(cfg).to(device).eval()

                def make(model=model, v=v):
                    return BitMambaEvalLM(model=model, tokenizer=tok, device=device, batch_size=args.batch_size,
                                          reuse_prefix=(v == "ours"))
            elif v == "hf":
                from lm_eval.models.huggingface import HFLM   # needs accelerate (lm-eval's [hf] extra)

                torch.manual_seed(0)
                dtype = torch.bfloat16 if device == "cuda" else torch.float32
                model = hf_mamba2(cfg, device, dtype)

                def make(model=model):
                    return HFLM(pretrained=model, tokenizer=tok, batch_size=args.batch_size, device=device)
            else:
                raise SystemExit(f"unknown variant {v!r} (ours, ours-noreuse, hf)")
            print(f"--- {v}: {shape}, {n} questions", flush=True)
            try:
                rows.append(run_variant(v, make, task, n, min(args.warmup, n)))
            except Exception as e:  # keep the other variants' numbers; say what failed
                print(f"{v} failed: {type(e).__name__}: {e}", flush=True)
                rows.append({"variant": v, "error": f"{type(e).__name__}: {e}"})
            del model
            if device == "cuda":
                torch.cuda.empty_cache()
    print(f"\n{'variant':<14} {'ll s':>9} {'req tok/s':>12} {'q/s':>9} {'acc':>6} {'fwd tok':>10} {'GPU GB':>7}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<14} error: {r['error']}")
            continue
        mem = f"{r['peak_gpu_mem_gb']:.1f}" if r["peak_gpu_mem_gb"] is not None else ""
        print(f"{r['variant']:<14} {r['loglikelihood_s']:>9.2f} {r['request_tokens_per_s']:>12.0f} "
              f"{r['questions_per_s']:>9.1f} {r['acc']:>6.3f} {r.get('forward_tokens', ''):>10} {mem:>7}")
    out = {"bench": "eval_mc", "shape": shape, "questions": n, "choices": 4, "context_tokens": args.context_tokens,
           "batch_size": args.batch_size, "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "quick": args.quick, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
