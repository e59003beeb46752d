"""Model configuration: `QuantConfig` and `BitMambaConfig` (typed, validated at construction).

    cfg = BitMambaConfig.preset("tiny")
    cfg = BitMambaConfig.from_dict(json.load(f))      # unknown keys / wrong types -> ConfigError

Every cross-field check raises `ConfigError` naming the field. Presets follow
`shared/reference/ANCHORS.md` (BitMamba-2 255M / 1B layout, Mini-Mamba-Agent tiers).

Hybrid layer placement (`attn_fraction`): n = max(1, int(L * frac)) attention layers at
    idx_i = floor((i + 0.5) * L / n + 0.5) - 1,   i = 0..n-1
i.e. the centre of each of n equal slices, rounded half up, minus one. 40 layers, 0.08 -> [6, 19, 32]
(the Mini-Mamba-Agent example); 64 layers, 0.08 -> [5, 18, 31, 44, 57].
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

from model.errors import ConfigError
from model.typed import from_dict, to_dict


@dataclass
class QuantConfig:
    """How BitLinear layers quantize.

    ternary: False gives plain floating-point linear layers (e.g. an HF import with --no-quant).
    weight_scale: "tensor" (one absmean scale) or "group" (one per row and `group_size` input columns).
    activation: "int8" (per-token absmax) or "none" (16-bit activations, W1.58A16).
    """

    ternary: bool = True
    weight_scale: Literal["tensor", "group"] = "tensor"
    group_size: int = 128
    activation: Literal["int8", "none"] = "int8"

    def __post_init__(self):
        if self.weight_scale not in ("tensor", "group"):
            raise ConfigError(f"quant.weight_scale: must be 'tensor' or 'group', got {self.weight_scale!r}")
        if self.activation not in ("int8", "none"):
            raise ConfigError(f"quant.activation: must be 'int8' or 'none', got {self.activation!r}")
        if self.group_size <= 0:
            raise ConfigError(f"quant.group_size: must be positive, got {self.group_size}")


@dataclass
class BitMambaConfig:
    """Architecture of a (hybrid) ternary Mamba-2 LM. See docs/DESIGN.md for each field."""

    vocab_size: int
    d_model: int
    n_layers: int
    d_state: int = 128
    headdim: int = 64
    expand: int = 2
    ngroups: int = 1
    d_conv: int = 4
    chunk_size: int = 256
    # layout switches (defaults = standard Mamba-2 as in mamba-ssm / HF)
    conv_bc: bool = True
    d_per_channel: bool = False
    gated_norm: bool = True
    bitlinear_norm: bool = False
    block_prenorm: bool = True
    ternary_head: bool = False
    tie_embeddings: bool = False
    norm_eps: float = 1e-5
    # init only
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    A_init_range: tuple[float, float] = (1.0, 16.0)
    # hybrid attention
    attn_layers: list[int] = field(default_factory=list)
    attn_fraction: float = 0.0
    attn_heads: int = 16
    attn_kv_heads: int = 4
    attn_head_dim: int = 64
    rope_theta: float = 10000.0
    quant: QuantConfig = field(default_factory=QuantConfig)

    def __post_init__(self):
        if isinstance(self.quant, dict):
            self.quant = from_dict(QuantConfig, self.quant, prefix="quant.")
        self.A_init_range = tuple(self.A_init_range)
        self.attn_layers = list(self.attn_layers)
        for name in ("vocab_size", "d_model", "n_layers", "d_state", "headdim", "expand", "ngroups",
                     "d_conv", "chunk_size", "attn_heads", "attn_kv_heads", "attn_head_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"{name}: must be a positive integer, got {v!r}")
        if self.d_inner % self.headdim:
            raise ConfigError(f"headdim: d_inner = expand*d_model = {self.d_inner} is not a multiple of "
                              f"headdim = {self.headdim}")
        if self.n_heads % self.ngroups:
            raise ConfigError(f"ngroups: n_heads = {self.n_heads} is not a multiple of ngroups = {self.ngroups}")
        if self.d_conv < 2:
            raise ConfigError(f"d_conv: must be >= 2, got {self.d_conv}")
        if self.norm_eps <= 0:
            raise ConfigError(f"norm_eps: must be positive, got {self.norm_eps}")
        if not (0 < self.dt_min <= self.dt_max):
            raise ConfigError(f"dt_min/dt_max: need 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")
        lo, hi = self.A_init_range
        if not (0 < lo <= hi):
            raise ConfigError(f"A_init_range: need 0 < low <= high, got {self.A_init_range}")
        if not (0.0 <= self.attn_fraction < 1.0):
            raise ConfigError(f"attn_fraction: must be in [0, 1), got {self.attn_fraction}")
        if self.attn_layers and self.attn_fraction:
            raise ConfigError("attn_layers and attn_fraction: give one of them, not both")
        for i in self.attn_layers:
            if not (0 <= i < self.n_layers):
                raise ConfigError(f"attn_layers: index {i} out of range for n_layers = {self.n_layers}")
        if len(set(self.attn_layers)) != len(self.attn_layers):
            raise ConfigError(f"attn_layers: duplicate indices in {self.attn_layers}")
        if self.attention_layer_indices:
            if self.attn_heads % self.attn_kv_heads:
                raise ConfigError(f"attn_kv_heads: attn_heads = {self.attn_heads} is not a multiple of "
                                  f"attn_kv_heads = {self.attn_kv_heads}")
            if self.attn_head_dim % 2:
                raise ConfigError(f"attn_head_dim: must be even for RoPE, got {self.attn_head_dim}")
        if self.tie_embeddings and (self.ternary_head or self.bitlinear_norm):
            raise ConfigError("tie_embeddings: cannot tie a ternary head or a head with its own norm "
                              "(set ternary_head=false and bitlinear_norm=false)")
        if self.quant.ternary:
            # in-features of every ternary layer must pack 4 codes a byte (and fit the groups)
            ins = {"d_model": self.d_model, "d_inner": self.d_inner}
            if self.attention_layer_indices:
                ins["attn_heads*attn_head_dim"] = self.attn_heads * self.attn_head_dim
            for what, n in ins.items():
                if n % 4:
                    raise ConfigError(f"{what} = {n}: in-features of ternary layers must be a multiple of 4")
                if self.quant.weight_scale == "group" and n % self.quant.group_size:
                    raise ConfigError(f"quant.group_size = {self.quant.group_size} does not divide "
                                      f"{what} = {n} (in-features of a ternary layer)")

    # ---- derived ----
    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def n_heads(self) -> int:
        return self.d_inner // self.headdim

    @property
    def d_in_proj(self) -> int:
        return 2 * self.d_inner + 2 * self.ngroups * self.d_state + self.n_heads

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.ngroups * self.d_state if self.conv_bc else self.d_inner

    @property
    def attention_layer_indices(self) -> list[int]:
        """Resolved sorted attention layer indices (explicit list or spread by `attn_fraction`)."""
        if self.attn_layers:
            return sorted(self.attn_layers)
        if self.attn_fraction <= 0:
            return []
        L = self.n_layers
        n = max(1, int(L * self.attn_fraction))
        return [int(math.floor((i + 0.5) * L / n + 0.5)) - 1 for i in range(n)]

    # ---- (de)serialization ----
    def to_dict(self) -> dict:
        d = to_dict(self)
        d["A_init_range"] = list(self.A_init_range)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "BitMambaConfig":
        """Build from a plain dict; unknown keys, wrong types, bad values -> ConfigError naming the key."""
        return from_dict(cls, data)

    def replace(self, **changes) -> "BitMambaConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str, **overrides) -> "BitMambaConfig":
        """Named architectures: see PRESETS. Keyword overrides replace fields (validated)."""
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r} (known: {', '.join(sorted(PRESETS))})")
        data = dict(PRESETS[name])
        data.update(overrides)
        return cls.from_dict(data)


def _bitmamba2(d_model: int, n_layers: int, n_heads: int) -> dict:
    d_inner = 2 * d_model
    return dict(vocab_size=50257, d_model=d_model, n_layers=n_layers, d_state=1, headdim=d_inner // n_heads,
                expand=2, ngroups=n_heads, d_conv=4, conv_bc=False, d_per_channel=True, gated_norm=False,
                bitlinear_norm=True, block_prenorm=False, ternary_head=True, tie_embeddings=False,
                norm_eps=1e-6)


PRESETS: dict[str, dict] = {
    # tests and demos: small enough for CPU in milliseconds
    "tiny": dict(vocab_size=256, d_model=64, n_layers=2, d_state=16, headdim=16, chunk_size=16),
    "tiny-hybrid": dict(vocab_size=256, d_model=64, n_layers=3, d_state=16, headdim=16, chunk_size=16,
                        attn_layers=[1], attn_heads=4, attn_kv_heads=2, attn_head_dim=16),
    "tiny-bitmamba2": dict(_bitmamba2(64, 2, 4), vocab_size=256, chunk_size=16),
    # the published BitMamba-2 models (ANCHORS §1)
    "bitmamba2-255m": _bitmamba2(1024, 24, 16),
    "bitmamba2-1b": _bitmamba2(2048, 32, 32),
    # Mini-Mamba-Agent-1.58b tiers (standard Mamba-2 block, ternary projections and head)
    "mini-agent-scout": dict(vocab_size=50257, d_model=512, n_layers=24, d_state=64, headdim=64,
                             ternary_head=True),
    "mini-agent-parent": dict(vocab_size=50257, d_model=1024, n_layers=40, d_state=128, headdim=64,
                              ternary_head=True),
    "mini-agent-hybrid": dict(vocab_size=50257, d_model=1024, n_layers=64, d_state=128, headdim=64,
                              ternary_head=True, attn_fraction=0.08, attn_heads=16, attn_kv_heads=4,
                              attn_head_dim=64),
}
