"""Hugging Face `Mamba2ForCausalLM` checkpoint -> our `BitMambaConfig` + state dict.

    cfg, sd = load_hf_mamba2("path/to/hf_dir", no_quant=True)
    model = BitMambaLM(cfg); model.load_state_dict(sd)

The HF directory holds `config.json` and `model.safetensors` (or shards listed in
`model.safetensors.index.json`). The HF block is the standard Mamba-2 layout, so the result uses
ours: conv over x,B,C (`conv_bc`), gated RMSNorm with group size d_inner/ngroups (HF's
`MambaRMSNormGated(group_size=intermediate_size // n_groups)`, gate applied before the norm),
D per head, pre-norm blocks, plain (no own norm) BitLinears. `no_quant=True` sets
`quant.ternary=False`, so the converted model computes what transformers computes.

Features we do not have are rejected (ConfigError naming the field): biases on in_proj/out_proj
(`use_bias`), non-RMS norms (`rms_norm: false`), activations other than SiLU (`hidden_act`), a
finite `time_step_limit` (HF clamps dt; we do not), `num_heads*head_dim != expand*hidden_size`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from model.config import BitMambaConfig, QuantConfig
from model.errors import CheckpointError, ConfigError


def _json_float(v, key: str, where: str) -> float:
    """A float from config.json: a number, "Infinity"-like text, or transformers 5's {"__float__": "Infinity"}."""
    if isinstance(v, dict) and set(v) == {"__float__"}:
        v = v["__float__"]
    try:
        if isinstance(v, bool):
            raise ValueError
        return float(v)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: config key {key!r}: expected a number, got {v!r}") from None


def _get(hf: dict, key: str, where: str, default=None, required: bool = True):
    if key in hf:
        return hf[key]
    if required and default is None:
        raise ConfigError(f"{where}: missing config key {key!r} (needed for a Mamba2ForCausalLM)")
    return default


def _int(hf: dict, key: str, where: str, default=None) -> int:
    v = _get(hf, key, where, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v or v <= 0:
        raise ConfigError(f"{where}: config key {key!r} must be a positive integer, got {v!r}")
    return int(v)


def hf_config_to_ours(hf: dict, where: str = "config.json", no_quant: bool = False) -> BitMambaConfig:
    """Map an HF Mamba2Config dict to `BitMambaConfig` (standard layout); reject what we lack."""
    mt = hf.get("model_type")
    if mt is not None and mt != "mamba2":
        raise ConfigError(f"{where}: model_type is {mt!r}, expected 'mamba2'")
    if hf.get("use_bias", False):
        raise ConfigError(f"{where}: use_bias = true (biases on in_proj/out_proj) is not supported")
    if not hf.get("rms_norm", True):
        raise ConfigError(f"{where}: rms_norm = false (LayerNorm) is not supported; only RMSNorm is")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ConfigError(f"{where}: hidden_act = {act!r} is not supported (only 'silu')")
    limit = hf.get("time_step_limit", (0.0, math.inf))
    if limit is not None:
        if not isinstance(limit, (list, tuple)) or len(limit) != 2:
            raise ConfigError(f"{where}: time_step_limit must be a pair [low, high], got {limit!r}")
        lo, hi = (_json_float(x, "time_step_limit", where) for x in limit)
        if lo > 0.0 or math.isfinite(hi):
            raise ConfigError(f"{where}: time_step_limit = {list(limit)} is not supported (dt is not clamped here)")
    if hf.get("norm_before_gate", False):
        raise ConfigError(f"{where}: norm_before_gate = true is not supported (HF gates before the norm)")

    d_model = _int(hf, "hidden_size", where)
    expand = _get(hf, "expand", where, 2)
    if isinstance(expand, bool) or not isinstance(expand, (int, float)) or int(expand) != expand or expand <= 0:
        raise ConfigError(f"{where}: config key 'expand' must be a positive integer, got {expand!r}")
    expand = int(expand)
    num_heads = _int(hf, "num_heads", where)
    head_dim = _int(hf, "head_dim", where)
    if num_heads * head_dim != expand * d_model:
        raise ConfigError(
            f"{where}: num_heads * head_dim = {num_heads * head_dim} != expand * hidden_size = {expand * d_model}"
        )
    tie = bool(hf.get("tie_word_embeddings", False))
    data = dict(
        vocab_size=_int(hf, "vocab_size", where),
        d_model=d_model,
        n_layers=_int(hf, "num_hidden_layers", where),
        d_state=_int(hf, "state_size", where),
        headdim=head_dim,
        expand=expand,
        ngroups=_int(hf, "n_groups", where),
        d_conv=_int(hf, "conv_kernel", where, 4),
        chunk_size=_int(hf, "chunk_size", where, 256),
        conv_bc=True, d_per_channel=False, gated_norm=True, bitlinear_norm=False, block_prenorm=True,
        ternary_head=False, tie_embeddings=tie,
        norm_eps=float(_get(hf, "layer_norm_epsilon", where, 1e-5)),
        dt_min=float(hf.get("time_step_min", 0.001)),
        dt_max=float(hf.get("time_step_max", 0.1)),
        dt_init_floor=float(hf.get("time_step_floor", 1e-4)),
        quant=QuantConfig(ternary=not no_quant),
    )
    try:
        return BitMambaConfig(**data)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def load_safetensors_dir(src: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """All tensors of `model.safetensors`, or of the shards named in `model.safetensors.index.json`,
    and the file that names them (for error messages)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = src / "model.safetensors.index.json"
    single = src / "model.safetensors"
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: malformed shard index ({e})") from None
        files = [src / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{index}: shard {f.name} listed in the index is missing")
    else:
        raise CheckpointError(f"{src}: no model.safetensors or model.safetensors.index.json")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            out.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{f}: unreadable safetensors file ({e})") from None
    return out, (single if single.is_file() else index)


def hf_weight_map(cfg: BitMambaConfig) -> dict[str, str]:
    """Our parameter name -> HF parameter name, for every tensor we need from an HF checkpoint."""
    m = {"embedding.weight": "backbone.embeddings.weight", "norm_f.weight": "backbone.norm_f.weight"}
    for i in range(cfg.n_layers):
        m[f"layers.{i}.norm.weight"] = f"backbone.layers.{i}.norm.weight"
        for name in ("in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "norm.weight",
                     "out_proj.weight"):
            m[f"layers.{i}.mixer.{name}"] = f"backbone.layers.{i}.mixer.{name}"
    if not cfg.tie_embeddings:
        m["lm_head.weight"] = "lm_head.weight"
    return m


def _expected_shapes(cfg: BitMambaConfig) -> dict[str, tuple[int, ...]]:
    d, di, H, V = cfg.d_model, cfg.d_inner, cfg.n_heads, cfg.vocab_size
    s = {"embedding.weight": (V, d), "norm_f.weight": (d,), "lm_head.weight": (V, d)}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        s.update({
            p + "norm.weight": (d,),
            p + "mixer.in_proj.weight": (cfg.d_in_proj, d),
            p + "mixer.conv1d.weight": (cfg.conv_dim, 1, cfg.d_conv),
            p + "mixer.conv1d.bias": (cfg.conv_dim,),
            p + "mixer.dt_bias": (H,), p + "mixer.A_log": (H,), p + "mixer.D": (H,),
            p + "mixer.norm.weight": (di,),
            p + "mixer.out_proj.weight": (d, di),
        })
    return s


def hf_state_dict_to_ours(hf_sd: dict[str, torch.Tensor], cfg: BitMambaConfig, where: str,
                          use_conv_bias: bool = True) -> dict[str, torch.Tensor]:
    """Rename (and shape-check) HF tensors to our names, as fp32. Missing tensors -> CheckpointError."""
    hf_sd = dict(hf_sd)
    if "backbone.embedding.weight" in hf_sd and "backbone.embeddings.weight" not in hf_sd:
        hf_sd["backbone.embeddings.weight"] = hf_sd.pop("backbone.embedding.weight")  # older HF name
    shapes = _expected_shapes(cfg)
    out: dict[str, torch.Tensor] = {}
    missing = []
    for ours, theirs in hf_weight_map(cfg).items():
        if theirs.endswith("conv1d.bias") and not use_conv_bias:
            out[ours] = torch.zeros(shapes[ours])
            continue
        if theirs not in hf_sd:
            missing.append(theirs)
            continue
        t = hf_sd[theirs]
        if tuple(t.shape) != shapes[ours]:
            raise CheckpointError(
                f"{where}: tensor {theirs} has shape {list(t.shape)}, config.json implies {list(shapes[ours])}"
            )
        out[ours] = t.detach().to(torch.float32).contiguous()
    if cfg.tie_embeddings and "embedding.weight" in out:
        out["lm_head.weight"] = out["embedding.weight"]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{where}: tensor {missing[0]} missing{more}")
    used = set(hf_weight_map(cfg).values())
    extra = [k for k in hf_sd if k not in used and not (cfg.tie_embeddings and k == "lm_head.weight")]
    if extra:
        raise CheckpointError(f"{where}: unexpected tensor {extra[0]} (not part of a Mamba2ForCausalLM we support)")
    return out


def load_hf_mamba2(src: str | Path, no_quant: bool = False) -> tuple[BitMambaConfig, dict[str, torch.Tensor]]:
    """Read an HF Mamba2ForCausalLM directory -> (our config, our fp32 state dict)."""
    src = Path(src)
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a directory (expected an HF checkpoint dir with config.json)")
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{src}: config.json missing (not a Hugging Face checkpoint directory)")
    try:
        hf = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{cfg_path}: malformed JSON ({e})") from None
    if not isinstance(hf, dict):
        raise ConfigError(f"{cfg_path}: expected a JSON object at the top level")
    cfg = hf_config_to_ours(hf, str(cfg_path), no_quant=no_quant)
    tensors, weights_file = load_safetensors_dir(src)
    sd = hf_state_dict_to_ours(tensors, cfg, str(weights_file), use_conv_bias=bool(hf.get("use_conv_bias", True)))
    return cfg, sd
