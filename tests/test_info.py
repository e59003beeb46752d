"""`bitmamba info`: parameter split (ternary vs full precision) and packed size."""

import json

import pytest
import torch

from conftest import FIXTURES
from model.binfile import TernaryRecord, read_bin
from model.config import BitMambaConfig
from model.errors import CheckpointError
from model.info import checkpoint_info, main
from model.lm import BitMambaLM

FIX = FIXTURES / "bitmamba2"


def _save(cfg, path, dtype=None):
    m = BitMambaLM(cfg)
    if dtype is not None:
        m = m.to(dtype)
    m.save_pretrained(path)
    return m


def test_packed_size_equals_bin_payload(tmp_path):
    """The packed size of a .bin import is exactly the .bin file minus its header and record headers."""
    from model.convert import main as convert

    assert convert(["--from", "bitmamba2-bin", str(FIX / "tiny.bin"), str(tmp_path / "ck")]) == 0
    info = checkpoint_info(tmp_path / "ck")
    m = read_bin(FIX / "tiny.bin")
    overhead = 20 + sum(12 if isinstance(r, TernaryRecord) else 8 + 4 * r.data.ndim for r in m.records)
    assert info["packed_bytes"]["total"] == (FIX / "tiny.bin").stat().st_size - overhead
    n_tern = sum(r.codes.size for r in m.records if isinstance(r, TernaryRecord))
    assert info["parameters"]["ternary"] == n_tern
    assert info["parameters"]["total"] == 117_512


def test_standard_model_counts(tmp_path):
    cfg = BitMambaConfig.preset("tiny")
    model = _save(cfg, tmp_path / "ck")
    info = checkpoint_info(tmp_path / "ck")
    tern = sum(m.weight.numel() for _, m in model.bitlinears() if m.ternary)
    assert tern == cfg.n_layers * (cfg.d_in_proj * cfg.d_model + cfg.d_model * cfg.d_inner)  # fp head
    p = info["parameters"]
    assert (p["ternary"], p["total"]) == (tern, model.num_parameters())
    n_ternary_layers = 2 * cfg.n_layers
    assert info["packed_bytes"] == {"ternary_codes": tern // 4, "ternary_scales": 4 * n_ternary_layers,
                                    "full_precision": 4 * p["full_precision"],
                                    "total": tern // 4 + 4 * n_ternary_layers + 4 * p["full_precision"]}


def test_group_scales_and_bf16_storage(tmp_path):
    cfg = BitMambaConfig.preset("tiny-bitmamba2", quant={"weight_scale": "group", "group_size": 16})
    model = _save(cfg, tmp_path / "ck", dtype=torch.bfloat16)
    info = checkpoint_info(tmp_path / "ck")
    n_scales = sum(m.out_features * m.in_features // 16 for _, m in model.bitlinears())
    assert info["packed_bytes"]["ternary_scales"] == 4 * n_scales
    assert info["parameters"]["full_precision_by_dtype"] == {"BF16": info["parameters"]["full_precision"]}
    assert info["packed_bytes"]["full_precision"] == 2 * info["parameters"]["full_precision"]


def test_tied_fp_model_counts_embedding_once(tmp_path):
    cfg = BitMambaConfig.preset("tiny", tie_embeddings=True, quant={"ternary": False})
    model = _save(cfg, tmp_path / "ck")
    p = checkpoint_info(tmp_path / "ck")["parameters"]
    assert p["ternary"] == 0 and p["total"] == p["full_precision"] == model.num_parameters()


def test_cli_text_and_json(tmp_path, capsys):
    _save(BitMambaConfig.preset("tiny-bitmamba2"), tmp_path / "ck")
    assert main([str(tmp_path / "ck")]) == 0
    out = capsys.readouterr().out
    assert "d_model: 64" in out and "ternary (" in out and "packed size:" in out
    assert main([str(tmp_path / "ck"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["config"]["d_model"] == 64 and data["packed_mb"] == data["packed_bytes"]["total"] / 1e6


def test_bad_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope"):
        main([str(tmp_path / "nope")])
    _save(BitMambaConfig.preset("tiny"), tmp_path / "ck")
    st = tmp_path / "ck" / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated"):
        checkpoint_info(tmp_path / "ck")
    (tmp_path / "ck" / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"missing config\.json"):
        checkpoint_info(tmp_path / "ck")


def test_published_bitmamba2_sizes_from_config():
    """Config-only summary of the published models. ANCHORS §1 reports the engine's RAM as 621 MB (1B) and
    252 MB (255M); the packed weights (614 and 246 MiB) fit under those read as MiB (not as 10^6 bytes)."""
    from model.info import size_summary

    for preset, n_params, max_mb in (("bitmamba2-255m", 255.5e6, 252), ("bitmamba2-1b", 1018.4e6, 621)):
        s = size_summary(BitMambaConfig.preset(preset))
        p, b = s["parameters"], s["packed_bytes"]
        assert abs(p["total"] / n_params - 1) < 0.005
        cfg = BitMambaConfig.preset(preset)
        assert p["full_precision"] == p["total"] - p["ternary"]
        assert b["ternary_codes"] * 4 == p["ternary"] and b["ternary_scales"] == 4 * (2 * cfg.n_layers + 1)
        assert 0.9 * max_mb < b["total"] / 2**20 < max_mb
