"""The `bitmamba convert` argument parser, without torch (so `--help` and argument errors answer at once)."""

from __future__ import annotations

import argparse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bitmamba convert",
                                description="Convert checkpoints between our format, Hugging Face Mamba2ForCausalLM "
                                            "and the BitMamba-2 C++ engine's .bin.")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--from", dest="src_fmt", choices=["hf-mamba2", "bitmamba2-bin"],
                   help="convert a checkpoint of this format into ours")
    g.add_argument("--to", dest="dst_fmt", choices=["hf-mamba2", "bitmamba2-bin"],
                   help="convert ours into this format")
    p.add_argument("src", help="source: HF dir, .bin file, or our checkpoint dir (with --to)")
    p.add_argument("dst", help="destination: our checkpoint dir, or (with --to) the HF dir / .bin file")
    p.add_argument("--no-quant", action="store_true",
                   help="hf-mamba2 only: keep plain fp linear layers (quant.ternary=false)")
    return p
