"""`bitmamba generate` end to end on a saved tiny model directory (with and without a tokenizer)."""

import pytest
import torch

from model.config import BitMambaConfig
from model.errors import BitMambaError
from model.lm import BitMambaLM
from rl.cli import main as bitmamba
from rollout.cli import main
from rollout.reference import naive_generate
from rollout.tokenizer import build_tiny_tokenizer, load_tokenizer
from rollout.types import SamplingParams


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    tok = build_tiny_tokenizer(384)
    torch.manual_seed(0)
    model = BitMambaLM(BitMambaConfig.preset("tiny", vocab_size=len(tok))).eval()
    with_tok = tmp_path_factory.mktemp("ckpt") / "tiny"
    model.save_pretrained(with_tok)
    tok.save_pretrained(with_tok)          # after the model: save_pretrained replaces the directory
    bare = tmp_path_factory.mktemp("ckpt") / "bare"
    model.save_pretrained(bare)
    return model, tok, with_tok, bare


def _ids_lines(out):
    return [[int(t) for t in line[5:].split()] for line in out.splitlines() if line.startswith("ids: ")]


def test_prompt_ids_greedy_matches_naive(dirs, capsys):
    model, _, _, bare = dirs
    assert main([str(bare), "--prompt-ids", "5 17 42 9", "--max-new-tokens", "7", "--temperature", "0",
                 "--ids", "--backend", "torch"]) == 0
    out = capsys.readouterr().out
    want = naive_generate(model, [5, 17, 42, 9], SamplingParams(max_new_tokens=7, temperature=0)).token_ids
    assert _ids_lines(out) == [want]
    assert "(length, 7 tokens)" in out and "tokens/s" in out


def test_prompt_text_with_tokenizer_and_samples(dirs, capsys):
    model, tok, with_tok, _ = dirs
    assert load_tokenizer(with_tok).encode("hi there") == tok.encode("hi there")
    argv = [str(with_tok), "--prompt", "The answer is", "--max-new-tokens", "6", "--num-samples", "3",
            "--temperature", "0.9", "--top-k", "50", "--top-p", "0.95", "--min-p", "0.01",
            "--repetition-penalty", "1.1", "--seed", "4", "--ids"]
    assert bitmamba(["generate", *argv]) == 0           # through the router
    out = capsys.readouterr().out
    samples = _ids_lines(out)
    assert len(samples) == 3 and all(1 <= len(s) <= 6 for s in samples)
    assert out.count("--- sample") == 3
    for s in samples:                                    # the text printed is the decoded ids
        assert tok.decode(s, skip_special_tokens=False) in out
    assert main(argv) == 0                              # same seed: same samples
    assert _ids_lines(capsys.readouterr().out) == samples


def test_user_errors(dirs, capsys):
    _, _, _, bare = dirs
    with pytest.raises(BitMambaError, match="tokenizer"):
        main([str(bare), "--prompt", "hello"])
    with pytest.raises(BitMambaError, match="prompt-ids"):
        main([str(bare), "--prompt-ids", "1 two 3"])
    assert bitmamba(["generate", str(bare), "--prompt", "hello"]) == 2      # one clean line, exit 2
    assert "needs a tokenizer" in capsys.readouterr().err


def test_fast_backend_flag(dirs, capsys):
    pytest.importorskip("rollout.backends.triton_backend")
    model, _, _, bare = dirs
    assert main([str(bare), "--prompt-ids", "5 17 42 9", "--max-new-tokens", "5", "--temperature", "0",
                 "--backend", "fast"]) == 0
    got = _ids_lines(capsys.readouterr().out)[0]
    want = naive_generate(model, [5, 17, 42, 9], SamplingParams(max_new_tokens=5, temperature=0)).token_ids
    assert got == want
