"""A dead learner (or a lost Ray cluster) ends a GRPO run with one `error:` line naming the last
checkpoint, which stays intact and resumable."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray

from rl.grpo import driver as grpo
from rl.train.checkpoint import verify_checkpoint
from rl.args import run_main

ROOT = Path(__file__).resolve().parents[1]
GRPO_TINY = str(ROOT / "configs" / "grpo_tiny.yaml")


class _Driver(grpo.Driver):
    """Kills its learner right after the first checkpoint (as the OOM killer would)."""

    def checkpoint(self):
        path = super().checkpoint()
        ray.kill(self.learner, no_restart=True)
        return path


@pytest.mark.long
@pytest.mark.slow
def test_dead_learner_ends_the_run_with_one_line_and_the_checkpoint_intact(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(grpo, "Driver", _Driver)
    out = tmp_path / "run"
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        rc = run_main(grpo.main, ["--config", GRPO_TINY, "--output-dir", str(out), "steps=3", "checkpoint_every=1",
                                  "prompts_per_step=2", "group_size=2", "eval_every=0", "wandb=false",
                                  "reward_pool.num_workers=0"])
    finally:
        ray.shutdown()
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(err) == 1, err
    ck = out / "checkpoints" / "step_00000001"
    assert "learner actor died" in err[0] and str(ck) in err[0] and "--resume" in err[0]
    assert verify_checkpoint(ck) is None


def test_aborted_message_without_checkpoint():
    class D:
        step = 0
        ckpt = None

    msg = grpo.aborted_message(D(), ray.exceptions.RaySystemError("GCS is gone"))
    assert msg.startswith("GRPO stopped at step 0: the Ray cluster went away (RaySystemError")
    assert "no checkpoint was written yet" in msg
