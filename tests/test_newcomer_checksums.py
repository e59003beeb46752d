"""A training checkpoint's sha256 manifest is checked whenever the checkpoint is loaded as a model
(`from_pretrained`, `bitmamba info`, `bitmamba generate`): a corrupt file is one error naming it."""

from __future__ import annotations

import pytest

from model.checkpoint import verify_manifest
from model.config import BitMambaConfig
from model.errors import CheckpointError
from model.lm import BitMambaLM
from rl.train.checkpoint import CheckpointManager
from rl.cli import main as cli
from rl.train.loop import model_config_file, model_state_for_save


@pytest.fixture
def ckpt(tmp_path):
    model = BitMambaLM(BitMambaConfig.preset("tiny", vocab_size=384))
    path = CheckpointManager(tmp_path / "checkpoints").save(
        3, model_state_for_save(model), files={"config.json": model_config_file(model)})
    return path


def _corrupt(path, offset_frac=0.5, n=400):
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    mid = int(len(data) * offset_frac)
    data[mid:mid + n] = bytes((b + 1) % 256 for b in data[mid:mid + n])
    f.write_bytes(bytes(data))


def test_intact_checkpoint_loads_everywhere(ckpt, capsys):
    assert verify_manifest(ckpt) is True
    BitMambaLM.from_pretrained(ckpt)
    assert cli(["info", str(ckpt)]) == 0


def test_corrupt_weights_are_refused_by_every_loader(ckpt, capsys, monkeypatch):
    _corrupt(ckpt)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*sha256 mismatch.*BITMAMBA_SKIP_VERIFY"):
        BitMambaLM.from_pretrained(ckpt)
    capsys.readouterr()
    assert cli(["info", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "model.safetensors" in err and "sha256" in err and len(err.splitlines()) == 1
    assert cli(["generate", str(ckpt), "--prompt-ids", "1 2 3", "--max-new-tokens", "2"]) == 2
    assert "sha256 mismatch" in capsys.readouterr().err
    monkeypatch.setenv("BITMAMBA_SKIP_VERIFY", "1")                  # the opt-out for speed
    BitMambaLM.from_pretrained(ckpt)


def test_truncated_file_is_caught_even_when_checksums_are_skipped(ckpt, monkeypatch):
    f = ckpt / "config.json"
    f.write_bytes(f.read_bytes() + b" ")
    monkeypatch.setenv("BITMAMBA_SKIP_VERIFY", "1")
    with pytest.raises(CheckpointError, match=r"config\.json.*bytes"):
        BitMambaLM.from_pretrained(ckpt)


def test_plain_save_pretrained_dirs_need_no_manifest(tmp_path):
    model = BitMambaLM(BitMambaConfig.preset("tiny", vocab_size=384))
    model.save_pretrained(tmp_path / "m")
    assert verify_manifest(tmp_path / "m") is False
    BitMambaLM.from_pretrained(tmp_path / "m")
