"""`bitmamba convert` command line: all three directions, refusals, clean errors."""

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FIXTURES, ROOT
from model.config import BitMambaConfig
from model.convert import bitmamba2_config, main
from model.errors import CheckpointError, ConfigError
from model.lm import BitMambaLM

FIX = FIXTURES / "bitmamba2"
PROMPT = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26]


def _bitmamba2_ckpt(path: Path, **changes) -> Path:
    from model.binfile import BinHeader

    cfg = bitmamba2_config(BinHeader(vocab=64, d_model=16, n_layers=1, n_heads=2))
    if changes:
        cfg = BitMambaConfig.from_dict({**cfg.to_dict(), **changes})
    BitMambaLM(cfg).save_pretrained(path)
    return path


def test_bin_to_ours_and_back(tmp_path, capsys):
    assert main(["--from", "bitmamba2-bin", str(FIX / "tiny.bin"), str(tmp_path / "ck")]) == 0
    assert "wrote" in capsys.readouterr().out
    model = BitMambaLM.from_pretrained(tmp_path / "ck")
    engine = np.fromfile(FIX / "engine_prompt_logits.f32", dtype="<f4").reshape(len(PROMPT), 512)
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT])).logits[0].numpy()
    assert np.abs(logits - engine).max() < 1e-3  # survives the safetensors round trip
    assert main(["--to", "bitmamba2-bin", str(tmp_path / "ck"), str(tmp_path / "out.bin")]) == 0
    assert (tmp_path / "out.bin").read_bytes() == (FIX / "tiny.bin").read_bytes()


def test_hf_to_ours_no_quant(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Mamba2Config(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_heads=4, head_dim=16,
                                    state_size=8, n_groups=1, chunk_size=8)
    hf = transformers.Mamba2ForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    assert main(["--from", "hf-mamba2", str(tmp_path / "hf"), str(tmp_path / "ck"), "--no-quant"]) == 0
    ours = BitMambaLM.from_pretrained(tmp_path / "ck")
    assert ours.config.quant.ternary is False
    ids = torch.randint(0, 128, (1, 13))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=0, atol=1e-4)


def test_export_refuses_standard_layout(tmp_path):
    src = tmp_path / "std"
    BitMambaLM(BitMambaConfig.preset("tiny")).save_pretrained(src)
    with pytest.raises(ConfigError, match=r"not in the BitMamba-2 layout: d_state = 16"):
        main(["--to", "bitmamba2-bin", str(src), str(tmp_path / "x.bin")])
    assert not (tmp_path / "x.bin").exists()


@pytest.mark.parametrize("changes,pattern", [
    ({"ngroups": 1}, r"ngroups = 1 \(the \.bin format needs ngroups = n_heads = 2\)"),
    ({"quant": {"activation": "none"}}, r"quant\.activation = 'none'"),
    ({"quant": {"weight_scale": "group", "group_size": 16}}, r"quant\.weight_scale = 'group'"),
    ({"norm_eps": 1e-5}, r"norm_eps = 1e-05"),
])
def test_export_refuses_layout_mismatch(tmp_path, changes, pattern):
    src = _bitmamba2_ckpt(tmp_path / "ck", **changes)
    with pytest.raises(ConfigError, match=pattern):
        main(["--to", "bitmamba2-bin", str(src), str(tmp_path / "x.bin")])
    assert not (tmp_path / "x.bin").exists()


def test_export_random_bitmamba2_model(tmp_path):
    from model.binfile import read_bin

    src = _bitmamba2_ckpt(tmp_path / "ck")
    assert main(["--to", "bitmamba2-bin", str(src), str(tmp_path / "a.bin")]) == 0
    m = read_bin(tmp_path / "a.bin")
    assert (m.header.vocab, m.header.d_model, m.header.n_layers, m.header.n_heads) == (64, 16, 1, 2)
    assert main(["--from", "bitmamba2-bin", str(tmp_path / "a.bin"), str(tmp_path / "ck2")]) == 0
    assert main(["--to", "bitmamba2-bin", str(tmp_path / "ck2"), str(tmp_path / "b.bin")]) == 0
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()


def test_bad_bin_writes_nothing(tmp_path):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(struct.pack("<5i", 0x0BADF00D, 64, 16, 1, 2))
    with pytest.raises(CheckpointError, match=r"bad\.bin: bad magic 0x0badf00d"):
        main(["--from", "bitmamba2-bin", str(bad), str(tmp_path / "out")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.bin"]


def test_refuses_non_empty_destination(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError, match=r"out: destination exists and is not an empty directory"):
        main(["--from", "bitmamba2-bin", str(FIX / "tiny.bin"), str(tmp_path / "out")])
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"


def test_usage_errors(tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["--from", "bitmamba2-bin", "a.bin", "out", "--no-quant"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        main(["--from", "onnx", "a", "b"])
    with pytest.raises(CheckpointError, match=r"nope: file not found"):
        main(["--from", "bitmamba2-bin", str(tmp_path / "nope"), str(tmp_path / "out")])
    with pytest.raises(CheckpointError, match=r"missing config\.json"):
        main(["--to", "bitmamba2-bin", str(tmp_path), str(tmp_path / "x.bin")])


def test_cli_subprocess_clean_error(tmp_path):
    bad = tmp_path / "trunc.bin"
    bad.write_bytes(struct.pack("<9i", 0x42495432, 64, 16, 1, 2, 0, 2, 64, 16) + b"\0" * 10)
    exe = shutil.which("bitmamba", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-m", "rl.cli"]
    env = {k: v for k, v in os.environ.items() if k != "BITMAMBA_DEBUG"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    r = subprocess.run(cmd + ["convert", "--from", "bitmamba2-bin", str(bad), str(tmp_path / "out")],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("error: ") and "trunc.bin: truncated in record 0 (embedding.weight)" in lines[0]
    assert not (tmp_path / "out").exists()
