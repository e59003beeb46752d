"""One run per output directory: a reused directory is continued (`--resume`), started over
(`--overwrite`), or refused; two runs' files are never mixed.

    check_run_dir(out, GRPO_ENTRIES, resume=False, overwrite=False)   # before anything starts: may refuse
    clear_run(out, GRPO_ENTRIES)                                       # --overwrite, once inputs are checked

A run's files are the entries a stage writes (`metrics.jsonl`, `checkpoints/`, `final/`, `wandb/`, ...);
`--overwrite` deletes exactly those and leaves anything else in the directory alone, so pointing
`--output-dir` at a directory holding other files never deletes them. Both functions write nothing
unless asked to clear.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from model.errors import BitMambaError, ConfigError


class RunDirError(BitMambaError):
    """The output directory already holds a run that this invocation would mix with or destroy."""


GRPO_ENTRIES = ("metrics.jsonl", "checkpoints", "final", "wandb")
DEMO_ENTRIES = GRPO_ENTRIES + ("warmstart", "reward.png")
STAGE_ENTRIES = ("metrics.jsonl", "checkpoints", "final", "wandb", "config.resolved.yaml")
RESOLVED_CONFIG = "config.resolved.yaml"

# keys whose change does not make a supervised run a different run (how long, how it is shown)
RESUMABLE_CHANGES = ("output_dir", "train.resume", "train.overwrite", "train.stop_after", "train.max_steps",
                     "train.wandb", "train.progress", "train.log_every")


def existing_entries(out: str | Path, entries: Iterable[str]) -> list[str]:
    """The run entries present in `out` (empty when `out` is missing or holds no run)."""
    out = Path(out)
    return [e for e in entries if (out / e).exists()]


def check_run_dir(out: str | Path, entries: Iterable[str], resume: bool, overwrite: bool,
                  resume_hint: str | None = "--resume") -> None:
    """Refuse (RunDirError) when `out` holds a run and neither `resume` nor `overwrite` says what to do
    with it. `resume_hint` is the option that continues a run (None where there is none, e.g. the demo)."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other (continue the run, or delete it)")
    found = existing_entries(out, entries)
    if not found or resume or overwrite:
        return
    how = (f"pass {resume_hint} to continue it, " if resume_hint else "pass ") + \
        "--overwrite to delete it and start over, or choose another --output-dir"
    raise RunDirError(f"{out} already holds a run ({', '.join(found)}): {how}")


def clear_run(out: str | Path, entries: Iterable[str]) -> list[str]:
    """Delete the run entries of `out` (only those); returns what was removed."""
    out = Path(out)
    removed = []
    for e in existing_entries(out, entries):
        p = out / e
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
        removed.append(e)
    return removed


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def config_changes(old: dict, new: dict, ignore: Iterable[str] = RESUMABLE_CHANGES) -> list[str]:
    """Dotted keys whose values differ between two resolved configs (ignoring `ignore`)."""
    a, b = _flatten(old), _flatten(new)
    skip = set(ignore)
    return sorted(k for k in set(a) | set(b) if k not in skip and a.get(k) != b.get(k))


def read_resolved_config(out: str | Path) -> dict | None:
    """The `config.resolved.yaml` a supervised stage wrote into `out`, or None."""
    path = Path(out) / RESOLVED_CONFIG
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise RunDirError(f"{path}: unreadable ({e}); --overwrite to start over") from None
    return data if isinstance(data, dict) else None


def check_same_run(out: str | Path, run_config: dict) -> None:
    """A supervised stage continuing the run in `out` must be the same run: refuse when the stored
    resolved config differs in anything but length and display (`RESUMABLE_CHANGES`)."""
    old = read_resolved_config(out)
    if old is None or not existing_entries(out, ("checkpoints", "final", "metrics.jsonl")):
        return
    changed = config_changes(old, run_config)
    if changed:
        shown = ", ".join(changed[:6]) + (f" (+{len(changed) - 6} more)" if len(changed) > 6 else "")
        raise RunDirError(f"{out} holds a run with another config ({Path(out) / RESOLVED_CONFIG} differs in "
                          f"{shown}): --overwrite to delete it and start over, or choose another --output-dir")
