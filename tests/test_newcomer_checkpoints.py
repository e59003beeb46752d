"""Every checkpoint a stage writes is loadable by every command that takes one: GRPO step checkpoints
and supervised step checkpoints carry their tokenizer, GRPO publishes `final/` (generate, eval --gen,
info all run on them); GRPO --overwrite starts over without mixing the old run's files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray

from rl.grpo import driver as grpo
from rl.train import pretrain
from rl.train.checkpoint import CheckpointManager, publish_final, verify_checkpoint
from rl.cli import main as cli
from rl.train.metrics import read_metrics
from rollout.tokenizer import has_tokenizer

ROOT = Path(__file__).resolve().parents[1]
GRPO_TINY = str(ROOT / "configs" / "grpo_tiny.yaml")
PRETRAIN_TINY = str(ROOT / "configs" / "pretrain_tiny.yaml")


def _commands_load(model_dir: Path, tmp_path: Path, capsys) -> None:
    assert cli(["info", str(model_dir)]) == 0
    assert cli(["generate", str(model_dir), "--prompt", "1+2=", "--max-new-tokens", "3", "--device", "cpu"]) == 0
    data = tmp_path / "gen.jsonl"
    data.write_text(json.dumps({"prompt": "1+2=", "answer": "3"}) + "\n")
    assert cli(["eval", str(model_dir), "--gen", str(data), "--reward", "math", "--samples", "2",
                "--max-new-tokens", "3", "--device", "cpu", "--reward-workers", "0"]) == 0, capsys.readouterr().err


def test_supervised_step_checkpoints_carry_the_tokenizer(tmp_path, capsys):
    out = tmp_path / "pre"
    assert pretrain.main(["--config", PRETRAIN_TINY, "--output-dir", str(out), "train.max_steps=2",
                          "train.save_every=1", "train.batch_size=2", "train.progress=false",
                          "data.seq_len=32"]) == 0
    step1 = out / "checkpoints" / "step_00000001"
    assert has_tokenizer(step1) and verify_checkpoint(step1) is None
    _commands_load(step1, tmp_path, capsys)


def test_publish_final_is_a_verified_model_dir_without_optimizer(tmp_path):
    out = tmp_path / "pre"
    assert pretrain.main(["--config", PRETRAIN_TINY, "--output-dir", str(out), "train.max_steps=1",
                          "train.batch_size=2", "train.progress=false", "data.seq_len=32"]) == 0
    ck = CheckpointManager(out / "checkpoints").latest()
    final = publish_final(ck, tmp_path / "final", ["tokenizer.json"])
    assert sorted(p.name for p in final.iterdir()) == ["config.json", "manifest.json", "model.safetensors",
                                                       "tokenizer.json"]
    assert verify_checkpoint(final) is None
    publish_final(ck, tmp_path / "final")                               # replaces an older one
    assert not (final / "tokenizer.json").exists()


@pytest.mark.slow
def test_grpo_checkpoints_and_final_load_everywhere_and_overwrite_starts_over(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints" / "step_00000009").mkdir(parents=True)      # an older run in the same directory
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert grpo.main(["--config", GRPO_TINY, "--output-dir", str(out), "--overwrite", "steps=2",
                          "checkpoint_every=1", "prompts_per_step=2", "group_size=2", "eval_every=0",
                          "wandb=false", "reward_pool.num_workers=0"]) == 0
    finally:
        ray.shutdown()
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    steps = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert steps == ["step_00000001", "step_00000002"]
    for name in steps:
        assert has_tokenizer(out / "checkpoints" / name) and verify_checkpoint(out / "checkpoints" / name) is None
    final = out / "final"
    assert has_tokenizer(final) and verify_checkpoint(final) is None
    _commands_load(final, tmp_path, capsys)
    _commands_load(out / "checkpoints" / "step_00000001", tmp_path, capsys)
