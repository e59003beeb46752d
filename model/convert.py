"""`bitmamba convert`: checkpoints to and from ours.

    bitmamba convert --from hf-mamba2 SRC_DIR DST_DIR [--no-quant]   # HF Mamba2ForCausalLM -> ours
    bitmamba convert --to hf-mamba2 SRC_DIR DST_DIR                  # ours (quant off) -> HF Mamba2ForCausalLM
    bitmamba convert --from bitmamba2-bin FILE.bin DST_DIR           # BitMamba-2 engine file -> ours
    bitmamba convert --to bitmamba2-bin SRC_DIR FILE.bin             # ours (BitMamba-2 layout) -> engine file

Our BitLinears keep only a latent weight W and recompute s = 1/max(mean|W|, 1e-5) and
codes = clip(round_half_away(W*s), -1, 1) from it. Importing a `.bin` therefore builds
W = codes * a (zeros stay 0), with `a` chosen so that the recomputed fp32 scale equals the stored
one bit for bit (`latent_from_ternary`); exporting recomputes codes with the model's own
`weight_quant` and the scale with `ternary_scale` (mean in float64, so the value does not depend on
summation order or thread count). Import then export is byte-identical.

`--to hf-mamba2` writes a directory `Mamba2ForCausalLM.from_pretrained` loads (and `AutoTokenizer`, when
SRC has a tokenizer). Only a model transformers can compute is exported: standard Mamba-2 layout and
quant.ternary false (e.g. configs/pretrain_tiny_fp.yaml's model: preset tiny with
overrides {quant: {ternary: false}}); anything else is refused with the fields named
(`model.hf_mamba2.hf_export_problems`), before the weights are read.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch

from model.binfile import BinHeader, BinModel, FpRecord, TernaryRecord, bin_layout, read_bin, write_bin
from model.config import BitMambaConfig, QuantConfig
from model.convert_args import parser
from model.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

SCALE_EPS = 1e-5  # s = 1 / max(mean|W|, SCALE_EPS), as in model.bitlinear.weight_quant


# ---------------------------------------------------------------------------------------------
# ternary scale <-> latent weight


def ternary_scale(w: torch.Tensor | np.ndarray) -> np.float32:
    """Per-tensor absmean scale s = 1/max(mean|W|, 1e-5) as fp32, with the mean taken in float64.

    Summing in float64 (in row blocks, to bound memory) makes the value independent of the
    summation order, so export is reproducible across machines and thread counts.
    """
    t = torch.as_tensor(w).detach()
    total = 0.0
    n = t.numel()
    flat = t.reshape(-1)
    step = 1 << 22
    for i in range(0, n, step):
        total += float(flat[i : i + step].abs().to(torch.float64).sum())
    mean = total / n if n else 0.0
    return np.float32(1.0 / max(mean, SCALE_EPS))


def latent_from_ternary(codes: np.ndarray, scale: np.float32, name: str = "") -> np.ndarray:
    """Latent fp32 weight W whose recomputed (codes, scale) equal the given ones exactly.

    Zeros stay 0; nonzeros get magnitude a or a' = nextafter(a) (the first m nonzeros in row-major
    order take a'), with a ~ N/(nnz*s) and m found by bisection so that `ternary_scale(W)`, which
    is 1/(sum|W|/N) with an exact float64 sum here, equals `scale` bit for bit. Mixing two adjacent
    magnitudes makes the mean fine-grained enough to hit any fp32 scale (a single magnitude misses
    about one scale in ten). Codes are reproduced since |W|*s' ~ N/nnz >= 1 for nonzeros.
    An all-zero matrix gives W = 0 (its scale is 1e5 whatever was stored; the output is 0 anyway).
    """
    codes = np.asarray(codes, dtype=np.int8)
    scale = np.float32(scale)
    n = codes.size
    nnz = int(np.count_nonzero(codes))
    if nnz == 0:
        if scale != np.float32(1.0 / SCALE_EPS):
            log.warning("%s: all codes are zero; stored scale %r cannot be kept (export writes %r)",
                        name, float(scale), float(np.float32(1.0 / SCALE_EPS)))
        return np.zeros(codes.shape, dtype=np.float32)

    def s_of(total: float) -> np.float32:  # ternary_scale given the (exact) float64 sum of |W|
        return np.float32(1.0 / max(total / n, SCALE_EPS))

    up, down = np.float32(np.inf), np.float32(0)
    a = np.float32(n / (nnz * float(scale)))
    for _ in range(1024):  # bracket: s_of(nnz*a) >= scale >= s_of(nnz*a')
        if s_of(nnz * float(a)) < scale:
            a = np.nextafter(a, down)
        elif s_of(nnz * float(np.nextafter(a, up))) > scale:
            a = np.nextafter(a, up)
        else:
            break
    a1 = np.nextafter(a, up)
    step = float(a1) - float(a)
    lo, hi = 0, nnz  # smallest m with s_of(nnz*a + m*step) <= scale (non-increasing in m)
    while lo < hi:
        mid = (lo + hi) // 2
        if s_of(nnz * float(a) + mid * step) <= scale:
            hi = mid
        else:
            lo = mid + 1
    m = lo
    if s_of(nnz * float(a) + m * step) != scale:
        raise CheckpointError(f"{name}: cannot build a latent weight that reproduces scale {float(scale)!r} "
                              f"({nnz} nonzero codes of {n})")
    mag = np.full(n, a, dtype=np.float32)
    mag[np.flatnonzero(codes.reshape(-1))[:m]] = a1
    w = (codes.reshape(-1).astype(np.float32) * mag).reshape(codes.shape)
    got = ternary_scale(w)
    if got != scale:  # the shortcut above must agree with the real function
        raise CheckpointError(f"{name}: latent weight gives scale {float(got)!r}, stored {float(scale)!r}")
    return w


# ---------------------------------------------------------------------------------------------
# BitMamba-2 .bin <-> our model


def bitmamba2_config(h: BinHeader, chunk_size: int = 256) -> BitMambaConfig:
    """Our config for the BitMamba-2 layout described by a .bin header."""
    return BitMambaConfig(
        vocab_size=h.vocab, d_model=h.d_model, n_layers=h.n_layers, d_state=1, headdim=h.head_dim,
        expand=2, ngroups=h.n_heads, d_conv=4, chunk_size=chunk_size, conv_bc=False, d_per_channel=True,
        gated_norm=False, bitlinear_norm=True, block_prenorm=False, ternary_head=True, tie_embeddings=False,
        norm_eps=1e-6, quant=QuantConfig(ternary=True, weight_scale="tensor", activation="int8"),
    )


# field -> value every model exported to .bin must have (beyond sizes implied by the header)
_BITMAMBA2_FIXED = dict(d_state=1, expand=2, d_conv=4, conv_bc=False, d_per_channel=True, gated_norm=False,
                        bitlinear_norm=True, block_prenorm=False, ternary_head=True, tie_embeddings=False,
                        norm_eps=1e-6)


def check_bitmamba2_layout(cfg: BitMambaConfig, where: str) -> None:
    """Raise ConfigError naming the first field that keeps `cfg` from being written as a .bin."""
    for key, want in _BITMAMBA2_FIXED.items():
        got = getattr(cfg, key)
        if (got != want) if not isinstance(want, float) else not math.isclose(got, want, rel_tol=1e-9):
            raise ConfigError(f"{where}: not in the BitMamba-2 layout: {key} = {got!r} (the .bin format needs {want!r})")
    if cfg.ngroups != cfg.n_heads:
        raise ConfigError(f"{where}: not in the BitMamba-2 layout: ngroups = {cfg.ngroups} "
                          f"(the .bin format needs ngroups = n_heads = {cfg.n_heads})")
    if cfg.attention_layer_indices:
        raise ConfigError(f"{where}: not in the BitMamba-2 layout: attention layers "
                          f"{cfg.attention_layer_indices} (the .bin format is pure Mamba)")
    q = cfg.quant
    for key, want in (("ternary", True), ("weight_scale", "tensor"), ("activation", "int8")):
        if getattr(q, key) != want:
            raise ConfigError(f"{where}: not in the BitMamba-2 layout: quant.{key} = {getattr(q, key)!r} "
                              f"(the .bin format needs {want!r})")


def bin_to_state_dict(m: BinModel) -> dict[str, torch.Tensor]:
    """Our state dict (fp32) from a parsed .bin: fp records as they are, ternary ones as latents."""
    sd: dict[str, torch.Tensor] = {}
    for r in m.records:
        if isinstance(r, FpRecord):
            sd[r.name] = torch.from_numpy(r.data.copy())
        else:
            sd[r.name] = torch.from_numpy(latent_from_ternary(r.codes, r.scale, r.name))
    return sd


def model_to_bin(model) -> BinModel:
    """Parsed-.bin view of a BitMambaLM in the BitMamba-2 layout (codes from the model's quantizer)."""
    from model.bitlinear import weight_quant

    cfg = model.config
    check_bitmamba2_layout(cfg, "model")
    h = BinHeader(vocab=cfg.vocab_size, d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads)
    sd = model.state_dict()
    records = []
    for name, rtype, shape in bin_layout(h):
        if name not in sd:
            raise CheckpointError(f"model has no tensor {name} (needed for the .bin)")
        t = sd[name].detach().float().cpu()
        if tuple(t.shape) != shape:
            raise CheckpointError(f"tensor {name} has shape {list(t.shape)}, the .bin needs {list(shape)}")
        if rtype == 0:
            records.append(FpRecord(name, t.numpy().astype(np.float32)))
        else:
            codes, _ = weight_quant(t, None)
            records.append(TernaryRecord(name, codes.to(torch.int8).numpy(), ternary_scale(t)))
    return BinModel(h, records)


def import_bin(path: str | Path):
    """.bin file -> BitMambaLM (eval mode) in the BitMamba-2 layout."""
    from model.lm import BitMambaLM

    m = read_bin(path)
    cfg = bitmamba2_config(m.header)
    model = BitMambaLM(cfg)
    _load_exact(model, bin_to_state_dict(m), str(path))
    return model.eval()


def export_bin(model, path: str | Path) -> None:
    write_bin(path, model_to_bin(model))


def import_hf(src: str | Path, no_quant: bool = False):
    """HF Mamba2ForCausalLM dir -> BitMambaLM (eval mode)."""
    from model.hf_mamba2 import load_hf_mamba2
    from model.lm import BitMambaLM

    cfg, sd = load_hf_mamba2(src, no_quant=no_quant)
    model = BitMambaLM(cfg)
    _load_exact(model, sd, str(src))
    return model.eval()


def export_hf(src: str | Path, dst: str | Path):
    """Our checkpoint dir -> HF Mamba2ForCausalLM dir (with SRC's tokenizer, if any). Returns our model."""
    from model.checkpoint import CONFIG_NAME, load_config
    from model.hf_mamba2 import check_free_destination, check_hf_exportable, save_hf_mamba2
    from model.lm import BitMambaLM

    src = Path(src)
    check_hf_exportable(load_config(src), str(src / CONFIG_NAME))   # refuse before reading the weights
    check_free_destination(dst)
    model = BitMambaLM.from_pretrained(src)
    save_hf_mamba2(model, dst, tokenizer_dir=src)
    return model


def _load_exact(model, sd: dict[str, torch.Tensor], where: str) -> None:
    """load_state_dict(strict) with errors naming the tensors; values are copied bit-exactly."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise CheckpointError(f"{where}: converted weights do not fit the model: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    for k, v in sd.items():
        if tuple(own[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{where}: tensor {k}: shape {list(v.shape)}, model needs {list(own[k].shape)}")
    with torch.no_grad():
        for k, p in list(model.named_parameters()) + list(model.named_buffers()):
            if k in sd:
                p.copy_(sd[k].to(p.dtype))


def _save(model, dst: Path) -> None:
    """save_pretrained (atomic: temp dir, then rename); refuses to overwrite a non-empty directory."""
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise CheckpointError(f"{dst}: destination exists and is not an empty directory")
    model.save_pretrained(dst)


def main(argv: list[str]) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.no_quant and args.src_fmt != "hf-mamba2":
        p.error("--no-quant applies to --from hf-mamba2 only")

    if args.src_fmt == "hf-mamba2":
        model = import_hf(args.src, no_quant=args.no_quant)
        _save(model, Path(args.dst))
    elif args.src_fmt == "bitmamba2-bin":
        model = import_bin(args.src)
        _save(model, Path(args.dst))
    elif args.dst_fmt == "hf-mamba2":
        model = export_hf(args.src, args.dst)
    else:
        from model.lm import BitMambaLM

        src = Path(args.src)
        if not src.is_dir():
            raise CheckpointError(f"{src}: not a checkpoint directory")
        model = BitMambaLM.from_pretrained(src)
        export_bin(model, args.dst)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.dst} ({n:,} parameters)")
    return 0
