"""Generation actor group on local Ray: sharding, weight sync, a worker killed mid-rollout."""

import pytest
import ray
import torch

from rl.grpo.config import build_model, load_grpo_config
from rl.grpo.weight_sync import export_policy
from rl.grpo.workers import GenerationWorker, PromptJob, WorkerGroup, sample_id
from rollout.types import SamplingParams

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_local():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_dead_worker_is_restarted_resynced_and_only_its_prompts_regenerated(ray_local):
    cfg = load_grpo_config(data={"model": {"preset": "tiny", "overrides": {"vocab_size": 384},
                                           "backend": "torch"}})
    model = build_model(cfg.model)
    weights = export_policy(model, version=7)
    RemoteWorker = ray.remote(num_cpus=0.5)(GenerationWorker)
    group = WorkerGroup(RemoteWorker, {"model_config": model.config.to_dict(), "model_section": cfg.model,
                                       "slots": 8}, num_workers=2, max_restarts=2)
    try:
        assert group.load_weights([ray.put(weights)] * 2) == [7, 7]
        g = torch.Generator().manual_seed(0)
        jobs = [PromptJob(f"p{i}", torch.randint(10, 300, (4,), generator=g).tolist(), seed=100 + i)
                for i in range(6)]
        params = SamplingParams(max_new_tokens=5, temperature=1.0, n=3)
        clean, stats = group.generate(jobs, params)
        assert stats["workers/restarts"] == 0
        # the slowest worker's engine: 3 prompts x 3 samples in 8 slots, 5 tokens each -> at least 5 steps
        assert 5 <= stats["gen/engine_decode_steps"] <= 10
        assert 0 < stats["gen/engine_decode_s"] <= stats["gen/engine_wall_s"]

        old_pid = ray.get(group.actors[1].ping.remote())["pid"]
        ray.get(group.actors[1].crash_on_next_generate.remote())
        faulty, stats = group.generate(jobs, params)
        assert stats["workers/restarts"] == 1
        assert stats["workers/regenerated_prompts"] == 3          # worker 1's shard only (p1, p3, p5)
        info = group.ping()
        assert info[1]["pid"] != old_pid and info[1]["version"] == 7     # restarted and resynced
        ids = [sample_id(r.request_id, r.sample_index) for r in faulty]
        assert len(ids) == len(set(ids)) == 18                      # no duplicates, none missing
        assert sorted(ids) == sorted(f"p{i}/{k}" for i in range(6) for k in range(3))
        # seeds come from the job, so the regenerated samples equal the clean run's
        assert [r.token_ids for r in faulty] == [r.token_ids for r in clean]
    finally:
        group.shutdown()


def test_a_worker_that_cannot_map_the_shared_policy_loads_the_fallback_and_stays_off_ipc(ray_local):
    """A `SharedPolicy` for a GPU the worker is not on (here: a CPU worker) fails to map; the group loads
    the fallback reference instead, says so, and plans the object store for that worker from then on."""
    from rl.grpo.weight_sync import SharedPolicy, plan_sync

    cfg = load_grpo_config(data={"model": {"preset": "tiny", "overrides": {"vocab_size": 384},
                                           "backend": "torch"}})
    model = build_model(cfg.model)
    RemoteWorker = ray.remote(num_cpus=0.5)(GenerationWorker)
    group = WorkerGroup(RemoteWorker, {"model_config": model.config.to_dict(), "model_section": cfg.model,
                                       "slots": 4}, num_workers=2)
    try:
        bogus = SharedPolicy(version=5, gpu="GPU-not-here", handle=(), packed={}, dense={}, nbytes=0)
        asked = []
        ref = ray.put(export_policy(model, version=5))
        versions = group.load_weights([ref, bogus], fallback=lambda: asked.append(1) or ref)
        assert versions == [5, 5] and asked == [1]
        assert group.ipc_loads == [False, False]
        assert group.gpus() == [None, None]
        assert plan_sync("auto", "GPU-not-here", group.gpus()) == [False, False]
        with pytest.raises(ValueError, match="2 workers"):
            group.load_weights([ref])
        # without a fallback the error surfaces
        with pytest.raises(ray.exceptions.RayTaskError, match="GPU-not-here"):
            group.load_weights([ref, bogus])
    finally:
        group.shutdown()
