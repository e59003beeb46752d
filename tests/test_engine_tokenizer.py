"""The tiny offline tokenizer (rollout/tokenizer.py): round trips, special tokens, save/load."""

import pytest

from model.errors import CheckpointError, ConfigError
from rollout.tokenizer import MIN_VOCAB, SPECIAL_TOKENS, build_tiny_tokenizer, has_tokenizer, load_tokenizer

TEXT = "Hello <|im_start|>user\nWhat is 12+35?<|im_end|> é ünïcode 🙂 <tool_call>{\"a\": 1}</tool_call>"


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer(384)


def test_round_trip_and_atomic_special_tokens(tok):
    assert len(tok) == 384
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert tok.decode(ids) == TEXT
    for i, sp in enumerate(SPECIAL_TOKENS):            # specials first, each one id
        assert tok.convert_tokens_to_ids(sp) == i
        assert tok.encode(f"a{sp}b", add_special_tokens=False).count(i) == 1
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 0 and tok.pad_token_id == 1
    assert max(ids) < 384 and len(ids) < len(TEXT.encode())   # merges compress


def test_deterministic_and_pure_bytes_minimum(tok):
    assert build_tiny_tokenizer(384).get_vocab() == tok.get_vocab()
    bytes_only = build_tiny_tokenizer(MIN_VOCAB)
    ids = bytes_only.encode("hello", add_special_tokens=False)
    assert len(ids) == 5 and bytes_only.decode(ids) == "hello"
    with pytest.raises(ConfigError, match="vocab_size"):
        build_tiny_tokenizer(256)


def test_save_load_offline_and_chat_template(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    assert has_tokenizer(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.encode(TEXT, add_special_tokens=False) == tok.encode(TEXT, add_special_tokens=False)
    chat = loaded.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                      add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no tokenizer"):
        load_tokenizer(empty)


@pytest.mark.parametrize("cleanup", [False, True])
def test_fast_codec_equals_the_transformers_wrapper(cleanup):
    import random

    from rollout.tokenizer import FastCodec, build_tiny_tokenizer

    t = build_tiny_tokenizer(384)
    t.clean_up_tokenization_spaces = cleanup
    c = FastCodec(t)
    assert c.fast   # whether the wrapper cleans up (transformers 5 ignores it for BPE) is probed, not assumed
    rng = random.Random(0)
    texts = ["a , b . c ' s n't", "<|im_start|>tool\n<tool_response>1 ?</tool_response><|im_end|>", "é 日本 \t x"]
    for _ in range(100):
        ids = [rng.randrange(len(t)) for _ in range(rng.randrange(0, 50))]
        assert c.decode(ids) == t.decode(ids, skip_special_tokens=False)
        texts.append(t.decode(ids, skip_special_tokens=False))
    for s in texts:
        assert c.encode(s) == t.encode(s, add_special_tokens=False)
        assert c.decode(t.encode(s, add_special_tokens=False)) == t.decode(t.encode(s, add_special_tokens=False),
                                                                           skip_special_tokens=False)


def test_fast_codec_keeps_the_wrapper_for_a_tokenizer_without_a_rust_backend():
    from rollout.tokenizer import FastCodec

    class Slow:
        def encode(self, text, add_special_tokens=False):
            return [ord(ch) for ch in text]

        def decode(self, ids, skip_special_tokens=False):
            return "".join(map(chr, ids))

    c = FastCodec(Slow())
    assert not c.fast and c.encode("hi") == [104, 105] and c.decode([104, 105]) == "hi"
