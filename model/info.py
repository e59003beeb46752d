"""`bitmamba info DIR [--json]`: a checkpoint's config, parameter counts and packed size.

Reads only config.json and the safetensors header (no tensor data), so it is instant on large models.
Parameters are split into ternary (weights of ternary BitLinears) and full precision (everything
else: embedding, norms, conv, dt_bias, A_log, D, fp heads). The packed size is what an inference
engine stores: ternary weights at 2 bits each plus their fp32 scales (one per tensor, or one per
row and group), full-precision tensors at the dtype they are stored in. MB = 10^6 bytes.
"""

from __future__ import annotations

import argparse
import json
import struct
from pathlib import Path

from model.errors import CheckpointError

# torch and model.checkpoint load inside the functions that need them: `bitmamba info --help` is instant

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """name -> {"dtype": str, "shape": list} from a safetensors file's JSON header (no data read)."""
    if not path.is_file():
        raise CheckpointError(f"missing {path.name} in checkpoint directory {path.parent}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{path}: truncated or corrupt safetensors header (length {n}, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated: tensors need {8 + n + end} bytes, file has {size}")
    return header


def size_summary(cfg, fp_dtypes: dict[str, str] | None = None) -> dict:
    """Parameter split and packed size of a model of config `cfg` (built on the meta device).

    fp_dtypes: stored dtype (safetensors name, e.g. "F32", "BF16") of each full-precision tensor;
    F32 where not given. Returns the "parameters" and "packed_bytes" parts of `checkpoint_info`.
    """
    from model.checkpoint import drop_tied
    from model.lm import BitMambaLM

    import torch

    with torch.device("meta"):
        model = BitMambaLM(cfg)
    ternary: dict[str, tuple[int, int, int]] = {}  # weight name -> (out, in, n_scales)
    for name, m in model.bitlinears():
        if m.ternary:
            groups = 1 if m.group_size is None else m.out_features * (m.in_features // m.group_size)
            ternary[f"{name}.weight"] = (m.out_features, m.in_features, groups)
    shapes = drop_tied({k: tuple(v.shape) for k, v in model.state_dict().items()}, cfg.tie_embeddings)
    n_tern = n_fp = codes_bytes = scale_bytes = fp_bytes = 0
    by_dtype: dict[str, int] = {}
    for name, shape in shapes.items():
        numel = 1
        for s in shape:
            numel *= s
        if name in ternary:
            out_f, in_f, n_scales = ternary[name]
            n_tern += numel
            codes_bytes += out_f * in_f // 4
            scale_bytes += 4 * n_scales
        else:
            dt = (fp_dtypes or {}).get(name, "F32")
            n_fp += numel
            fp_bytes += numel * _DTYPE_BYTES.get(dt, 4)
            by_dtype[dt] = by_dtype.get(dt, 0) + numel
    return {
        "shapes": shapes,
        "parameters": {"total": n_tern + n_fp, "ternary": n_tern, "full_precision": n_fp,
                       "full_precision_by_dtype": by_dtype},
        "packed_bytes": {"ternary_codes": codes_bytes, "ternary_scales": scale_bytes, "full_precision": fp_bytes,
                         "total": codes_bytes + scale_bytes + fp_bytes},
    }


def checkpoint_info(directory: str | Path) -> dict:
    """Config, parameter counts and packed size of a checkpoint directory (see module docstring)."""
    from model.checkpoint import WEIGHTS_NAME, load_config, verify_manifest

    directory = Path(directory)
    cfg = load_config(directory)
    verify_manifest(directory)          # a training checkpoint's files match their sha256
    weights = directory / WEIGHTS_NAME
    header = read_safetensors_header(weights)
    expected = size_summary(cfg)["shapes"]
    for name, shape in expected.items():
        if name not in header:
            raise CheckpointError(f"{weights}: missing tensor {name}")
        if tuple(header[name]["shape"]) != shape:
            raise CheckpointError(f"{weights}: tensor {name} has shape {header[name]['shape']}, "
                                  f"the config expects {list(shape)}")
    summary = size_summary(cfg, {k: v["dtype"] for k, v in header.items()})
    return {
        "path": str(directory),
        "config": cfg.to_dict(),
        "derived": {"d_inner": cfg.d_inner, "n_heads": cfg.n_heads, "d_in_proj": cfg.d_in_proj,
                    "conv_dim": cfg.conv_dim, "attention_layers": cfg.attention_layer_indices},
        "parameters": summary["parameters"],
        "packed_bytes": summary["packed_bytes"],
        "packed_mb": summary["packed_bytes"]["total"] / 1e6,
        "stored_mb": weights.stat().st_size / 1e6,
    }


def format_info(info: dict) -> str:
    p, b = info["parameters"], info["packed_bytes"]
    lines = [f"checkpoint: {info['path']}", "config:"]
    for k, v in info["config"].items():
        if isinstance(v, dict):
            lines += [f"  {k}:"] + [f"    {kk}: {vv}" for kk, vv in v.items()]
        else:
            lines.append(f"  {k}: {v}")
    lines.append("derived: " + ", ".join(f"{k}={v}" for k, v in info["derived"].items()))
    share = 100.0 * p["ternary"] / p["total"] if p["total"] else 0.0
    dts = ", ".join(f"{k} {v:,}" for k, v in p["full_precision_by_dtype"].items())
    lines += [
        f"parameters: {p['total']:,} total = {p['ternary']:,} ternary ({share:.1f}%) + "
        f"{p['full_precision']:,} full precision ({dts})",
        f"packed size: {info['packed_mb']:.3f} MB = ternary codes {b['ternary_codes'] / 1e6:.3f} MB (2 bits each) "
        f"+ scales {b['ternary_scales'] / 1e6:.6f} MB + full precision {b['full_precision'] / 1e6:.3f} MB "
        f"(MB = 10^6 bytes)",
        f"stored size (model.safetensors): {info['stored_mb']:.3f} MB",
    ]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bitmamba info", description=__doc__.split("\n\n")[0])
    p.add_argument("dir", help="checkpoint directory (config.json + model.safetensors)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    info = checkpoint_info(args.dir)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0
