"""BitMambaConfig: validation errors name the field, presets have the published parameter counts."""

import pytest
import torch

from model.bitlinear import BitLinear
from model.config import PRESETS, BitMambaConfig, QuantConfig
from model.errors import ConfigError
from model.lm import BitMambaLM


def meta_params(cfg: BitMambaConfig) -> int:
    with torch.device("meta"):
        return BitMambaLM(cfg).num_parameters()


@pytest.mark.parametrize("name, expected", [("bitmamba2-255m", 255.5e6), ("bitmamba2-1b", 1018.4e6)])
def test_bitmamba2_param_counts(name, expected):
    n = meta_params(BitMambaConfig.preset(name))
    assert abs(n - expected) / expected < 0.005, f"{name}: {n / 1e6:.2f}M"


def test_bitmamba2_layout_and_state_dict_names():
    cfg = BitMambaConfig.preset("bitmamba2-255m")
    assert (cfg.n_heads, cfg.headdim, cfg.ngroups, cfg.d_state) == (16, 128, 16, 1)
    assert cfg.d_in_proj == 2 * 2048 + 3 * 16 and cfg.conv_dim == 2048
    with torch.device("meta"):
        sd = BitMambaLM(cfg).state_dict()
    assert tuple(sd["layers.0.mixer.in_proj.weight"].shape) == (2 * 2048 + 48, 1024)
    assert tuple(sd["layers.0.mixer.D"].shape) == (2048,)
    assert tuple(sd["layers.0.mixer.conv1d.weight"].shape) == (2048, 1, 4)
    for k in ["layers.0.mixer.in_proj.norm.weight", "layers.0.mixer.out_proj.norm.weight",
              "lm_head.norm.weight", "norm_f.weight", "embedding.weight"]:
        assert k in sd
    assert "layers.0.norm.weight" not in sd and "layers.0.mixer.norm.weight" not in sd


def test_mini_agent_presets():
    parent = BitMambaConfig.preset("mini-agent-parent")
    assert (parent.d_model, parent.n_layers, parent.d_state, parent.headdim) == (1024, 40, 128, 64)
    assert 330e6 < meta_params(parent) < 400e6  # ANCHORS: ~360M (estimate)
    scout = BitMambaConfig.preset("mini-agent-scout")
    assert (scout.d_model, scout.n_layers, scout.d_state) == (512, 24, 64)
    hybrid = BitMambaConfig.preset("mini-agent-hybrid")
    assert hybrid.attention_layer_indices == [5, 18, 31, 44, 57]
    assert (hybrid.attn_head_dim, hybrid.attn_kv_heads) == (64, 4)
    with torch.device("meta"):
        m = BitMambaLM(hybrid)
    assert type(m.layers[5].mixer).__name__ == "Attention"
    assert type(m.layers[6].mixer).__name__ == "Mamba2Mixer"


def test_attention_fraction_spread():
    cfg = BitMambaConfig(vocab_size=256, d_model=64, n_layers=40, headdim=16, attn_fraction=0.08,
                         attn_heads=4, attn_kv_heads=2, attn_head_dim=16)
    assert cfg.attention_layer_indices == [6, 19, 32]
    small = cfg.replace(n_layers=4)  # max(1, int(0.32)) = 1 layer
    assert small.attention_layer_indices == [1]


def test_to_from_dict_roundtrip():
    for name in PRESETS:
        cfg = BitMambaConfig.preset(name)
        assert BitMambaConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("changes, field", [
    (dict(headdim=48), "headdim"),                       # d_inner 128 % 48
    (dict(ngroups=3), "ngroups"),                        # 8 heads % 3
    (dict(attn_layers=[1], attn_heads=6, attn_kv_heads=4), "attn_kv_heads"),
    (dict(attn_layers=[2]), "attn_layers"),              # out of range for 2 layers
    (dict(attn_layers=[0], attn_fraction=0.5), "attn_layers and attn_fraction"),
    (dict(d_model=66, headdim=66), "d_model = 66.*multiple of 4"),  # ternary packing
    (dict(quant=QuantConfig(weight_scale="group", group_size=48)), "group_size"),
    (dict(n_layers=0), "n_layers"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(tie_embeddings=True, ternary_head=True), "tie_embeddings"),
])
def test_invalid_configs_name_the_field(changes, field):
    base = BitMambaConfig.preset("tiny").to_dict()
    base.pop("quant")
    with pytest.raises(ConfigError, match=field):
        BitMambaConfig(**{**base, **changes})


def test_from_dict_rejects_unknown_and_wrong_types():
    data = BitMambaConfig.preset("tiny").to_dict()
    with pytest.raises(ConfigError, match="unknown key d_modle"):
        BitMambaConfig.from_dict({**data, "d_modle": 3})
    with pytest.raises(ConfigError, match="d_model"):
        BitMambaConfig.from_dict({**data, "d_model": "64"})
    with pytest.raises(ConfigError, match="quant.activation"):
        BitMambaConfig.from_dict({**data, "quant": {"activation": "int4"}})
    with pytest.raises(ConfigError, match="unknown model preset"):
        BitMambaConfig.preset("nope")
    assert BitMambaConfig.preset("tiny", n_layers=3).n_layers == 3


def test_bitlinear_construction_errors_name_the_layer():
    q = QuantConfig(weight_scale="group", group_size=32)
    with pytest.raises(ConfigError, match=r"layers\.3\.mixer\.out_proj.*group_size = 32.*in_features = 48"):
        BitLinear(48, 8, q, name="layers.3.mixer.out_proj")
    with pytest.raises(ConfigError, match="lm_head.*multiple of 4"):
        BitLinear(10, 8, QuantConfig(), name="lm_head")
    BitLinear(10, 8, QuantConfig(ternary=False))  # fp layers have no packing constraint
