"""Atomic training checkpoints with a checksum manifest, and RNG capture/restore.

    ckpt = CheckpointManager("runs/x/checkpoints", keep=3)
    ckpt.save(step, model, optimizer_state=opt.state_dict(),
              extra={"scheduler": sched.state_dict(), "data": loader.state_dict(), "rng": capture_rng_state()},
              files={"config.json": json.dumps(cfg).encode()})
    path = ckpt.latest()                        # newest complete checkpoint, or None
    tensors, opt_state, extra = ckpt.load(path)

Layout of one checkpoint, `root/step_{step:08d}/`:
    model.safetensors     model tensors (never pickled)
    optimizer.pt          optimizer state (torch.save; loaded with torch.load(weights_only=True))
    trainer_state.json    `extra` (JSON: scheduler, data position, RNG states, ...)
    <files>               any caller-provided files (e.g. config.json, so that the directory is also
                          a `from_pretrained` model directory)
    manifest.json         written LAST: step, format version, size and sha256 of every file above

Atomicity: everything is written into a hidden temporary directory beside the final one (same file
system), fsynced, the manifest written last, then the directory is renamed into place. A crash at any
point leaves either no `step_*` directory or a complete one; `latest()` still verifies the manifest
(missing, unreadable, size or checksum mismatch -> skipped with a `CheckpointWarning`). An I/O failure
(unwritable directory, disk full) raises `CheckpointError` and never touches existing checkpoints.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import re
import shutil
import time
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from model.checkpoint import CONFIG_NAME, WEIGHTS_NAME, file_problem, sha256_file as _sha256
from model.errors import CheckpointError

FORMAT = "bitmamba-rl-checkpoint"
VERSION = 1
MODEL_FILE = WEIGHTS_NAME
OPTIM_FILE = "optimizer.pt"
EXTRA_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
_RESERVED = {MODEL_FILE, OPTIM_FILE, EXTRA_FILE, MANIFEST_FILE}
_STEP_RE = re.compile(r"^step_(\d{8,})$")


class CheckpointWarning(UserWarning):
    """A checkpoint directory was skipped (partial, corrupt) or a non-fatal issue was found."""


# ----------------------------------------------------------------------------- helpers


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _check_file_name(name: str) -> None:
    p = Path(name)
    if not name or p.is_absolute() or ".." in p.parts or name in _RESERVED or name.startswith("."):
        raise CheckpointError(f"checkpoint extra file name {name!r} is not allowed (reserved, absolute, hidden or '..')")


def model_tensors(model_state: Mapping[str, Tensor] | nn.Module) -> dict[str, Tensor]:
    """A CPU, contiguous, storage-unshared copy of a module's state_dict (or a tensor dict), for safetensors."""
    state = model_state.state_dict() if isinstance(model_state, nn.Module) else model_state
    out: dict[str, Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, t in state.items():
        if not isinstance(t, Tensor):
            raise CheckpointError(f"model state entry {name!r} is a {type(t).__name__}, not a tensor")
        t = t.detach()
        key = (t.untyped_storage().data_ptr(), t.device.index or 0) if t.numel() else (id(t), -1)
        if t.device.type != "cpu":
            t = t.to("cpu")
        elif key in seen:  # tied weights share storage; safetensors refuses shared tensors
            t = t.clone()
        seen.add(key)
        out[name] = t.contiguous()
    return out


def safe_torch_load(path: str | Path, map_location: str | torch.device | None = "cpu") -> Any:
    """torch.load restricted to tensors and plain containers; a pickle that would run code is refused."""
    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"missing file {path}") from None
    except Exception as e:  # pickle.UnpicklingError, RuntimeError on truncation, ...
        raise CheckpointError(
            f"{path}: refused or unreadable (loaded with weights_only=True: only tensors and plain "
            f"containers are allowed, never code): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None


# ----------------------------------------------------------------------------- manager


class CheckpointManager:
    """Saves, finds and loads checkpoints under `root` (one directory per step).

    keep: number of newest complete checkpoints to keep (older ones are deleted after a successful
    save); None or 0 keeps all.
    """

    def __init__(self, root: str | Path, keep: int | None = 3):
        self.root = Path(root)
        if keep is not None and keep < 0:
            raise CheckpointError(f"CheckpointManager keep must be >= 0 or None, got {keep}")
        self.keep = keep or None

    def path_for(self, step: int) -> Path:
        return self.root / f"step_{int(step):08d}"

    # ------------------------------------------------------------------ save
    def save(self, step: int, model_state: Mapping[str, Tensor] | nn.Module,
             optimizer_state: Any = None, extra: dict | None = None,
             files: Mapping[str, bytes] | None = None) -> Path:
        """Write checkpoint `step` atomically; return its directory.

        model_state: tensor dict or module (its state_dict). optimizer_state: anything torch.save can
        write and `torch.load(weights_only=True)` can read back (an optimizer's state_dict, or a dict of
        several). extra: JSON-serializable dict. files: name -> bytes, stored beside the model.
        Raises CheckpointError on any I/O problem; existing checkpoints are left untouched.
        """
        if step < 0:
            raise CheckpointError(f"checkpoint step must be >= 0, got {step}")
        final = self.path_for(step)
        extra_bytes = None
        if extra is not None:
            try:
                extra_bytes = json.dumps(extra, indent=1, allow_nan=True).encode()
            except (TypeError, ValueError) as e:
                raise CheckpointError(f"checkpoint extra state is not JSON-serializable: {e}") from None
        for name in files or {}:
            _check_file_name(name)
        tensors = model_tensors(model_state)

        tmp = self.root / f".tmp_{final.name}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.clean_stale()
            tmp.mkdir()
            from safetensors.torch import save_file

            save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": "pt"})
            _fsync_file(tmp / MODEL_FILE)
            if optimizer_state is not None:
                with open(tmp / OPTIM_FILE, "wb") as f:
                    torch.save(optimizer_state, f)
                    f.flush()
                    os.fsync(f.fileno())
            if extra_bytes is not None:
                _write_bytes(tmp / EXTRA_FILE, extra_bytes)
            for name, data in (files or {}).items():
                _write_bytes(tmp / name, bytes(data))
            entries = {}
            for p in sorted(tmp.rglob("*")):
                if p.is_file():
                    rel = p.relative_to(tmp).as_posix()
                    entries[rel] = {"size": p.stat().st_size, "sha256": _sha256(p)}
            manifest = {"format": FORMAT, "version": VERSION, "step": int(step), "time": time.time(),
                        "files": entries}
            _write_bytes(tmp / MANIFEST_FILE, json.dumps(manifest, indent=1).encode())
            _fsync_dir(tmp)
            old = None
            if final.exists():  # re-saving the same step: move the old one aside, then swap
                old = self.root / f".old_{final.name}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
                os.rename(final, old)
            os.rename(tmp, final)
            _fsync_dir(self.root)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            prev = self.latest(verify=False)
            raise CheckpointError(
                f"could not write checkpoint {final}: {e.strerror or e} "
                f"({type(e).__name__}{', errno ' + str(e.errno) if e.errno else ''}); "
                f"previous checkpoint {'intact: ' + str(prev) if prev else 'none'}"
            ) from None
        except Exception:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._prune()
        return final

    def clean_stale(self) -> list[Path]:
        """Remove temp dirs left by saves that were killed midway (their process is gone); return them."""
        removed = []
        if not self.root.is_dir():
            return removed
        for p in self.root.iterdir():
            m = re.match(r"^\.(tmp|old)_step_\d+_(\d+_)?", p.name)
            if not m or not p.is_dir():
                continue
            pid = int(m.group(2)[:-1]) if m.group(2) else None
            if pid is not None and _pid_alive(pid):
                continue  # a live process (maybe this one) is writing it
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
        return removed

    def _prune(self) -> None:
        if not self.keep:
            return
        complete = [p for _, p in self._step_dirs() if (p / MANIFEST_FILE).is_file()]
        for p in complete[self.keep:]:
            shutil.rmtree(p, ignore_errors=True)

    # ------------------------------------------------------------------ find
    def _step_dirs(self) -> list[tuple[int, Path]]:
        """(step, path) of every step_* directory, newest first (unverified)."""
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            m = _STEP_RE.match(p.name)
            if m and p.is_dir():
                out.append((int(m.group(1)), p))
        return sorted(out, reverse=True)

    def _complete(self, verify: bool):
        """Complete checkpoints as (step, path), newest first, lazily; invalid ones are skipped with a warning."""
        for step, p in self._step_dirs():
            if verify:
                problem = verify_checkpoint(p)
                if problem:
                    warnings.warn(f"skipping checkpoint {p}: {problem}", CheckpointWarning, stacklevel=3)
                    continue
            elif not (p / MANIFEST_FILE).is_file():
                continue
            yield step, p

    def checkpoints(self, verify: bool = True) -> list[tuple[int, Path]]:
        """All complete checkpoints as (step, path), newest first; invalid ones are skipped with a warning."""
        return list(self._complete(verify))

    def latest(self, verify: bool = True) -> Path | None:
        """Newest complete checkpoint directory, or None. Partial/corrupt ones are skipped with a warning."""
        return next((p for _, p in self._complete(verify)), None)

    def latest_step(self) -> int | None:
        p = self.latest()
        return None if p is None else read_manifest(p)["step"]

    # ------------------------------------------------------------------ load
    def load(self, path: str | Path | None = None, map_location: str | torch.device = "cpu",
             verify: bool = True) -> tuple[dict[str, Tensor], Any, dict]:
        """(model tensors, optimizer state or None, extra dict) of `path` (default: latest())."""
        if path is None:
            path = self.latest()
            if path is None:
                raise CheckpointError(f"no complete checkpoint under {self.root}")
        return load_checkpoint(path, map_location=map_location, verify=verify)


# ----------------------------------------------------------------------------- free functions


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    mf = path / MANIFEST_FILE
    if not mf.is_file():
        raise CheckpointError(f"{path}: missing {MANIFEST_FILE} (partial checkpoint?)")
    try:
        manifest = json.loads(mf.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{mf}: unreadable manifest: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{mf}: not a {FORMAT} manifest")
    return manifest


def verify_checkpoint(path: str | Path, checksums: bool = True) -> str | None:
    """None if the checkpoint at `path` is complete and intact, else a description of the problem."""
    path = Path(path)
    try:
        manifest = read_manifest(path)
    except CheckpointError as e:
        return str(e)
    for name, info in manifest["files"].items():
        problem = file_problem(path, name, info if isinstance(info, dict) else {}, checksums)
        if problem:
            return problem
    return None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    verify: bool = True) -> tuple[dict[str, Tensor], Any, dict]:
    """Load one checkpoint directory -> (model tensors, optimizer state or None, extra dict)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    if verify:
        problem = verify_checkpoint(path)
        if problem:
            raise CheckpointError(f"checkpoint {path} is not usable: {problem}")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path / MODEL_FILE), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path / MODEL_FILE}: unreadable safetensors file: {e}") from None
    opt = safe_torch_load(path / OPTIM_FILE, map_location=map_location) if (path / OPTIM_FILE).is_file() else None
    extra = {}
    if (path / EXTRA_FILE).is_file():
        try:
            extra = json.loads((path / EXTRA_FILE).read_text())
        except ValueError as e:
            raise CheckpointError(f"{path / EXTRA_FILE}: invalid JSON: {e}") from None
    return tensors, opt, extra


def read_file(path: str | Path, name: str) -> bytes:
    """A caller-provided file stored with `save(..., files=...)`."""
    p = Path(path) / name
    if not p.is_file():
        raise CheckpointError(f"checkpoint {path} has no file {name}")
    return p.read_bytes()


# ----------------------------------------------------------------------------- RNG state


def _b64(t: Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def generator_state(gen: torch.Generator) -> str:
    """JSON-safe state of a torch.Generator (base64 of its byte state)."""
    return _b64(gen.get_state())


def set_generator_state(gen: torch.Generator, state: str) -> None:
    gen.set_state(_unb64(state))


def capture_rng_state() -> dict:
    """JSON-safe snapshot of the python, numpy, torch (CPU) and CUDA global RNGs."""
    v, py_state, gauss = random.getstate()
    np_state = np.random.get_state()
    out = {
        "python": [v, list(py_state), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return out


def restore_rng_state(state: dict) -> None:
    """Inverse of `capture_rng_state` (missing parts are left alone)."""
    if "python" in state:
        v, py_state, gauss = state["python"]
        random.setstate((v, tuple(py_state), gauss))
    if "numpy" in state:
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "torch" in state:
        torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        states = [_unb64(s) for s in state["cuda"]]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
        else:
            warnings.warn(f"checkpoint has CUDA RNG states for {len(states)} devices, this machine has "
                          f"{torch.cuda.device_count()}; CUDA RNG not restored", CheckpointWarning, stacklevel=2)


# ----------------------------------------------------------------------------- files added after a save


def tokenizer_files(tokenizer: Any) -> dict[str, bytes]:
    """name -> bytes of `tokenizer.save_pretrained` (so that a checkpoint carries its tokenizer)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="tok-") as d:
        tokenizer.save_pretrained(d)
        return {p.name: p.read_bytes() for p in sorted(Path(d).iterdir()) if p.is_file()}


def _write_manifest(path: Path, manifest: dict) -> None:
    """Replace `path/manifest.json` atomically (temp file, fsync, rename)."""
    tmp = path / f".{MANIFEST_FILE}.{os.getpid()}.tmp"
    _write_bytes(tmp, json.dumps(manifest, indent=1).encode())
    os.replace(tmp, path / MANIFEST_FILE)
    _fsync_dir(path)


def add_files(path: str | Path, files: Mapping[str, bytes]) -> None:
    """Add files to a complete checkpoint and list them in its manifest (written last, atomically: a
    crash in between leaves extra files the manifest does not list, and the checkpoint still verifies).
    Used by a driver that owns files (the tokenizer) the process that saved the weights does not have."""
    path = Path(path)
    manifest = read_manifest(path)
    try:
        for name, data in files.items():
            _check_file_name(name)
            _write_bytes(path / name, bytes(data))
            manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(bytes(data)).hexdigest()}
        _write_manifest(path, manifest)
    except OSError as e:
        raise CheckpointError(f"could not add {sorted(files)} to checkpoint {path}: {e.strerror or e}") from None


MODEL_DIR_FILES = (CONFIG_NAME, MODEL_FILE)


def publish_final(path: str | Path, final: str | Path, extra_names: list[str] | tuple[str, ...] = ()) -> Path:
    """Make `final` a model directory (config.json, model.safetensors, `extra_names` such as the
    tokenizer's files, and a manifest of just those) holding checkpoint `path`'s model. Files are
    hard-linked when the file system allows (no copy of the weights), else copied; the directory is
    built beside `final` and renamed into place, replacing an older one."""
    path, final = Path(path), Path(final)
    manifest = read_manifest(path)
    names = [n for n in (*MODEL_DIR_FILES, *extra_names) if n in manifest["files"]]
    missing = [n for n in MODEL_DIR_FILES if n not in names]
    if missing:
        raise CheckpointError(f"checkpoint {path} has no {', '.join(missing)}: not a model directory")
    tmp = final.parent / f".{final.name}.tmp_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    old = final.parent / f".{final.name}.old_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
        for n in names:
            try:
                os.link(path / n, tmp / n)
            except OSError:
                shutil.copy2(path / n, tmp / n)
        sub = {**manifest, "files": {n: manifest["files"][n] for n in names}}
        _write_bytes(tmp / MANIFEST_FILE, json.dumps(sub, indent=1).encode())
        _fsync_dir(tmp)
        if final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(final.parent)
    except OSError as e:
        raise CheckpointError(f"could not write {final} from {path}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return final
