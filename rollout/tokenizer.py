"""Tokenizers: a tiny byte-level BPE built offline (tests, demo, tiny models) and loading any HF one.

    tok = build_tiny_tokenizer(vocab_size=384)      # transformers PreTrainedTokenizerFast, no download
    tok.save_pretrained(model_dir)                  # beside config.json / model.safetensors
    tok = load_tokenizer(model_dir)                 # AutoTokenizer, offline for a local dir

The tiny tokenizer is byte-level BPE (GPT-2 style byte alphabet, so every string round-trips) trained
deterministically on a small embedded corpus, with ChatML / reasoning / tool-call special tokens and a
ChatML chat template, so the pretrain, SFT and GRPO stages can use it exactly like a real one.
Ids: the special tokens first (0..len(SPECIAL_TOKENS)-1), then the 256 byte symbols, then merges.
"""

from __future__ import annotations

from pathlib import Path

from model.errors import CheckpointError, ConfigError
from rollout.chatml import (CHATML_TEMPLATE, IM_END, IM_START, THINK_END, THINK_START, TOOL_CALL_END, TOOL_CALL_START,
                            TOOL_RESPONSE_END, TOOL_RESPONSE_START)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS: list[str] = [
    EOS_TOKEN, PAD_TOKEN, IM_START, IM_END, THINK_START, THINK_END,
    TOOL_CALL_START, TOOL_CALL_END, TOOL_RESPONSE_START, TOOL_RESPONSE_END,
]
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A language model predicts the next token of a text.
Mamba is a state space model: it reads a sequence one token at a time and keeps a fixed-size state.
Ternary weights take the values -1, 0 and +1, so a matrix multiply needs only additions.
Question: What is 12 + 35? Let me think step by step. 12 + 35 = 47. The answer is 47.
Question: What is 7 * 8? 7 * 8 = 56. The answer is 56.
Question: If a train travels 60 km in 1 hour, how far does it travel in 3 hours? 60 * 3 = 180 km.
<|im_start|>system
You are a helpful assistant.<|im_end|>
<|im_start|>user
What is the capital of France?<|im_end|>
<|im_start|>assistant
<think>The user asks for the capital of France. It is Paris.</think>
The capital of France is Paris.<|im_end|>
<|im_start|>user
Compute 123456 * 789.<|im_end|>
<|im_start|>assistant
<tool_call>{"name": "calculator", "arguments": {"expression": "123456 * 789"}}</tool_call><|im_end|>
<|im_start|>tool
<tool_response>97406784</tool_response><|im_end|>
<|im_start|>assistant
The result is 97406784.<|im_end|>
def add(a, b):
    return a + b

for i in range(10):
    print(i, add(i, i))
{"answer": 42, "reasoning": "six times seven is forty-two"}
The answer is \\boxed{42}. There are 365 days in a year and 24 hours in a day.
Reinforcement learning rewards the model when the answer is correct and the format is right.
"""


def build_tiny_tokenizer(vocab_size: int = 384, corpus: str | None = None):
    """A byte-level BPE `PreTrainedTokenizerFast` with `vocab_size` tokens (>= MIN_VOCAB = 266).

    vocab_size == MIN_VOCAB gives pure bytes + specials (no merges). Deterministic: the same
    arguments give the same vocabulary. eos "<|endoftext|>", pad "<|pad|>".
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < MIN_VOCAB:
        raise ConfigError(f"vocab_size: the tiny tokenizer needs at least {MIN_VOCAB} "
                          f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens), got {vocab_size}")
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    text = _CORPUS if corpus is None else corpus
    for sp in SPECIAL_TOKENS:   # specials are atoms: keep them out of the merge statistics
        text = text.replace(sp, "\n")
    tk.train_from_iterator(text.splitlines(), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                  additional_special_tokens=SPECIAL_TOKENS[2:])
    tok.chat_template = CHATML_TEMPLATE
    return tok


def has_tokenizer(path: str | Path) -> bool:
    """True if `path` is a directory holding a saved HF tokenizer."""
    p = Path(path)
    return p.is_dir() and ((p / "tokenizer.json").exists() or (p / "tokenizer_config.json").exists())


def load_tokenizer(path_or_name: str | Path):
    """`AutoTokenizer.from_pretrained` of a local directory (offline) or a hub name.

    A local directory without tokenizer files raises `CheckpointError` naming it.
    """
    from transformers import AutoTokenizer

    p = Path(path_or_name)
    if p.exists():
        if not has_tokenizer(p):
            raise CheckpointError(f"{p}: no tokenizer here (tokenizer.json / tokenizer_config.json missing)")
        return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    try:
        return AutoTokenizer.from_pretrained(str(path_or_name))
    except OSError as e:
        raise CheckpointError(f"tokenizer {path_or_name!r}: not a local directory and not loadable "
                              f"from the hub ({e})") from e


# special tokens, non-ASCII, and the spaces before punctuation that `clean_up_tokenization` removes
_PROBE = "<|im_start|>user\nÀ 12 + 35 = ? a , b . it 's n't\t日本 <tool_call>{\"a\": 1}</tool_call><|im_end|>\n"


class FastCodec:
    """`decode(ids)` / `encode(text)` (special tokens kept, none added) straight through the Rust
    `tokenizers.Tokenizer` behind a transformers fast tokenizer: the transformers wrappers spend
    ~0.1-0.2 ms per call in Python (converting every id, building an encoding object), which the
    decode thread pays for every pause and finished sample. Used only when a probe round-trips the
    same as the wrapper (ids and text, including special tokens and non-ASCII); otherwise, or for a
    slow tokenizer, the wrapper's own methods (identical results either way)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.fast = False
        rust = getattr(tokenizer, "_tokenizer", None)
        if rust is None or not hasattr(rust, "encode") or not hasattr(rust, "decode"):
            return
        self._rust = rust
        try:
            ids = tokenizer.encode(_PROBE, add_special_tokens=False)
            want = tokenizer.decode(ids, skip_special_tokens=False)
            if self._encode_rust(_PROBE) != ids:
                return
            # whether the wrapper cleans up spaces is decided by what it does on the probe, not by the
            # attribute: transformers 5 ignores `clean_up_tokenization_spaces` for BPE models, 4.x applies it
            declared = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
            for cleanup in (declared, not declared):
                self._cleanup = cleanup
                if self._decode_rust(ids) == want:
                    self.fast = True
                    return
        except Exception:   # any oddity of a custom tokenizer: keep the wrapper
            pass
        self.fast = False

    def _encode_rust(self, text: str) -> list[int]:
        return self._rust.encode(text, add_special_tokens=False).ids

    def _decode_rust(self, ids) -> str:
        text = self._rust.decode(list(ids), skip_special_tokens=False)
        return self.tok.clean_up_tokenization(text) if self._cleanup else text

    def encode(self, text: str) -> list[int]:
        return self._encode_rust(text) if self.fast else self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self._decode_rust(ids) if self.fast else self.tok.decode(list(ids), skip_special_tokens=False)
