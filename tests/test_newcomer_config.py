"""Configs a newcomer writes from the docs load: a GRPO task given by `task.path` alone; SFT from a
pretraining run's `final/` (`model.init_from`) with the shipped config's `model.overrides`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model.errors import ConfigError
from rl.grpo.driver import preflight
from rl.grpo.config import load_grpo_config

ROOT = Path(__file__).resolve().parents[1]
GRPO_TINY = str(ROOT / "configs" / "grpo_tiny.yaml")
MODEL = {"preset": "tiny", "overrides": {"vocab_size": 384}, "max_seq_len": 64}


def _jsonl(tmp_path: Path) -> Path:
    f = tmp_path / "prompts.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"{a}+1=", "answer": str(a + 1)}) + "\n" for a in range(8)))
    return f


def test_grpo_task_by_path_alone(tmp_path):
    f = _jsonl(tmp_path)
    cfg = load_grpo_config(data={"model": MODEL, "task": {"path": str(f), "eval_size": 2}})
    assert cfg.task.name is None and cfg.task.path == str(f)
    task, _ = preflight(cfg)
    assert task.row("train", 0)["prompt"].endswith("+1=")


def test_grpo_task_defaults_to_arithmetic_and_refuses_both():
    assert load_grpo_config(data={"model": MODEL}).task.name == "arithmetic"
    with pytest.raises(ConfigError, match="not both"):
        load_grpo_config(GRPO_TINY, ["task.path=x.jsonl"])        # the file names a task: both given


def test_grpo_shipped_config_switches_to_a_file_with_name_null(tmp_path):
    f = _jsonl(tmp_path)
    cfg = load_grpo_config(GRPO_TINY, ["task.name=null", f"task.path={f}", "task.kwargs={}"])
    assert cfg.task.path == str(f) and cfg.task.name is None


def test_sft_init_from_a_pretraining_final_with_the_shipped_overrides(tmp_path):
    """docs/training.md: `bitmamba sft --config configs/sft_tiny.yaml model.init_from=runs/pretrain_tiny/final`
    (the shipped config keeps `model.overrides: {vocab_size: 384}`, which the checkpoint agrees with)."""
    from model.config import BitMambaConfig
    from model.lm import BitMambaLM
    from model.typed import load_config
    from rl.train.sft import SFTConfig
    from rl.train.stage import build_model_from_spec

    final = tmp_path / "final"
    BitMambaLM(BitMambaConfig.preset("tiny", vocab_size=384)).save_pretrained(final)
    cfg = load_config(SFTConfig, ROOT / "configs" / "sft_tiny.yaml", [f"model.init_from={final}"])
    model = build_model_from_spec(cfg.model, "configs/sft_tiny.yaml")
    assert model.config.vocab_size == 384 and model.training
    cfg = load_config(SFTConfig, ROOT / "configs" / "sft_tiny.yaml",
                      [f"model.init_from={final}", "model.overrides={vocab_size: 512}"])
    with pytest.raises(ConfigError, match=r"model\.overrides\.vocab_size: 512 differs from 384"):
        build_model_from_spec(cfg.model, "configs/sft_tiny.yaml")


def test_distill_missing_teacher_says_how_to_make_it(tmp_path, capsys):
    """The shipped distill config names a teacher that a fresh clone does not have yet."""
    from rl.cli import main as cli

    rc = cli(["distill", "--config", str(ROOT / "configs" / "distill_tiny.yaml"), "--output-dir",
              str(tmp_path / "d"), f"teacher.path={tmp_path / 'nope' / 'final'}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: teacher.path") and len(err.splitlines()) == 1
    assert "bitmamba pretrain --config configs/pretrain_tiny_fp.yaml" in err
    assert (ROOT / "configs" / "pretrain_tiny_fp.yaml").is_file()   # the recipe it gives exists
    assert not (tmp_path / "d").exists()                            # nothing written
