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
