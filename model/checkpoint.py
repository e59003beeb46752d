"""Model checkpoints: `config.json` + `model.safetensors` in one directory (never pickle).

    save_pretrained(model, "out/step100")          # atomic: temp dir in the same parent, then rename
    model = from_pretrained(BitMambaLM, "out/step100", device="cuda", dtype=torch.bfloat16)

config.json holds the full BitMambaConfig plus "format": "bitmamba-rl" and "format_version" (`config_json`).
With tie_embeddings the tied `lm_head.weight` is not stored (it is `embedding.weight`): `drop_tied` on save,
`restore_tied` on load, for these directories, training checkpoints and HF conversion alike.
Every problem raises CheckpointError naming the file and the key / tensor / shapes.

A training checkpoint (`rl.train.checkpoint`, e.g. `runs/x/checkpoints/step_00000010/`) is also a model
directory and carries `manifest.json` (size and sha256 of every file). Loading one checks the manifest
first (`verify_manifest`), so a corrupt or truncated file is an error naming it, never silently wrong
weights; BITMAMBA_SKIP_VERIFY=1 skips the checksums (sizes are still checked) for speed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

import torch
from safetensors.torch import load_file, save_file

from model.config import BitMambaConfig
from model.errors import CheckpointError, ConfigError

FORMAT = "bitmamba-rl"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TIED_KEY = "lm_head.weight"
EMBEDDING_KEY = "embedding.weight"
MANIFEST_NAME = "manifest.json"
SKIP_VERIFY_ENV = "BITMAMBA_SKIP_VERIFY"
T = TypeVar("T")


def sha256_file(path: str | os.PathLike, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def file_problem(directory: Path, name: str, entry: dict, checksums: bool = True) -> str | None:
    """None when `directory/name` matches its manifest entry ({"size", "sha256"}), else what is wrong."""
    f = directory / name
    if not f.is_file():
        return f"file {name} listed in the manifest is missing"
    if f.stat().st_size != entry.get("size"):
        return f"file {name} has {f.stat().st_size} bytes, manifest says {entry.get('size')} (truncated?)"
    if checksums and sha256_file(f) != entry.get("sha256"):
        return f"file {name} sha256 mismatch (corrupt)"
    return None


def verify_manifest(directory: str | os.PathLike, checksums: bool | None = None) -> bool:
    """Check every file a `manifest.json` in `directory` lists; False when there is no manifest (a plain
    `save_pretrained` directory), True when all match, CheckpointError naming the file otherwise.
    `checksums=None`: sha256 unless BITMAMBA_SKIP_VERIFY=1 (sizes are always checked)."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        return False
    if checksums is None:
        checksums = os.environ.get(SKIP_VERIFY_ENV, "") in ("", "0")
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable manifest ({type(e).__name__}: {e}); "
                              f"{SKIP_VERIFY_ENV}=1 does not skip this, remove the file to load anyway") from None
    for name, entry in files.items():
        problem = file_problem(directory, name, entry if isinstance(entry, dict) else {}, checksums)
        if problem:
            raise CheckpointError(f"{directory / name}: {problem}: the checkpoint {directory} does not match "
                                  f"its {MANIFEST_NAME} (set {SKIP_VERIFY_ENV}=1 to skip the checksums)")
    return True


def config_json(config: BitMambaConfig) -> str:
    """The text of a checkpoint's config.json: the full config plus "format" and "format_version"."""
    return json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, **config.to_dict()}, indent=2) + "\n"


def read_json_object(path: Path, error: type[Exception] = CheckpointError) -> dict:
    """The JSON object in file `path` (a config.json); malformed JSON, non-UTF-8 text or a top level that is
    not an object raise `error` naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise error(f"{path}: malformed JSON (line {e.lineno}, column {e.colno}): {e.msg}") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object at the top level")
    return data


def drop_tied(state: Mapping[str, T], tied: bool) -> dict[str, T]:
    """`state` (tensors, shapes, ...) without `lm_head.weight` when the embeddings are tied: a tied checkpoint
    does not store it (it is `embedding.weight`)."""
    return {k: v for k, v in state.items() if not (tied and k == TIED_KEY)}


def restore_tied(tensors: Mapping[str, T], tied: bool) -> dict[str, T]:
    """`tensors` with `lm_head.weight` set to `embedding.weight` when the embeddings are tied and the head is
    absent (as in a stored checkpoint); unchanged otherwise."""
    out = dict(tensors)
    if tied and TIED_KEY not in out and EMBEDDING_KEY in out:
        out[TIED_KEY] = out[EMBEDDING_KEY]
    return out


def _tensors_to_save(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    sd = drop_tied(model.state_dict(), model.config.tie_embeddings)
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def save_pretrained(model: torch.nn.Module, directory: str | os.PathLike) -> Path:
    """Write config.json + model.safetensors into `directory` atomically (replacing an old one)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"cannot save a checkpoint to {directory}: it exists and is not a directory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        (tmp / CONFIG_NAME).write_text(config_json(model.config), encoding="utf-8")
        save_file(_tensors_to_save(model), str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
            os.rename(directory, old / "ckpt")
            os.rename(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


def load_config(directory: str | os.PathLike) -> BitMambaConfig:
    """Read and validate `directory/config.json`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"missing {CONFIG_NAME} in checkpoint directory {directory}")
    data = read_json_object(path)
    fmt = data.pop("format", None)
    version = data.pop("format_version", None)
    if fmt != FORMAT:
        raise CheckpointError(f"{path}: \"format\" is {fmt!r}, expected {FORMAT!r} (not a bitmamba-rl checkpoint; "
                              f"import foreign models with `bitmamba convert`)")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported format_version {version!r} (this code reads {FORMAT_VERSION})")
    try:
        return BitMambaConfig.from_dict(data)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"missing {path.name} in checkpoint directory {path.parent}")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises SafetensorError / OSError / ValueError on bad files
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({type(e).__name__}: {e})") from None


def check_tensors(expected: dict[str, torch.Size], got: dict[str, torch.Tensor], path: Path) -> None:
    """Raise CheckpointError naming missing / unexpected tensors and shape mismatches."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    if missing:
        raise CheckpointError(f"{path}: missing tensor(s) {', '.join(missing[:5])}"
                              + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensor(s) {', '.join(unexpected[:5])}"
                              + (f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else ""))
    for name, shape in expected.items():
        if tuple(got[name].shape) != tuple(shape):
            raise CheckpointError(f"{path}: tensor {name} has shape {tuple(got[name].shape)}, "
                                  f"the config expects {tuple(shape)}")


def from_pretrained(cls, directory: str | os.PathLike, device=None, dtype: torch.dtype | None = None):
    """Build `cls(config)` from a checkpoint directory; floating tensors cast to `dtype` if given.
    A `manifest.json` beside the weights is checked first (`verify_manifest`). The model is returned
    in eval mode."""
    directory = Path(directory)
    config = load_config(directory)
    verify_manifest(directory)
    path = directory / WEIGHTS_NAME
    tensors = load_tensors(path)
    with torch.device("meta"):
        model = cls(config)
    expected = drop_tied({k: v.shape for k, v in model.state_dict().items()}, config.tie_embeddings)
    check_tensors(expected, tensors, path)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    tensors = restore_tied(tensors, config.tie_embeddings)
    model.load_state_dict(tensors, strict=True, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embedding.weight
    if device is not None:
        model = model.to(device)
    return model.eval()
