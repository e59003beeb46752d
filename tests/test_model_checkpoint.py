"""save_pretrained / from_pretrained: roundtrip, atomic overwrite, and every bad-checkpoint error."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.config import BitMambaConfig
from model.errors import CheckpointError
from model.lm import BitMambaLM


@pytest.fixture
def saved(tmp_path):
    m = BitMambaLM(BitMambaConfig.preset("tiny-hybrid")).eval()
    d = tmp_path / "ckpt"
    m.save_pretrained(d)
    return m, d


def test_roundtrip_same_logits(saved):
    m, d = saved
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["format"] == "bitmamba-rl" and cfg["format_version"] == 1 and cfg["attn_layers"] == [1]
    m2 = BitMambaLM.from_pretrained(d)
    assert m2.config == m.config and not m2.training
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert torch.equal(m2(ids).logits, m(ids).logits)
    m3 = BitMambaLM.from_pretrained(d, dtype=torch.bfloat16)
    assert m3.embedding.weight.dtype == torch.bfloat16


def test_tied_embeddings_roundtrip(tmp_path):
    m = BitMambaLM(BitMambaConfig.preset("tiny", tie_embeddings=True))
    assert m.lm_head.weight is m.embedding.weight
    m.save_pretrained(tmp_path / "t")
    assert "lm_head.weight" not in load_file(str(tmp_path / "t" / "model.safetensors"))
    m2 = BitMambaLM.from_pretrained(tmp_path / "t")
    assert m2.lm_head.weight is m2.embedding.weight
    assert torch.equal(m2.embedding.weight, m.embedding.weight)


def test_atomic_overwrite_leaves_no_temp(saved, tmp_path):
    m, d = saved
    with torch.no_grad():
        m.norm_f.weight.fill_(2.0)
    m.save_pretrained(d)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert (BitMambaLM.from_pretrained(d).norm_f.weight == 2.0).all()


def rewrite_tensors(d, fn):
    t = load_file(str(d / "model.safetensors"))
    fn(t)
    save_file(t, str(d / "model.safetensors"))


def test_missing_dir_and_files(saved, tmp_path):
    _, d = saved
    with pytest.raises(CheckpointError, match="checkpoint directory not found.*nothere"):
        BitMambaLM.from_pretrained(tmp_path / "nothere")
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing model.safetensors"):
        BitMambaLM.from_pretrained(d)
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="missing config.json"):
        BitMambaLM.from_pretrained(d)


def test_bad_config(saved):
    _, d = saved
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "d_modle": 3}))
    with pytest.raises(CheckpointError, match=r"config\.json.*unknown key d_modle"):
        BitMambaLM.from_pretrained(d)
    (d / "config.json").write_text(json.dumps({**cfg, "headdim": 48}))
    with pytest.raises(CheckpointError, match=r"config\.json.*headdim"):
        BitMambaLM.from_pretrained(d)
    (d / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "format"}))
    with pytest.raises(CheckpointError, match="format"):
        BitMambaLM.from_pretrained(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: malformed JSON \(line 1"):
        BitMambaLM.from_pretrained(d)


def test_missing_unexpected_and_wrong_shape_tensors(saved):
    _, d = saved
    rewrite_tensors(d, lambda t: t.pop("layers.0.mixer.A_log"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing tensor\(s\) layers\.0\.mixer\.A_log"):
        BitMambaLM.from_pretrained(d)
    rewrite_tensors(d, lambda t: t.update({"layers.0.mixer.A_log": torch.zeros(4), "extra.w": torch.zeros(1)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) extra\.w"):
        BitMambaLM.from_pretrained(d)
    rewrite_tensors(d, lambda t: (t.pop("extra.w"), t.update({"layers.0.mixer.A_log": torch.zeros(5)})))
    with pytest.raises(CheckpointError, match=r"layers\.0\.mixer\.A_log has shape \(5,\), the config expects \(8,\)"):
        BitMambaLM.from_pretrained(d)


def test_truncated_and_corrupt_file(saved):
    _, d = saved
    path = d / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated or corrupt"):
        BitMambaLM.from_pretrained(d)
    path.write_bytes(b"\x00" * 3)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        BitMambaLM.from_pretrained(d)


def test_save_onto_a_file_fails(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        BitMambaLM(BitMambaConfig.preset("tiny")).save_pretrained(tmp_path / "f")


def test_config_json_and_tied_helpers(tmp_path):
    """One config.json writer and one tied-head rule for model directories, training checkpoints and HF
    conversion: `config_json` is what save_pretrained writes and load_config reads back; `drop_tied` /
    `restore_tied` remove and restore lm_head.weight only for tied models."""
    from model.checkpoint import config_json, drop_tied, load_config, read_json_object, restore_tied
    from model.errors import ConfigError

    m = BitMambaLM(BitMambaConfig.preset("tiny", tie_embeddings=True))
    m.save_pretrained(tmp_path / "t")
    assert (tmp_path / "t" / "config.json").read_text() == config_json(m.config)
    assert load_config(tmp_path / "t") == m.config
    sd = m.state_dict()
    stored = drop_tied(sd, True)
    assert "lm_head.weight" in sd and "lm_head.weight" not in stored and len(stored) == len(sd) - 1
    assert drop_tied(sd, False).keys() == sd.keys()
    back = restore_tied(stored, True)
    assert back["lm_head.weight"] is stored["embedding.weight"] and back.keys() == sd.keys()
    assert "lm_head.weight" not in restore_tied(stored, False)
    assert restore_tied({"x": 1}, True) == {"x": 1}          # no embedding: nothing to tie
    (tmp_path / "bad.json").write_text("[1]")
    with pytest.raises(ConfigError, match=r"bad\.json: expected a JSON object"):
        read_json_object(tmp_path / "bad.json", ConfigError)
