"""Metrics: one JSON object per logged step in `output_dir/metrics.jsonl`, optional wandb, console line.

    with MetricsWriter("runs/x", wandb=False, run_name="pretrain", config=cfg_dict) as mw:
        mw.log(step, loss=2.31, lr=1e-3, tokens_per_s=1234.0)

- metrics.jsonl: `{"step": 10, "time": 1700000000.1, "loss": 2.31, ...}`, flushed after every line, so
  runs compare and plot without wandb. Tensors become floats/lists; NaN/inf become the strings
  "nan"/"inf"/"-inf" (the file stays strict JSON).
- Resume: `MetricsWriter(..., resume_step=N)` keeps the records with step <= N and drops the ones a
  killed run wrote after its last checkpoint, so the file of a resumed run equals an uninterrupted one.
- wandb: off when `wandb` is False. When on, the mode is `offline` unless the user chose otherwise
  (a `mode` key in the dict, or WANDB_MODE in the environment, or WANDB_API_KEY set, which means an
  account was configured on purpose). Offline runs are written under `output_dir/wandb`.
- Console: a compact `step 10 | loss 2.310 | lr 1.00e-03 | ...` line per `log` call when
  `console=True` (stages that draw a tqdm bar pass console=False and use `format_metrics`).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from model.jsonl import read_jsonl


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item() if v.numel() == 1 else v.tolist()
    if hasattr(v, "item") and not isinstance(v, (list, dict, str)) and getattr(v, "ndim", 1) == 0:
        v = v.item()  # numpy scalars
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def format_metrics(metrics: dict[str, Any], keys: list[str] | None = None) -> str:
    """Compact human form: `loss 2.310 | lr 1.00e-03 | tok/s 1234`."""
    parts = []
    for k in keys or list(metrics):
        if k not in metrics:
            continue
        v = metrics[k]
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        name = {"tokens_per_s": "tok/s"}.get(k, k)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if isinstance(v, int):
            parts.append(f"{name} {v}")
        elif k == "lr" or (v != 0 and abs(v) < 1e-2):
            parts.append(f"{name} {v:.2e}")
        elif abs(v) >= 1000:
            parts.append(f"{name} {v:.0f}")
        else:
            parts.append(f"{name} {v:.4g}")
    return " | ".join(parts)


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a metrics.jsonl file (or of `path/metrics.jsonl` for a directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    return read_jsonl(path)


def wandb_mode(requested: str | None = None) -> str:
    """offline unless chosen: explicit request > WANDB_MODE > online when WANDB_API_KEY is set."""
    if requested:
        return requested
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class MetricsWriter:
    """Append-only metrics.jsonl writer with optional wandb and console output.

    output_dir: where metrics.jsonl (and wandb/ when enabled) go; created if missing.
    wandb: False, True, or a dict of extra `wandb.init` kwargs (e.g. {"mode": "offline", "entity": ...}).
    project, run_name, config: passed to wandb. Without resume_step, records are appended.
    resume_step: keep only records with step <= resume_step from an existing file (see module doc).
    """

    def __init__(self, output_dir: str | Path, wandb: bool | dict = False, project: str = "bitmamba-rl",
                 run_name: str | None = None, config: dict | None = None, console: bool = True,
                 resume_step: int | None = None, filename: str = "metrics.jsonl"):
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.output_dir / filename
        self.console = console
        if resume_step is not None and self.path.is_file():
            self._truncate_after(resume_step)
        self._f = open(self.path, "a", encoding="utf-8")
        self._t0 = time.time()
        self._run = None
        if wandb:
            self._run = self._init_wandb(wandb if isinstance(wandb, dict) else {}, project, run_name, config)

    def _truncate_after(self, step: int) -> None:
        kept = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                s = line.strip()
                if not s:
                    continue
                try:
                    rec = json.loads(s)
                except ValueError:
                    continue  # a torn last line from a killed run
                if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
                    kept.append(s)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def _init_wandb(self, opts: dict, project: str, run_name: str | None, config: dict | None):
        try:
            import wandb
        except ImportError:
            warnings.warn("wandb logging requested but wandb is not installed; logging to metrics.jsonl only",
                          stacklevel=3)
            return None
        opts = dict(opts)
        mode = wandb_mode(opts.pop("mode", None))
        (self.output_dir / "wandb").mkdir(exist_ok=True)
        kwargs = {"project": opts.pop("project", project), "name": opts.pop("name", run_name),
                  "config": config, "dir": str(self.output_dir), "mode": mode}
        kwargs.update(opts)
        return wandb.init(**kwargs)

    @property
    def wandb_run(self):
        return self._run

    def log(self, step: int, **metrics: Any) -> dict:
        """Append one record (step, time, metrics); flush; mirror to wandb and the console. Returns it."""
        rec = {"step": int(step), "time": round(time.time(), 3)}
        rec.update({k: _plain(v) for k, v in metrics.items()})
        self._f.write(json.dumps(rec, allow_nan=False) + "\n")
        self._f.flush()
        if self._run is not None:
            self._run.log({k: v for k, v in rec.items() if k not in ("step", "time")
                           and isinstance(v, (int, float)) and not isinstance(v, bool)}, step=int(step))
        if self.console:
            print(f"step {step} | {format_metrics(metrics)}", file=sys.stderr, flush=True)
        return rec

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()
        if self._run is not None:
            self._run.finish()
            self._run = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
