"""HF `Mamba2ForCausalLM` -> ours: config/weight mapping, logits equal transformers' (fp32, --no-quant)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.convert import import_hf
from model.errors import CheckpointError, ConfigError
from model.hf_mamba2 import hf_config_to_ours, load_hf_mamba2, transformers_gated_norm_is_grouped

transformers = pytest.importorskip("transformers")
# transformers releases whose pure-torch gated RMSNorm ignores n_groups (5.17 seen) compute another function
needs_grouped_norm = pytest.mark.skipif(
    not transformers_gated_norm_is_grouped(),
    reason=f"transformers {transformers.__version__}: Mamba2's gated RMSNorm normalizes over all channels, "
           "not per group (n_groups > 1 models differ from mamba-ssm's and ours)")


def make_hf(path, n_groups=1, chunk_size=8, tie=False, use_conv_bias=True, seed=0, sharded=False, **kw):
    """A small random Mamba2ForCausalLM saved with save_pretrained; norms/D/dt_bias perturbed so
    that a wrong mapping of any of them shows in the logits."""
    cfg = transformers.Mamba2Config(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_heads=8, head_dim=16,
                                    state_size=16, n_groups=n_groups, expand=2, chunk_size=chunk_size,
                                    tie_word_embeddings=tie, use_conv_bias=use_conv_bias, **kw)
    torch.manual_seed(seed)
    hf = transformers.Mamba2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith((".D", "dt_bias", "A_log")):
                p.add_(torch.randn_like(p) * 0.3)
    hf.save_pretrained(path, **({"max_shard_size": "100KB"} if sharded else {}))
    return hf


@pytest.fixture(scope="module")
def hf_g1(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_g1")
    return make_hf(d), d


@pytest.fixture(scope="module")
def hf_g2(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_g2")
    return make_hf(d, n_groups=2, seed=1), d


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize("which", ["hf_g1", pytest.param("hf_g2", marks=needs_grouped_norm)])
@pytest.mark.parametrize("T", [7, 21])  # odd length; longer than chunk_size 8 (multi-chunk scan)
def test_no_quant_logits_equal_transformers(request, which, T):
    hf, d = request.getfixturevalue(which)
    ours = import_hf(d, no_quant=True)
    ids = torch.randint(0, 256, (2, T))
    ref = _logits(hf, ids)
    got = _logits(ours, ids)
    assert ref.abs().max() > 1.0
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)


def test_config_mapping(hf_g2):
    _, d = hf_g2
    cfg, sd = load_hf_mamba2(d, no_quant=True)
    assert (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.d_state, cfg.headdim, cfg.ngroups) == (256, 64, 2, 16, 16, 2)
    assert (cfg.n_heads, cfg.d_conv, cfg.chunk_size, cfg.norm_eps) == (8, 4, 8, 1e-5)
    assert (cfg.conv_bc, cfg.gated_norm, cfg.block_prenorm, cfg.bitlinear_norm, cfg.d_per_channel) == (
        True, True, True, False, False)
    assert cfg.quant.ternary is False
    assert sd["layers.1.mixer.in_proj.weight"].shape == (2 * 128 + 2 * 2 * 16 + 8, 64)
    assert sd["layers.1.mixer.conv1d.weight"].shape == (128 + 2 * 2 * 16, 1, 4)


def test_quantized_import_keeps_latents(hf_g1):
    hf, d = hf_g1
    ours = import_hf(d)  # default: ternary BitLinears with the HF weights as latents
    assert ours.config.quant.ternary is True and ours.config.ternary_head is False
    hf_w = hf.backbone.layers[1].mixer.in_proj.weight
    assert torch.equal(ours.layers[1].mixer.in_proj.weight, hf_w)
    ids = torch.randint(0, 256, (1, 9))
    q, ref = _logits(ours, ids), _logits(hf, ids)
    assert torch.isfinite(q).all()
    assert (q - ref).abs().max() > 1e-3  # the ternary model is a different (quantized) function


def test_sharded_checkpoint(tmp_path):
    hf = make_hf(tmp_path, seed=2, sharded=True)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "model.safetensors").exists()
    ids = torch.randint(0, 256, (1, 11))
    torch.testing.assert_close(_logits(import_hf(tmp_path, no_quant=True), ids), _logits(hf, ids), rtol=0, atol=1e-4)


def test_tied_embeddings_and_no_conv_bias(tmp_path):
    hf = make_hf(tmp_path, tie=True, use_conv_bias=False, seed=3)
    ours = import_hf(tmp_path, no_quant=True)
    assert ours.config.tie_embeddings
    assert ours.lm_head.weight.data_ptr() == ours.embedding.weight.data_ptr()
    assert not ours.layers[0].mixer.conv1d.bias.any()
    ids = torch.randint(0, 256, (1, 9))
    torch.testing.assert_close(_logits(ours, ids), _logits(hf, ids), rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# bad checkpoints


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))


def test_missing_config_json(hf_g1, tmp_path):
    d = _copy(hf_g1[1], tmp_path / "x")
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"x: config.json missing"):
        import_hf(d)


def test_missing_tensor(hf_g1, tmp_path):
    d = _copy(hf_g1[1], tmp_path / "x")
    sd = load_file(str(d / "model.safetensors"))
    del sd["backbone.layers.1.mixer.A_log"]
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"x/model\.safetensors: tensor backbone\.layers\.1\.mixer\.A_log missing"):
        import_hf(d)


def test_wrong_tensor_shape(hf_g1, tmp_path):
    d = _copy(hf_g1[1], tmp_path / "x")
    sd = load_file(str(d / "model.safetensors"))
    sd["backbone.norm_f.weight"] = torch.ones(63)
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor backbone\.norm_f\.weight has shape \[63\], config\.json implies \[64\]"):
        import_hf(d)


def test_missing_weights_file(hf_g1, tmp_path):
    d = _copy(hf_g1[1], tmp_path / "x")
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        import_hf(d)


@pytest.mark.parametrize("changes,pattern", [
    ({"use_bias": True}, r"use_bias = true"),
    ({"rms_norm": False}, r"rms_norm = false"),
    ({"hidden_act": "gelu"}, r"hidden_act = 'gelu'"),
    ({"time_step_limit": [0.0, 0.5]}, r"time_step_limit = \[0\.0, 0\.5\]"),
    ({"hidden_size": None}, r"missing config key 'hidden_size'"),
    ({"num_heads": 4}, r"num_heads \* head_dim = 64 != expand \* hidden_size = 128"),
    ({"model_type": "mamba"}, r"model_type is 'mamba'"),
])
def test_unsupported_config(hf_g1, tmp_path, changes, pattern):
    d = _copy(hf_g1[1], tmp_path / "x")
    _edit_config(d, **changes)
    with pytest.raises(ConfigError, match=r"config\.json: " + pattern):
        import_hf(d)


def test_time_step_limit_infinity_forms():
    base = dict(hidden_size=64, num_heads=8, head_dim=16, state_size=16, n_groups=1, num_hidden_layers=1,
                vocab_size=16)
    for lim in ([0.0, {"__float__": "Infinity"}], [0.0, float("inf")], [0.0, "Infinity"]):
        assert hf_config_to_ours({**base, "time_step_limit": lim}).d_model == 64
