"""Learner group: 2 gloo ranks under a private local Ray (CPU), against the single-rank learner."""

import time
from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import load_file

from model.errors import ConfigError
from rl.grpo import driver as grpo
from rl.train.checkpoint import CheckpointManager, load_checkpoint
from rl.train.metrics import read_metrics
from rl.grpo.config import load_grpo_config
from rl.grpo.learner import Learner, TrainBatch, split_by_tokens
from rl.grpo.learner_group import LearnerGroup, LearnerGroupError

TINY = {"preset": "tiny", "overrides": {"vocab_size": 384}, "max_seq_len": 64, "backend": "torch"}


def make_cfg(**learner):
    data = {"model": dict(TINY), "group_size": 2, "prompts_per_step": 2,
            "learner": {"lr": 1.0e-3, "micro_batch_tokens": 24, "minibatches": 2, **learner}}
    return load_grpo_config(data=data)


def make_batch(n=8, seed=0):
    """Samples of uneven lengths (5..16 tokens): the ranks get different micro-batch counts."""
    g = torch.Generator().manual_seed(seed)
    P = [torch.randint(10, 300, (3 + i % 3,), generator=g).tolist() for i in range(n)]
    C = [torch.randint(10, 300, (2 + (5 * i) % 9,), generator=g).tolist() for i in range(n)]
    lp = [[-5.0] * len(c) for c in C]
    mask = [[1.0] * len(c) for c in C]
    mask[3][0] = 0.0
    adv = [1.0, -0.5, 0.25, -0.75, 0.5, -1.0, 0.75, -0.25]
    return TrainBatch(P, C, lp, mask, adv[:n])


@pytest.fixture(scope="module")
def ray_local():
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_split_by_tokens_balances_and_covers():
    sizes = [16, 5, 9, 12, 7, 7, 3, 14]
    shares = split_by_tokens(sizes, 2)
    assert sorted(i for s in shares for i in s) == list(range(8))
    loads = [sum(sizes[i] for i in s) for s in shares]
    assert abs(loads[0] - loads[1]) <= max(sizes) and sum(loads) == sum(sizes)
    assert split_by_tokens(sizes, 2) == shares                      # the same on every rank
    assert split_by_tokens([4], 2) == [[0], []]


def test_rank_settings_are_validated():
    assert make_cfg(num_ranks=2).learner.ranks == 2
    gpu = make_cfg(num_gpus=4).learner
    assert gpu.ranks == 4 and gpu.gpus_per_rank == 1.0
    assert make_cfg(num_gpus=0.5).learner.ranks == 1                # a share of one GPU: one rank
    for bad, match in [({"num_gpus": 2, "num_ranks": 3}, "num_ranks"), ({"num_gpus": 0.5, "num_ranks": 2}, "share"),
                       ({"num_gpus": 1.5}, "whole GPUs"), ({"num_ranks": 2, "backend": "torch"}, "deepspeed")]:
        with pytest.raises(ConfigError, match=match):
            make_cfg(**bad)


def _params(ckpt: str) -> dict[str, torch.Tensor]:
    return load_file(f"{ckpt}/model.safetensors")


@pytest.mark.long
@pytest.mark.slow
def test_two_ranks_update_equals_one_rank(ray_local, tmp_path):
    batch = make_batch()
    one = Learner(make_cfg())
    m1 = one.update(batch)
    want = _params(one.save_checkpoint(str(tmp_path / "one"), 1, {"step": 1}, keep=1))

    group = LearnerGroup(make_cfg(num_ranks=2))
    try:
        # the same split as the ranks compute: each minibatch shares its tokens about equally
        assert [p["rank"] for p in ray.get([a.ping.remote() for a in group.actors])] == [0, 1]
        m2 = ray.get(group.update.remote(batch))
        got = _params(ray.get(group.save_checkpoint.remote(str(tmp_path / "two"), 1, {"step": 1}, 1)))
        # every sample of rank 1 non-finite: its micro-batches are left out, yet rank 0's still make a step
        # (a step is skipped only when no micro-batch of the whole minibatch, on any rank, is finite)
        bad = make_batch()
        for lo, hi in ((0, 4), (4, 8)):                      # the two minibatches of 8 samples
            share1 = split_by_tokens([bad.num_tokens(i) for i in range(lo, hi)], 2)[1]
            for j in share1:
                bad.advantages[lo + j] = float("nan")
        m3 = ray.get(group.update.remote(bad))
        assert m3["learn/skipped_steps"] == 0 and m3["learn/bad_micro_batches"] >= 2
        assert torch.isfinite(torch.tensor(m3["learn/grad_norm"])) and m3["learn/grad_norm"] > 0
        bad.advantages = [float("nan")] * len(bad)           # nothing finite anywhere: both steps skipped
        m4 = ray.get(group.update.remote(bad))
        assert m4["learn/skipped_steps"] == 2
        # a second group cannot be placed while this one holds 2 of the 3 CPUs: it fails after its timeout
        t0 = time.monotonic()
        with pytest.raises(ConfigError, match=r"could not be placed within 2 s.*CPU"):
            LearnerGroup(make_cfg(num_ranks=2, placement_timeout_s=2))
        assert time.monotonic() - t0 < 30
    finally:
        group.shutdown()
    # the summed gradient is the single-rank one (DeepSpeed's average over ranks compensated)
    assert m2["learn/grad_norm"] == pytest.approx(m1["learn/grad_norm"], rel=1e-4)
    for k in ("learn/pg_loss", "learn/entropy", "learn/mismatch_kl", "learn/mismatch_max_ratio", "learn/tokens"):
        assert m2[k] == pytest.approx(m1[k], rel=1e-4, abs=1e-7), k
    assert m2["learn/optimizer_steps"] == m1["learn/optimizer_steps"] == 2
    # Adam's first steps move a weight by about lr * sign(grad): summation-order noise can flip the sign of
    # a near-zero gradient, so a tiny share of elements may differ; a lost or doubled part fails everywhere
    assert want.keys() == got.keys()
    for n in want:
        off = ~torch.isclose(want[n], got[n], atol=1e-6, rtol=1e-5)
        assert off.float().mean().item() <= 2e-3, (n, off.sum().item(), off.numel())
    assert m1["learn/grad_norm"] > 0


def test_group_larger_than_the_cluster_fails_at_once(ray_local):
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"2 ranks x \{'CPU': 3.0\} need \{'CPU': 6.0\}.*has \{'CPU': 3.0\}"):
        LearnerGroup(make_cfg(num_ranks=2, num_cpus=3))
    assert time.monotonic() - t0 < 10
    assert not ray.util.placement_group_table() or all(
        p["state"] == "REMOVED" for p in ray.util.placement_group_table().values())


@pytest.mark.long
@pytest.mark.slow
def test_zero3_two_ranks_trains_and_round_trips_a_checkpoint(ray_local, tmp_path):
    batch = make_batch(seed=1)
    group = LearnerGroup(make_cfg(num_ranks=2, zero_stage=3))
    try:
        init = _params(ray.get(group.save_checkpoint.remote(str(tmp_path / "a"), 0, {"step": 0}, 5)))
        m = ray.get(group.update.remote(batch))
        ck1 = ray.get(group.save_checkpoint.remote(str(tmp_path / "a"), 1, {"step": 1}, 5))
        after1 = _params(ck1)
        m2 = ray.get(group.update.remote(batch))
        after2 = _params(ray.get(group.save_checkpoint.remote(str(tmp_path / "a"), 2, {"step": 2}, 5)))
        # back to step 1 on every rank (weights and each rank's optimizer partition): step 2 replays
        assert ray.get(group.load_checkpoint.remote(ck1))["step"] == 1
        ray.get(group.update.remote(batch))
        again = _params(ray.get(group.save_checkpoint.remote(str(tmp_path / "b"), 2, {"step": 2}, 5)))
        w = ray.get(group.export_weights.remote())          # gathers the sharded parameters
    finally:
        group.shutdown()
    for k in ("learn/pg_loss", "learn/grad_norm"):
        assert torch.isfinite(torch.tensor([m[k], m2[k]])).all(), k
    # sharded parameters, the same gradient: the first update's grad norm is the one-rank ZeRO-2 learner's
    assert m["learn/grad_norm"] == pytest.approx(Learner(make_cfg()).update(batch)["learn/grad_norm"], rel=1e-4)
    assert any(not torch.equal(init[n], after1[n]) for n in init)          # it trained
    assert all(torch.isfinite(t).all() for t in after2.values())
    # the replay matches to reduction-order noise (~1e-7); a step moves weights by ~lr = 1e-3, so a lost
    # optimizer state or master weight (Adam restarting) fails by orders of magnitude more
    for n in after2:
        assert (after2[n] - after1[n]).abs().max() > 1e-4, n
        assert torch.allclose(after2[n], again[n], atol=1e-6, rtol=0), n
    # the export gathers the full (unsharded) parameters: its dense ones are the checkpoint's
    assert w.version == 2 and w.dense
    for n, t in w.dense.items():
        assert torch.equal(t.float(), again[n]), n
    _, opt, _ = load_checkpoint(ck1)
    assert opt["kind"] == "ranks" and len(opt["ranks"]) == 2


@pytest.mark.long
@pytest.mark.slow
def test_a_rank_that_dies_stops_the_group_and_keeps_the_checkpoint(ray_local, tmp_path):
    batch = make_batch(seed=2)
    group = LearnerGroup(make_cfg(num_ranks=2))
    root = tmp_path / "ckpt"
    try:
        ray.get(group.update.remote(batch))
        path = ray.get(group.save_checkpoint.remote(str(root), 1, {"step": 1}, 2))
        running = group.update.remote(batch)
        ray.kill(group.actors[1], no_restart=True)             # rank 1 dies during (or just before) the update
        with pytest.raises(LearnerGroupError, match=r"learner rank [01] of 2 failed during update"):
            ray.get(running)
        # the group was stopped: rank 0 does not linger in a collective
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(group.actors[0].ping.remote(), timeout=30)
    finally:
        group.shutdown()
    assert CheckpointManager(root).latest() == tmp_path / "ckpt" / path.split("/")[-1]
    tensors, opt, extra = load_checkpoint(path)
    assert extra["step"] == 1 and len(opt["ranks"]) == 2 and tensors


@pytest.mark.long
@pytest.mark.slow
def test_grpo_runs_and_resumes_with_a_learner_group(ray_local, tmp_path):
    """The driver with learner.num_ranks 2: updates, syncs the workers from rank 0, checkpoints (every
    rank's optimizer partition) and resumes (every rank loads)."""
    config = str(Path(__file__).resolve().parents[1] / "configs" / "grpo_tiny.yaml")
    args = ["--config", config, "--output-dir", str(tmp_path / "run"), "checkpoint_every=1", "prompts_per_step=2",
            "group_size=4", "eval_every=0", "wandb=false", "reward_pool.num_workers=0", "learner.num_ranks=2"]
    assert grpo.main([*args, "steps=1"]) == 0
    assert grpo.main(["--resume", *args, "steps=2"]) == 0
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2]
    assert all(r["learn/optimizer_steps"] >= 1 and r["sync/bytes"] > 0 for r in recs)
    _, opt, extra = load_checkpoint(CheckpointManager(tmp_path / "run" / "checkpoints").latest())
    assert extra["step"] == 2 and extra["learner"]["version"] == 2 and len(opt["ranks"]) == 2


def test_a_failed_rank_ends_the_run_with_one_line_naming_the_checkpoint(tmp_path):
    from types import SimpleNamespace

    ckpt = CheckpointManager(tmp_path / "checkpoints")
    ckpt.save(3, {"w": torch.zeros(2)}, extra={"step": 3})
    driver = SimpleNamespace(step=4, ckpt=ckpt)
    e = LearnerGroupError("learner rank 1 of 2 failed during update (ActorDiedError: killed); the group was stopped")
    assert isinstance(e, grpo.RAY_LOST)                          # run() turns it into RunAborted
    msg = grpo.aborted_message(driver, e)
    assert "step 4: a learner rank failed" in msg and "rank 1 of 2 failed during update" in msg
    assert str(ckpt.latest()) in msg and "--resume" in msg and "\n" not in msg
