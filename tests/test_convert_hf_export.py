"""Ours -> HF `Mamba2ForCausalLM` (`bitmamba convert --to hf-mamba2`): transformers computes our logits
(fp32, 1e-4), HF -> ours -> HF is the identity, the tokenizer travels along, unexportable layouts are refused
with the fields named."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model.config import BitMambaConfig
from model.convert import import_hf, main
from model.errors import CheckpointError, ConfigError
from model.hf_mamba2 import hf_export_problems
from model.lm import BitMambaLM
from model.typed import apply_overrides, read_mapping
from rollout.tokenizer import build_tiny_tokenizer
from test_convert_hf import make_hf, needs_grouped_norm

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
V = 384


def make_ours(d: Path, seed=0, tokenizer=True, **over):
    """A small random quant-off model of ours saved with save_pretrained (+ the tiny tokenizer); norms, D,
    dt_bias, A_log and conv biases perturbed so that a wrong mapping of any of them shows in the logits,
    embedding scaled up so that the logits are of order 1 also when the head is the tied embedding."""
    torch.manual_seed(seed)
    cfg = BitMambaConfig.preset("tiny", vocab_size=V, chunk_size=8, quant={"ternary": False}, **over)
    model = BitMambaLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith((".D", "dt_bias", "A_log", "conv1d.bias")):
                p.add_(torch.randn_like(p) * 0.3)
        model.embedding.weight.mul_(30.0)
    model.save_pretrained(d)
    if tokenizer:
        build_tiny_tokenizer(V).save_pretrained(str(d))
    return model


def export(src, dst) -> None:
    assert main(["--to", "hf-mamba2", str(src), str(dst)]) == 0


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.fixture(scope="module", params=[
    pytest.param(dict(), id="g1"), pytest.param(dict(tie_embeddings=True), id="g1-tied"),
    pytest.param(dict(ngroups=2), id="g2", marks=needs_grouped_norm)])
def exported(request, tmp_path_factory):
    base = tmp_path_factory.mktemp("export")
    ours = make_ours(base / "ours", seed=len(request.param), **request.param)
    export(base / "ours", base / "hf")
    hf = transformers.Mamba2ForCausalLM.from_pretrained(str(base / "hf")).eval()
    return ours, hf, base


@pytest.mark.parametrize("T", [7, 21])  # odd length; 21 > chunk_size 8 (multi-chunk scan)
def test_exported_logits_equal_ours(exported, T):
    ours, hf, _ = exported
    assert hf.dtype == torch.float32
    assert hf.config.tie_word_embeddings == ours.config.tie_embeddings
    ids = torch.randint(0, V, (2, T))
    ref, got = _logits(ours, ids), _logits(hf, ids)
    assert ref.abs().max() > 1.0
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)


def test_exported_decode_equals_our_step(exported):
    """transformers' generate (recurrent cache path) gives our step() logits: greedy tokens and every logit."""
    ours, hf, _ = exported
    ids = torch.randint(0, V, (2, 9))
    n_new = 6
    with torch.no_grad():
        out = hf.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, output_logits=True,
                          return_dict_in_generate=True, eos_token_id=None, pad_token_id=1)
        state = ours.allocate_state(2)
        logits = ours(ids, state=state).logits[:, -1]
        mine = []
        for _ in range(n_new):
            mine.append(logits)
            logits = ours.step(logits.argmax(-1), state)
    assert torch.equal(out.sequences[:, ids.shape[1]:], torch.stack([lg.argmax(-1) for lg in mine], 1))
    torch.testing.assert_close(torch.stack(out.logits, 1).float(), torch.stack(mine, 1), rtol=0, atol=1e-4)


def test_tokenizer_travels(exported):
    _, hf, base = exported
    src_tok = transformers.AutoTokenizer.from_pretrained(str(base / "ours"))
    tok = transformers.AutoTokenizer.from_pretrained(str(base / "hf"))
    text = "<|im_start|>user\nWhat is 12 + 35?<|im_end|>\n<think>x</think><|endoftext|>"
    assert tok(text)["input_ids"] == src_tok(text)["input_ids"]
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # the HF config's special ids are the tokenizer's (not Mamba2Config's defaults bos 0 / eos 2 / pad 1)
    assert (hf.config.eos_token_id, hf.config.pad_token_id, hf.config.bos_token_id) == (
        tok.eos_token_id, tok.pad_token_id, None) == (0, 1, None)
    assert hf.generation_config.eos_token_id == tok.eos_token_id


def test_groups_warning(tmp_path, caplog):
    """ngroups > 1 exports with a warning that names the transformers behaviour it depends on."""
    make_ours(tmp_path / "ours", tokenizer=False, ngroups=2)
    with caplog.at_level("WARNING", logger="model.hf_mamba2"):
        export(tmp_path / "ours", tmp_path / "hf")
    assert "ngroups = 2" in caplog.text and "per group of d_inner / n_groups" in caplog.text


def test_no_tokenizer_gives_null_ids(tmp_path):
    make_ours(tmp_path / "ours", tokenizer=False)
    export(tmp_path / "ours", tmp_path / "hf")
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]
    cfg = transformers.AutoConfig.from_pretrained(str(tmp_path / "hf"))
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (None, None, None)
    # what TRL and the rest of the ecosystem call
    assert type(transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))).__name__ == "Mamba2ForCausalLM"


# ---------------------------------------------------------------------------------------------
# round trips


def test_hf_to_ours_to_hf_is_identity(tmp_path):
    """A random transformers model -> ours (--from hf-mamba2 --no-quant) -> HF again: same tensors, same logits."""
    hf = make_hf(tmp_path / "hf", n_groups=2, seed=5)
    assert main(["--from", "hf-mamba2", str(tmp_path / "hf"), str(tmp_path / "ours"), "--no-quant"]) == 0
    export(tmp_path / "ours", tmp_path / "hf2")
    a, b = load_file(str(tmp_path / "hf" / "model.safetensors")), load_file(str(tmp_path / "hf2" / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    hf2 = transformers.Mamba2ForCausalLM.from_pretrained(str(tmp_path / "hf2")).eval()
    ids = torch.randint(0, 256, (2, 19))
    ref, got = _logits(hf, ids), _logits(hf2, ids)
    assert ref.abs().max() > 1.0
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("over", [dict(), dict(tie_embeddings=True)], ids=["untied", "tied"])
def test_ours_to_hf_to_ours_state_dict(tmp_path, over):
    ours = make_ours(tmp_path / "ours", seed=7, tokenizer=False, **over)
    export(tmp_path / "ours", tmp_path / "hf")
    back = import_hf(tmp_path / "hf", no_quant=True)
    assert back.config.to_dict() == ours.config.to_dict()
    sd, sd2 = ours.state_dict(), back.state_dict()
    assert sorted(sd) == sorted(sd2)
    for k in sd:
        assert torch.equal(sd[k], sd2[k]), k


# ---------------------------------------------------------------------------------------------
# what cannot be exported


def test_ternary_model_refused_before_anything_is_written(tmp_path):
    BitMambaLM(BitMambaConfig.preset("tiny")).save_pretrained(tmp_path / "ours")
    with pytest.raises(ConfigError, match=r"ours/config\.json: cannot export to transformers' Mamba2ForCausalLM: "
                                          r"quant\.ternary is true .*--to bitmamba2-bin"):
        main(["--to", "hf-mamba2", str(tmp_path / "ours"), str(tmp_path / "hf")])
    assert not (tmp_path / "hf").exists()
    assert not [p for p in tmp_path.iterdir() if p.name != "ours"]  # no temp directory left either


@pytest.mark.parametrize("preset,over,fields", [
    ("tiny-bitmamba2", {}, ["quant.ternary", "conv_bc", "d_per_channel", "gated_norm", "bitlinear_norm",
                            "block_prenorm"]),
    ("tiny-bitmamba2", {"quant": {"ternary": False}}, ["conv_bc", "d_per_channel", "gated_norm", "bitlinear_norm",
                                                       "block_prenorm"]),
    ("tiny-hybrid", {"quant": {"ternary": False}}, ["attn_layers gives attention layers [1]"]),
    ("tiny", {"quant": {"ternary": False}, "attn_fraction": 0.5}, ["attn_fraction gives attention layers [0]"]),
])
def test_every_blocking_field_is_named(preset, over, fields):
    problems = hf_export_problems(BitMambaConfig.preset(preset, **over))
    assert [p.split(" is ")[0] if " gives " not in p else p.split(" (")[0] for p in problems] == fields


def test_cli_refusal_is_one_line(tmp_path, capsys):
    from rl.cli import main as cli_main

    BitMambaLM(BitMambaConfig.preset("tiny")).save_pretrained(tmp_path / "ours")
    assert cli_main(["convert", "--to", "hf-mamba2", str(tmp_path / "ours"), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "quant.ternary is true" in err


def test_non_empty_destination_refused(tmp_path):
    make_ours(tmp_path / "ours", tokenizer=False)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=r"hf: destination exists and is not an empty directory"):
        main(["--to", "hf-mamba2", str(tmp_path / "ours"), str(tmp_path / "hf")])
    assert (tmp_path / "hf" / "keep.txt").read_text() == "mine"


def test_documented_recipes_are_exportable():
    """The recipes the refusal names: configs/pretrain_tiny_fp.yaml's model, and a stage config (sft_tiny.yaml,
    ternary as shipped) with the command-line override model.overrides.quant.ternary=false."""
    spec = read_mapping(ROOT / "configs" / "pretrain_tiny_fp.yaml")["model"]
    assert hf_export_problems(BitMambaConfig.preset(spec["preset"], **spec["overrides"])) == []
    sft = read_mapping(ROOT / "configs" / "sft_tiny.yaml")
    assert hf_export_problems(BitMambaConfig.preset(sft["model"]["preset"], **sft["model"]["overrides"]))
    spec = apply_overrides(sft, ["model.overrides.quant.ternary=false"])["model"]
    assert hf_export_problems(BitMambaConfig.preset(spec["preset"], **spec["overrides"])) == []
