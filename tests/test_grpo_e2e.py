"""GRPO end to end on CPU with local Ray: metrics per step, eval, checkpoints, exact resume (the demo: test_demo.py)."""

import json
from pathlib import Path

import pytest
import ray

from rl.grpo import driver as grpo
from rl.train.checkpoint import CheckpointManager
from rl.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "grpo_tiny.yaml")
FAST = ["prompts_per_step=4", "group_size=4", "eval_every=2", "task.eval_size=8", "wandb=false",
        "reward_pool.num_workers=1"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_local():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_grpo_runs_logs_checkpoints_and_resumes_exactly(ray_local, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    assert grpo.main(["--config", CONFIG, "--output-dir", str(full), "steps=4", "checkpoint_every=2", *FAST]) == 0
    recs = read_metrics(full / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    for r in recs:
        assert 0.0 <= r["reward_mean"] <= 1.0
        for k in ("learn/pg_loss", "learn/grad_norm", "learn/mismatch_kl", "sync/bytes", "time/generate",
                  "frac_zero_std_groups", "response_len_mean"):
            assert k in r, k
        # where the sync goes: the slowest worker's unpack into its model and its backend re-pack
        assert 0.0 < r["sync/worker_load_s"] + r["sync/worker_refresh_s"] <= r["time/sync"]
        assert r["learn/mismatch_max_ratio"] < 1.01        # worker and learner agree on the policy
    assert "eval/pass@1" in recs[1] and "eval/pass@4" in recs[3]
    ckpts = CheckpointManager(full / "checkpoints").checkpoints()
    assert [s for s, _ in ckpts] == [4, 2]
    assert (ckpts[0][1] / "config.json").is_file()

    # interrupted after step 2, resumed: steps 3 and 4 replay the uninterrupted run exactly
    assert grpo.main(["--config", CONFIG, "--output-dir", str(part), "steps=2", "checkpoint_every=2", *FAST]) == 0
    assert grpo.main(["--config", CONFIG, "--output-dir", str(part), "--resume", "steps=4",
                      "checkpoint_every=2", *FAST]) == 0
    again = read_metrics(part / "metrics.jsonl")
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    for a, b in zip(recs[2:], again[2:]):
        for k in ("reward_mean", "learn/pg_loss", "response_len_mean", "data/position"):
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9), k


def test_too_long_prompts_are_dropped_and_counted(ray_local, tmp_path):
    data = tmp_path / "rows.jsonl"
    rows = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "9" * 200 + "+1=", "answer": "0"},
            {"prompt": "2+2=", "answer": "4"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    assert grpo.main(["--config", CONFIG, "--output-dir", str(out), "steps=1", "task.name=null",
                      "task.kwargs={}", f"task.path={data}", "prompts_per_step=2", "group_size=2", "eval_every=0",
                      "wandb=false"]) == 0
    rec = read_metrics(out / "metrics.jsonl")[0]
    assert rec["data/prompts_dropped"] == 1 and rec["data/position"] == 3


@pytest.mark.long
def test_one_step_off_policy_generates_with_the_previous_weights(ray_local, tmp_path):
    out = tmp_path / "offpolicy"
    rew = tmp_path / "lenreward.py"        # varies within every group, so every update moves the policy
    rew.write_text("def length(prompt, completion, **fields):\n    return float(len(completion))\n")
    assert grpo.main(["--config", CONFIG, "--output-dir", str(out), "steps=3", "one_step_off_policy=true",
                      "learner.lr=1.0e-2", f"rewards=[{{spec: '{rew}:length'}}]", *FAST]) == 0
    recs = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3]
    # step 1 is on-policy; steps 2-3 were sampled before the previous update landed: the learner's
    # log-probs differ from the rollout's, and truncated IS sees it
    assert recs[0]["learn/mismatch_max_ratio"] < 1.01
    assert max(r["learn/mismatch_kl"] for r in recs[1:]) > 100 * max(recs[0]["learn/mismatch_kl"], 1e-9)
    assert recs[2]["data/position"] == 12


def test_dynamic_sampling_drops_flat_groups_and_draws_more(ray_local, tmp_path):
    # the untrained tiny model never solves a sum: every group is flat, all rounds are used, no update
    out = tmp_path / "flat"
    assert grpo.main(["--config", CONFIG, "--output-dir", str(out), "steps=1", "algo.dynamic_sampling=true",
                      "algo.max_resample_rounds=1", "eval_every=0", *FAST[:2], "wandb=false"]) == 0
    rec = read_metrics(out / "metrics.jsonl")[0]
    assert rec["rollout/rounds"] == 2 and rec["rollout/groups_kept"] == 0
    # round 1 draws prompts_per_step (4); the refill, with no informative group seen, oversamples 4x: 16
    assert rec["learn/skipped"] == 1.0 and rec["data/position"] == 4 + 16
    assert rec["frac_zero_std_groups"] == 1.0


def test_tokenizer_larger_than_model_vocab_is_a_clear_error(ray_local, tmp_path):
    from model.errors import ConfigError

    with pytest.raises(ConfigError, match="vocab_size is 256"):
        grpo.main(["--config", CONFIG, "--output-dir", str(tmp_path / "v"), "model.overrides={vocab_size: 256}",
                   "wandb=false"])
    assert ray.is_initialized()          # the test's cluster is left as found; the driver's actors are gone
