"""Asynchronous rollouts: the producer's staleness bound, drops, data position; GRPO end to end with
`max_staleness` on CPU with local Ray (those marked slow)."""

import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from model.errors import ConfigError
from rl.grpo.async_rollout import RolloutProducer
from rl.grpo.config import load_grpo_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "grpo_tiny.yaml")


@dataclass
class FakeBatch:
    start_pos: int
    index: int
    policy_version: int = -1


class FakeStream:
    """Batches of 4 prompts from a position counter; `block_from` makes batch i >= block_from wait for
    `release` after drawing its prompts (a batch caught mid-generation)."""

    def __init__(self, block_from: int | None = None):
        self.pos = 0
        self.made = 0
        self.block_from = block_from
        self.started = threading.Event()
        self.release = threading.Event()

    def make(self) -> FakeBatch:
        b = FakeBatch(self.pos, self.made)
        self.pos += 4
        self.made += 1
        if self.block_from is not None and b.index >= self.block_from:
            self.started.set()
            assert self.release.wait(30)
        return b


def producer(stream: FakeStream, k: int, batches: int, version: int = 0) -> RolloutProducer:
    return RolloutProducer(stream.make, lambda: stream.pos, k, version=version, batches=batches,
                           lock=threading.RLock()).start()


@pytest.mark.parametrize("k,expected", [(1, [0, 1, 1, 1, 1]), (2, [0, 1, 2, 2, 2])])
def test_producer_runs_ahead_up_to_the_bound_and_never_past_it(k, expected):
    stream = FakeStream()
    p = producer(stream, k, batches=5)
    seen = []
    for step in range(1, 6):
        assert p.wait_idle()                          # the producer has gone as far ahead as it may
        ro, staleness = p.take(learner_version=step - 1)
        assert ro.index == step - 1 and staleness == step - 1 - ro.policy_version
        seen.append(staleness)
        p.set_version(step)                           # the update of this step is synced
    p.close()
    assert seen == expected
    assert stream.made == 5 and p.dropped == 0        # never more batches than the run takes


def test_a_batch_staler_than_the_bound_is_dropped_counted_and_replaced():
    stream = FakeStream()
    p = producer(stream, 1, batches=3)
    assert p.wait_idle() and stream.made == 2         # two batches of version 0 wait in the queue
    p.set_version(3)                                  # the learner moved three versions on meanwhile
    ro, staleness = p.take(learner_version=3)
    assert p.dropped == 2 and ro.index == 2 and ro.policy_version == 3 and staleness == 0
    p.close()


def test_resume_position_is_the_oldest_batch_not_yet_trained():
    stream = FakeStream(block_from=2)
    p = producer(stream, 2, batches=4)
    assert stream.started.wait(30)                    # batches 0, 1 queued; batch 2 drew its prompts
    assert stream.pos == 12 and p.resume_position() == 0
    p.take(0)
    assert p.resume_position() == 4                   # batch 1 (queued)
    p.set_version(1)
    p.take(1)
    assert p.in_flight() == 1 and p.resume_position() == 8     # batch 2, still being generated
    stream.release.set()
    p.take(2)
    p.take(3)                                         # the last batch delivered: nothing in flight
    assert p.resume_position() == stream.pos == 16
    p.close()


def test_a_producer_error_is_raised_by_take_as_itself():
    def make():
        raise ConfigError("bad prompt file")

    p = RolloutProducer(make, lambda: 0, 1, version=0, batches=2, lock=threading.RLock()).start()
    with pytest.raises(ConfigError, match="bad prompt file"):
        p.take(0)
    p.close()


def test_max_staleness_config():
    assert load_grpo_config(CONFIG).staleness_bound == 0
    assert load_grpo_config(CONFIG, ["max_staleness=3"]).staleness_bound == 3
    assert load_grpo_config(CONFIG, ["one_step_off_policy=true"]).staleness_bound == 1
    assert load_grpo_config(CONFIG, ["one_step_off_policy=true", "max_staleness=1"]).staleness_bound == 1
    with pytest.raises(ConfigError, match="one_step_off_policy: true means max_staleness 1"):
        load_grpo_config(CONFIG, ["one_step_off_policy=true", "max_staleness=2"])
    with pytest.raises(ConfigError, match="max_staleness: must be >= 0"):
        load_grpo_config(CONFIG, ["max_staleness=-1"])


# ------------------------------------------------------------------------------------------------
# End to end (local Ray)

FAST = ["prompts_per_step=4", "group_size=4", "eval_every=0", "task.eval_size=8", "wandb=false",
        "reward_pool.num_workers=1", "learner.lr=1.0e-2"]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def length_reward(tmp_path) -> str:
    rew = tmp_path / "lenreward.py"        # varies within every group, so every update moves the policy
    rew.write_text("def length(prompt, completion, **fields):\n    return float(len(completion))\n")
    return f"rewards=[{{spec: '{rew}:length'}}]"


def grpo_run(out, *args):
    from rl.grpo import driver as grpo
    from rl.train.metrics import read_metrics

    flags = [a for a in args if a.startswith("--")]
    overrides = [a for a in args if not a.startswith("--")]
    assert grpo.main(["--config", CONFIG, "--output-dir", str(out), *flags, *FAST, *overrides]) == 0
    return read_metrics(out / "metrics.jsonl")


@pytest.mark.slow
def test_max_staleness_zero_is_on_policy(ray_local, tmp_path):
    recs = grpo_run(tmp_path / "onpolicy", "steps=3", length_reward(tmp_path))
    for r in recs:      # every batch from the weights the learner starts the step with, despite lr 1e-2
        assert r["rollout/staleness"] == 0 and r["rollout/policy_version"] == r["step"] - 1
        assert r["learn/mismatch_max_ratio"] < 1.01
    assert [r["data/position"] for r in recs] == [4, 8, 12]


@pytest.mark.long
@pytest.mark.slow
def test_max_staleness_runs_ahead_within_the_bound_and_resumes_the_same_prompts(ray_local, tmp_path):
    from rl.train.checkpoint import CheckpointManager, load_checkpoint

    rew = length_reward(tmp_path)
    full = grpo_run(tmp_path / "full", "steps=4", "checkpoint_every=2", "max_staleness=2", rew)
    assert [r["step"] for r in full] == [1, 2, 3, 4]
    for r in full:
        assert r["rollout/staleness"] == r["step"] - 1 - r["rollout/policy_version"] <= 2
        assert r["rollout/dropped_stale"] == 0
    assert full[-1]["rollout/staleness_max"] >= 1    # the producer did run ahead of the learner
    assert max(r["learn/mismatch_kl"] for r in full if r["rollout/staleness"] > 0) > \
        100 * max(full[0]["learn/mismatch_kl"], 1e-9)  # stale batches: the TIS path sees the lag
    assert [r["rollout/start_position"] for r in full] == [0, 4, 8, 12]

    # the run as if killed after its step-2 checkpoint: batch 3 (at least) had been drawn ahead of the
    # learner by then, yet the checkpoint saves its start, so the resumed run trains the same prompts
    run = tmp_path / "full"
    ckpts = CheckpointManager(run / "checkpoints")
    assert [s for s, _ in ckpts.checkpoints()] == [4, 2]
    shutil.rmtree(ckpts.checkpoints()[0][1])
    shutil.rmtree(run / "final")
    _, _, extra = load_checkpoint(ckpts.latest())
    assert extra["step"] == 2 and extra["data_pos"] == 8
    again = grpo_run(run, "--resume", "steps=4", "checkpoint_every=2", "max_staleness=2", rew)
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    for a, b in zip(full[2:], again[2:]):
        assert a["rollout/start_position"] == b["rollout/start_position"]
        assert a["data/position"] == b["data/position"]
    assert again[2]["rollout/policy_version"] == 2 and again[2]["rollout/staleness"] == 0


@pytest.mark.long
@pytest.mark.slow
def test_one_step_off_policy_is_max_staleness_one(ray_local, tmp_path):
    recs = grpo_run(tmp_path / "off", "steps=3", "one_step_off_policy=true", length_reward(tmp_path))
    # step 1 is on-policy; later batches are generated while the previous update runs (staleness 1; 0 only
    # if an update and its sync finished before the producer started the next batch)
    assert recs[0]["rollout/staleness"] == 0 and max(r["rollout/staleness"] for r in recs[1:]) == 1
    for r in recs[1:]:
        assert r["rollout/policy_version"] == r["step"] - 1 - r["rollout/staleness"]
        if r["rollout/staleness"]:       # TIS sees the lag of a stale batch
            assert r["learn/mismatch_kl"] > 100 * max(recs[0]["learn/mismatch_kl"], 1e-9)
    assert recs[2]["data/position"] == 12
