"""Hugging Face `Mamba2ForCausalLM` checkpoints <-> our `BitMambaConfig` + state dict.

    cfg, sd = load_hf_mamba2("path/to/hf_dir", no_quant=True)          # HF -> ours
    model = BitMambaLM(cfg); model.load_state_dict(sd)
    save_hf_mamba2(model, "path/to/hf_out", tokenizer_dir=ckpt_dir)     # ours -> HF

The HF directory holds `config.json` and `model.safetensors` (or shards listed in
`model.safetensors.index.json`). The HF block is the standard Mamba-2 layout, so the result uses
ours: conv over x,B,C (`conv_bc`), gated RMSNorm with group size d_inner/ngroups (HF's
`MambaRMSNormGated` / `Mamba2RMSNormGated(group_size=intermediate_size // n_groups)`, gate applied before the norm),
D per head, pre-norm blocks, plain (no own norm) BitLinears. `no_quant=True` sets
`quant.ternary=False`, so the converted model computes what transformers computes.

Features we do not have are rejected (ConfigError naming the field): biases on in_proj/out_proj
(`use_bias`), non-RMS norms (`rms_norm: false`), activations other than SiLU (`hidden_act`), a
finite `time_step_limit` (HF clamps dt; we do not), `num_heads*head_dim != expand*hidden_size`.

Export (`save_hf_mamba2`) writes the inverse: config.json (only keys every transformers 4.46+ / 5.x
Mamba2Config reads; `time_step_limit` left at its (0, inf) default), model.safetensors (fp32, no
`lm_head.weight` when tied) and, when the source directory has one, its tokenizer files byte for byte;
bos/eos/pad ids come from that tokenizer (null without one: HF's defaults 0/2/1 would name arbitrary
tokens). Only the layout HF can compute is exported: `hf_export_problems` names every config field that
differs (quantization on, BitLinear-internal norms, no block pre-norm, attention layers, ...).

n_groups > 1: the gated RMSNorm normalizes each group of d_inner / n_groups channels (mamba-ssm, ours,
transformers 5.24); some transformers releases (5.17 seen) normalize over all d_inner channels in their
pure-torch path, a different function. `transformers_gated_norm_is_grouped()` tells which the installed
one does; export warns for n_groups > 1. With n_groups = 1 (the `tiny` preset) both agree.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

from model.checkpoint import CONFIG_NAME, WEIGHTS_NAME, drop_tied, read_json_object, restore_tied
from model.config import BitMambaConfig, QuantConfig
from model.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)


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
    out = restore_tied(out, cfg.tie_embeddings)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{where}: tensor {missing[0]} missing{more}")
    used = set(hf_weight_map(cfg).values())
    extra = [k for k in drop_tied(hf_sd, cfg.tie_embeddings) if k not in used]
    if extra:
        raise CheckpointError(f"{where}: unexpected tensor {extra[0]} (not part of a Mamba2ForCausalLM we support)")
    return out


def load_hf_mamba2(src: str | Path, no_quant: bool = False) -> tuple[BitMambaConfig, dict[str, torch.Tensor]]:
    """Read an HF Mamba2ForCausalLM directory -> (our config, our fp32 state dict)."""
    src = Path(src)
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a directory (expected an HF checkpoint dir with config.json)")
    cfg_path = src / CONFIG_NAME
    if not cfg_path.is_file():
        raise CheckpointError(f"{src}: {CONFIG_NAME} missing (not a Hugging Face checkpoint directory)")
    hf = read_json_object(cfg_path, ConfigError)
    cfg = hf_config_to_ours(hf, str(cfg_path), no_quant=no_quant)
    tensors, weights_file = load_safetensors_dir(src)
    sd = hf_state_dict_to_ours(tensors, cfg, str(weights_file), use_conv_bias=bool(hf.get("use_conv_bias", True)))
    return cfg, sd


# ---------------------------------------------------------------------------------------------
# ours -> HF


# field -> (value transformers' Mamba2 needs, what transformers does instead)
_HF_LAYOUT = {
    "conv_bc": (True, "its conv runs over x, B and C together"),
    "d_per_channel": (False, "it has one D per head"),
    "gated_norm": (True, "it always applies the gated RMSNorm before out_proj"),
    "bitlinear_norm": (False, "it has no norm inside in_proj / out_proj / lm_head"),
    "block_prenorm": (True, "every block has its own pre-norm"),
}
# files of a saved tokenizer (any transformers version) copied to an exported directory
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "vocab.txt")


def hf_export_problems(cfg: BitMambaConfig) -> list[str]:
    """One line per config field that keeps `cfg` from being a transformers `Mamba2ForCausalLM` (empty: exportable)."""
    out = []
    if cfg.quant.ternary:
        out.append("quant.ternary is true (transformers' Mamba2 has no ternary layers or int8 activations)")
    for key, (want, why) in _HF_LAYOUT.items():
        if getattr(cfg, key) != want:
            out.append(f"{key} is {str(getattr(cfg, key)).lower()} (transformers' Mamba2 needs "
                       f"{str(want).lower()}: {why})")
    if cfg.attention_layer_indices:
        which = "attn_layers" if cfg.attn_layers else "attn_fraction"
        out.append(f"{which} gives attention layers {cfg.attention_layer_indices} (transformers' Mamba2 is pure Mamba)")
    return out


def check_hf_exportable(cfg: BitMambaConfig, where: str) -> None:
    """ConfigError naming every field that keeps `cfg` from being written as a Mamba2ForCausalLM."""
    problems = hf_export_problems(cfg)
    if not problems:
        return
    hint = ("An exportable model has the standard Mamba-2 layout with quantization off: e.g. model.preset: tiny "
            "with model.overrides: {quant: {ternary: false}} (configs/pretrain_tiny_fp.yaml; on a stage's command "
            "line: model.overrides.quant.ternary=false), or an HF import made with --from hf-mamba2 --no-quant.")
    if cfg.quant.ternary:
        hint += " A ternary model in the BitMamba-2 layout exports with --to bitmamba2-bin."
    raise ConfigError(f"{where}: cannot export to transformers' Mamba2ForCausalLM: " + "; ".join(problems)
                      + f". {hint}")


def ours_config_to_hf(cfg: BitMambaConfig, bos: int | None = None, eos: int | None = None,
                      pad: int | None = None) -> dict:
    """The config.json of the Mamba2ForCausalLM that computes what `cfg` computes (checked exportable first)."""
    check_hf_exportable(cfg, "model config")
    return {
        "architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
        "state_size": cfg.d_state, "num_heads": cfg.n_heads, "head_dim": cfg.headdim, "expand": cfg.expand,
        "n_groups": cfg.ngroups, "conv_kernel": cfg.d_conv, "chunk_size": cfg.chunk_size,
        "layer_norm_epsilon": cfg.norm_eps, "use_bias": False, "use_conv_bias": True, "hidden_act": "silu",
        "rms_norm": True, "norm_before_gate": False, "residual_in_fp32": True,
        "time_step_min": cfg.dt_min, "time_step_max": cfg.dt_max, "time_step_floor": cfg.dt_init_floor,
        "tie_word_embeddings": cfg.tie_embeddings, "use_cache": True,
        "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad,
    }


def ours_state_dict_to_hf(sd: dict[str, torch.Tensor], cfg: BitMambaConfig,
                          where: str = "model") -> dict[str, torch.Tensor]:
    """Our state dict -> HF tensor names, fp32 CPU, contiguous (tied: no lm_head.weight). Any tensor of ours
    left unmapped is an error: nothing is dropped silently."""
    check_hf_exportable(cfg, where)
    shapes = _expected_shapes(cfg)
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in hf_weight_map(cfg).items():
        if ours not in sd:
            raise CheckpointError(f"{where}: tensor {ours} missing")
        t = sd[ours]
        if tuple(t.shape) != shapes[ours]:
            raise CheckpointError(f"{where}: tensor {ours} has shape {list(t.shape)}, the config implies "
                                  f"{list(shapes[ours])}")
        out[theirs] = t.detach().to("cpu", torch.float32).contiguous().clone()
    extra = [k for k in drop_tied(sd, cfg.tie_embeddings) if k not in hf_weight_map(cfg)]
    if extra:
        raise CheckpointError(f"{where}: tensor {extra[0]} has no place in a Mamba2ForCausalLM")
    return out


def _copy_tokenizer(src: Path, dst: Path, vocab_size: int) -> dict[str, int | None]:
    """Copy `src`'s tokenizer files into `dst` and return its {bos, eos, pad} ids (all None without a
    tokenizer). The copy must load with AutoTokenizer and fit the vocabulary, else CheckpointError."""
    names = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    if not names:
        return {"bos": None, "eos": None, "pad": None}
    for n in names:
        shutil.copyfile(src / n, dst / n)
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(dst), local_files_only=True)
    except Exception as e:  # transformers raises OSError / ValueError / KeyError ... on a broken tokenizer
        raise CheckpointError(f"{src}: the tokenizer there ({', '.join(names)}) does not load with "
                              f"AutoTokenizer ({type(e).__name__}: {e})") from None
    if len(tok) > vocab_size:
        raise CheckpointError(f"{src}: the tokenizer has {len(tok)} tokens, the model's vocab_size is {vocab_size}")
    return {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id}


def transformers_gated_norm_is_grouped() -> bool | None:
    """Whether the installed transformers' Mamba2 gated RMSNorm normalizes per group of d_inner / n_groups
    channels (as we do); None when transformers is not importable."""
    try:
        from transformers.models.mamba2 import modeling_mamba2
    except ImportError:
        return None
    norm = getattr(modeling_mamba2, "Mamba2RMSNormGated", None) or getattr(modeling_mamba2, "MambaRMSNormGated", None)
    if norm is None:                      # renamed again: unknown, the caller warns either way
        return None
    return "group_size" in inspect.signature(norm.__init__).parameters


def _warn_groups(cfg: BitMambaConfig) -> None:
    if cfg.ngroups == 1:
        return
    grouped = transformers_gated_norm_is_grouped()
    here = {None: "transformers is not installed here",
            True: "the transformers installed here does, as we do",
            False: "the transformers installed here does NOT (it normalizes over all d_inner channels)"}[grouped]
    log.warning("ngroups = %d: the exported model equals ours only under a transformers whose Mamba2 gated "
                "RMSNorm normalizes per group of d_inner / n_groups channels (%s; 5.17 does not, 5.24 does). "
                "Models with ngroups = 1 are exact under every version.", cfg.ngroups, here)


def check_free_destination(dst: str | Path) -> Path:
    """`dst` as a Path if nothing would be overwritten there (absent or an empty directory), else CheckpointError."""
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise CheckpointError(f"{dst}: destination exists and is not an empty directory")
    return dst


def save_hf_mamba2(model, dst: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    """Write `model` (a BitMambaLM in an exportable layout) as a Mamba2ForCausalLM directory `dst`, with the
    tokenizer of `tokenizer_dir` if it has one. Atomic (temp dir beside `dst`, then rename); refuses a
    non-empty `dst`."""
    cfg = model.config
    check_hf_exportable(cfg, "model")
    dst = check_free_destination(dst)
    tensors = ours_state_dict_to_hf(model.state_dict(), cfg)
    _warn_groups(cfg)
    from safetensors.torch import save_file

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        ids = (_copy_tokenizer(Path(tokenizer_dir), tmp, cfg.vocab_size) if tokenizer_dir is not None
               else {"bos": None, "eos": None, "pad": None})
        hf = ours_config_to_hf(cfg, **ids)
        (tmp / CONFIG_NAME).write_text(json.dumps(hf, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        if dst.exists():
            dst.rmdir()
        os.rename(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dst
