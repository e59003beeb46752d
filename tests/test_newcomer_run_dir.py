"""A reused output directory is continued (--resume), started over (--overwrite) or refused; two runs'
files are never mixed (GRPO, the demo, the supervised stages)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model.errors import ConfigError
from rl import demo
from rl.grpo import driver as grpo
from rl.train import pretrain
from rl.train.metrics import read_metrics
from rl.train.run_dir import (GRPO_ENTRIES, RunDirError, check_run_dir, clear_run, config_changes)

ROOT = Path(__file__).resolve().parents[1]
GRPO_TINY = str(ROOT / "configs" / "grpo_tiny.yaml")
PRETRAIN_TINY = str(ROOT / "configs" / "pretrain_tiny.yaml")
PRE_ARGS = ["train.max_steps=2", "train.log_every=1", "train.batch_size=2", "train.progress=false",
            "data.seq_len=32"]


def _old_run(out: Path) -> str:
    (out / "checkpoints" / "step_00000003").mkdir(parents=True)
    rows = "".join(json.dumps({"step": s, "reward_mean": 0.5}) + "\n" for s in (1, 2, 3))
    (out / "metrics.jsonl").write_text(rows)
    (out / "notes.txt").write_text("mine")
    return rows


class _NoRay(Exception):
    pass


def _no_ray(cfg):
    raise _NoRay


def test_grpo_refuses_a_reused_output_dir_before_starting_anything(tmp_path, monkeypatch):
    rows = _old_run(tmp_path)
    monkeypatch.setattr(grpo, "connect_ray", _no_ray)
    with pytest.raises(RunDirError) as e:
        grpo.main(["--config", GRPO_TINY, "--output-dir", str(tmp_path), "wandb=false"])
    msg = str(e.value)
    assert str(tmp_path) in msg and "--resume" in msg and "--overwrite" in msg and "metrics.jsonl" in msg
    assert (tmp_path / "metrics.jsonl").read_text() == rows          # the old run is untouched
    for flag in ("--resume", "--overwrite"):                          # either choice gets past the check
        with pytest.raises(_NoRay):
            grpo.main(["--config", GRPO_TINY, "--output-dir", str(tmp_path), flag, "wandb=false"])
    assert (tmp_path / "metrics.jsonl").read_text() == rows          # nothing deleted before Ray is up
    with pytest.raises(ConfigError, match="exclude each other"):
        grpo.main(["--config", GRPO_TINY, "--output-dir", str(tmp_path), "--resume", "--overwrite"])


def test_grpo_fresh_dir_and_dirs_without_a_run_are_fine(tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("mine")
    monkeypatch.setattr(grpo, "connect_ray", _no_ray)
    with pytest.raises(_NoRay):
        grpo.main(["--config", GRPO_TINY, "--output-dir", str(tmp_path), "wandb=false"])


def test_clear_run_deletes_only_the_runs_files(tmp_path):
    _old_run(tmp_path)
    assert sorted(clear_run(tmp_path, GRPO_ENTRIES)) == ["checkpoints", "metrics.jsonl"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    check_run_dir(tmp_path, GRPO_ENTRIES, resume=False, overwrite=False)


def test_demo_refuses_a_reused_dir_before_the_warm_start_and_overwrite_clears_it(tmp_path, monkeypatch):
    _old_run(tmp_path)
    (tmp_path / "warmstart").mkdir()
    (tmp_path / "reward.png").write_bytes(b"png")
    calls = []

    def warm_start(cfg, out, *args, **kwargs):
        calls.append(sorted(p.name for p in Path(out).iterdir()))
        raise _NoRay

    monkeypatch.setattr(demo, "warm_start", warm_start)
    with pytest.raises(RunDirError, match="--overwrite"):
        demo.main(["--output-dir", str(tmp_path), "wandb=false"])
    assert calls == []
    with pytest.raises(_NoRay):
        demo.main(["--output-dir", str(tmp_path), "--overwrite", "wandb=false"])
    assert calls == [["notes.txt"]]                                   # the old run is gone, other files stay


def test_config_changes_ignore_length_and_display_only():
    old = {"output_dir": "a", "train": {"max_steps": 10, "progress": True}, "optim": {"lr": 1e-3}}
    assert config_changes(old, {**old, "output_dir": "b", "train": {"max_steps": 20, "progress": False}}) == []
    assert config_changes(old, {**old, "optim": {"lr": 2e-3}}) == ["optim.lr"]


def test_pretrain_refuses_another_config_in_the_same_dir_and_overwrite_starts_over(tmp_path):
    out = str(tmp_path / "run")
    assert pretrain.main(["--config", PRETRAIN_TINY, "--output-dir", out, *PRE_ARGS]) == 0
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    # the same run again: continued (nothing to do), not mixed
    assert pretrain.main(["--config", PRETRAIN_TINY, "--output-dir", out, *PRE_ARGS]) == 0
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    with pytest.raises(RunDirError, match=r"optim\.lr.*--overwrite"):
        pretrain.main(["--config", PRETRAIN_TINY, "--output-dir", out, *PRE_ARGS, "optim.lr=1e-2"])
    with pytest.raises(Exception, match="--overwrite"):
        pretrain.main(["--config", PRETRAIN_TINY, "--output-dir", out, *PRE_ARGS, "--no-resume"])
    (Path(out) / "notes.txt").write_text("mine")
    assert pretrain.main(["--config", PRETRAIN_TINY, "--output-dir", out, *PRE_ARGS, "optim.lr=1e-2",
                          "train.max_steps=1", "--overwrite"]) == 0
    assert [r["step"] for r in read_metrics(out)] == [1]
    assert [p.name for p in (Path(out) / "checkpoints").iterdir()] == ["step_00000001"]
    assert (Path(out) / "notes.txt").read_text() == "mine"
