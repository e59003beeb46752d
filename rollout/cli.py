"""`bitmamba generate MODEL_DIR (--prompt TEXT | --prompt-ids "1 2 3") [options]`: sample completions.

Loads `BitMambaLM.from_pretrained(MODEL_DIR)` and, when MODEL_DIR holds one, its tokenizer; prints
each completion (and its token ids with --ids), its finish reason, then tokens/s.
"""

from __future__ import annotations

import argparse
import logging
import sys

from model.errors import BitMambaError
from rollout.types import SamplingParams


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bitmamba generate", description="Sample completions from a checkpoint.")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="checkpoint directory (config.json + model.safetensors)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs a tokenizer in MODEL_DIR)")
    src.add_argument("--prompt-ids", help='prompt token ids, e.g. "1 2 3" (no tokenizer needed)')
    p.add_argument("--max-new-tokens", type=int, default=SamplingParams.max_new_tokens)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--min-p", type=float, default=0.0, help="0 = off")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ids", action="store_true", help="also print the completion token ids")
    p.add_argument("--backend", choices=["auto", "torch", "fast"], default="auto")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--no-eos", action="store_true", help="do not stop at the tokenizer's EOS token")
    p.add_argument("--max-len", type=int, default=None,
                   help="context limit in tokens (prompt + new tokens); a longer request is an error")
    return p


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise BitMambaError(f"--prompt-ids: expected integers separated by spaces, got {text!r}") from None
    if not ids:
        raise BitMambaError("--prompt-ids: empty")
    return ids


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    import torch

    from model.lm import BitMambaLM
    from rollout.backends import make_backend
    from rollout.engine import Engine
    from rollout.tokenizer import has_tokenizer, load_tokenizer
    from rollout.types import GenRequest, SamplingParams

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = BitMambaLM.from_pretrained(args.model_dir, device=device).eval()
    tok = load_tokenizer(args.model_dir) if has_tokenizer(args.model_dir) else None
    if args.prompt is not None:
        if tok is None:
            raise BitMambaError(f"--prompt needs a tokenizer in {args.model_dir} (tokenizer.json); "
                                f"use --prompt-ids instead")
        prompt_ids = tok.encode(args.prompt, add_special_tokens=False)
        if not prompt_ids:
            raise BitMambaError("--prompt: encodes to zero tokens")
    else:
        prompt_ids = _parse_ids(args.prompt_ids)
    if args.max_len is not None and len(prompt_ids) + args.max_new_tokens > args.max_len:
        raise BitMambaError(f"prompt of {len(prompt_ids)} tokens + --max-new-tokens {args.max_new_tokens} "
                            f"exceeds the context limit --max-len {args.max_len}")
    eos = None if (tok is None or args.no_eos) else tok.eos_token_id
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                            n=args.num_samples, seed=args.seed, eos_token_id=eos)
    backend = make_backend(model, kind=args.backend)
    engine = Engine(backend, tokenizer=tok, slots=min(args.num_samples, 64))
    results = engine.generate([GenRequest(prompt_ids, params, request_id=0)])
    for r in results:
        head = f"--- sample {r.sample_index} ({r.finish_reason}, {len(r.token_ids)} tokens)"
        print(head)
        if r.text is not None:
            print(r.text)
        if args.ids or r.text is None:
            print("ids: " + " ".join(map(str, r.token_ids)))
    s = engine.last_stats
    print(f"--- {s.new_tokens} tokens in {s.wall_s:.3f}s: {s.tokens_per_s:.1f} tokens/s "
          f"(prefill {s.prefill_s * 1000:.1f} ms, time to first token "
          f"{min(r.ttft_s for r in results) * 1000:.1f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
