"""Faults survived, on one local Ray cluster for the module.

Covered elsewhere (not repeated here; see README.md): a worker that exits mid-generate
(tests/test_grpo_workers.py), in-process resume (tests/test_grpo_e2e.py), partial / corrupt /
unwritable / disk-full checkpoints at the manager level (tests/test_checkpoint.py), SIGKILL + resume
of pretraining (tests/test_stages_resume.py), NaN steps in pretraining (tests/test_stages_pretrain.py).

Faults inside the learner actor are injected by a `worker_process_setup_hook` that every Ray worker
process of this module's cluster runs: it wraps `rl.train.checkpoint._write_bytes` (ENOSPC while the
DISK_FULL flag file exists) and `rl.grpo.algo.policy_loss` (a NaN loss while NAN_LOSS exists).
"""

import errno
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
import ray
import torch

from model.errors import CheckpointError
from rl.grpo import driver as grpo
from rl.train.checkpoint import CheckpointManager, CheckpointWarning
from rl.grpo.config import build_model, load_grpo_config
from rl.train.metrics import read_metrics
from rl.grpo.weight_sync import export_policy
from rl.grpo.workers import GenerationWorker, PromptJob, WorkerGroup, sample_id
from rollout.types import SamplingParams

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "grpo_tiny.yaml")
FAST = ["prompts_per_step=4", "group_size=4", "eval_every=0", "wandb=false", "reward_pool.num_workers=1",
        "learner.lr=1.0e-2"]
FLAGS = Path(tempfile.gettempdir()) / f"bitmamba-reliability-{os.getpid()}"

pytestmark = pytest.mark.slow


def _fault_hook(flags=str(FLAGS)):
    import math
    from pathlib import Path as P

    import rl.grpo.algo as algo
    import rl.train.checkpoint as ck

    real_write, real_loss = ck._write_bytes, algo.policy_loss

    def write(path, data):
        if (P(flags) / "DISK_FULL").exists():
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write(path, data)

    def loss(*a, **k):
        out, m = real_loss(*a, **k)
        return (out * math.nan, m) if (P(flags) / "NAN_LOSS").exists() else (out, m)

    ck._write_bytes, algo.policy_loss = write, loss


@pytest.fixture(scope="module")
def ray_local():
    FLAGS.mkdir(parents=True, exist_ok=True)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": _fault_hook})
    yield
    ray.shutdown()
    for f in FLAGS.iterdir():
        f.unlink()
    FLAGS.rmdir()


def flag(name: str, on: bool) -> None:
    p = FLAGS / name
    p.touch() if on else p.unlink(missing_ok=True)


def wait_cpus_released(total: float = 2.0, timeout: float = 30.0) -> None:
    t0 = time.time()
    while ray.available_resources().get("CPU", 0.0) < total:
        assert time.time() - t0 < timeout, f"actors left holding CPUs: {ray.available_resources()}"
        time.sleep(0.2)


# ------------------------------------------------------------------ 1. generation worker killed mid-rollout


class HeldWorker(GenerationWorker):
    """Announces the start of each generate (a file named by its pid), then waits while `hold` exists."""

    def __init__(self, mark_dir: str, **kw):
        super().__init__(**kw)
        self.mark_dir = Path(mark_dir)

    def generate(self, jobs, params):
        (self.mark_dir / f"started-{os.getpid()}").touch()
        while (self.mark_dir / "hold").exists():
            time.sleep(0.02)
        return super().generate(jobs, params)


@pytest.mark.long
@pytest.mark.parametrize("how", ["ray.kill", "SIGKILL"])
def test_worker_killed_mid_rollout_restarted_resynced_only_lost_prompts_regenerated(ray_local, tmp_path, how):
    cfg = load_grpo_config(data={"model": {"preset": "tiny", "overrides": {"vocab_size": 384}, "backend": "torch"}})
    model = build_model(cfg.model)
    RemoteWorker = ray.remote(num_cpus=0.5)(HeldWorker)
    group = WorkerGroup(RemoteWorker, {"mark_dir": str(tmp_path), "model_config": model.config.to_dict(),
                                       "model_section": cfg.model, "slots": 8}, num_workers=2, max_restarts=2)
    try:
        assert group.load_weights([ray.put(export_policy(model, version=3))] * 2) == [3, 3]
        g = torch.Generator().manual_seed(0)
        jobs = [PromptJob(f"p{i}", torch.randint(10, 300, (4,), generator=g).tolist(), seed=50 + i) for i in range(6)]
        params = SamplingParams(max_new_tokens=5, temperature=1.0, n=3)
        clean, _ = group.generate(jobs, params)
        pids = [p["pid"] for p in group.ping()]
        for f in tmp_path.glob("started-*"):
            f.unlink()

        (tmp_path / "hold").touch()
        out: dict = {}
        th = threading.Thread(target=lambda: out.update(r=group.generate(jobs, params)))
        th.start()
        t0 = time.time()
        while not all((tmp_path / f"started-{p}").exists() for p in pids):   # both workers are mid-rollout
            assert time.time() - t0 < 60
            time.sleep(0.02)
        if how == "ray.kill":
            ray.kill(group.actors[1], no_restart=True)
        else:
            os.kill(pids[1], signal.SIGKILL)
        time.sleep(0.5)
        (tmp_path / "hold").unlink()
        th.join(timeout=120)
        assert not th.is_alive()
        faulty, stats = out["r"]
        assert stats["workers/restarts"] == 1
        assert stats["workers/regenerated_prompts"] == 3            # worker 1's shard only
        info = group.ping()
        assert info[0]["pid"] == pids[0]                            # the healthy worker was left alone
        assert info[1]["pid"] != pids[1] and info[1]["version"] == 3   # restarted and resynced
        ids = [sample_id(r.request_id, r.sample_index) for r in faulty]
        assert len(ids) == len(set(ids)) == 18
        assert sorted(ids) == sorted(f"p{i}/{k}" for i in range(6) for k in range(3))
        assert [r.token_ids for r in faulty] == [r.token_ids for r in clean]
    finally:
        group.shutdown()


# ------------------------------------------------------------------ 2. the whole GRPO job SIGKILLed between checkpoints


@pytest.mark.long
def test_grpo_sigkill_between_checkpoints_then_resume_replays_exactly(ray_local, tmp_path):
    steps = ["steps=5", "checkpoint_every=2"]
    ref, run = tmp_path / "ref", tmp_path / "killed"
    assert grpo.main(["--config", CONFIG, "--output-dir", str(ref), *steps, *FAST]) == 0
    want = read_metrics(ref / "metrics.jsonl")

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "rl.grpo.driver", "--config", CONFIG, "--output-dir", str(run),
                             *steps, *FAST, "workers.num_cpus=0.5", "learner.num_cpus=0.5"],
                            cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    mpath = run / "metrics.jsonl"
    t0 = time.time()
    try:
        while not (mpath.exists() and len(read_metrics(mpath)) >= 3):     # checkpoint 2 written, step 3 done
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() - t0 < 240
            time.sleep(0.05)
        group = [p for p in psutil.process_iter() if _in_session(p, proc.pid)]
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    _reap(group)
    assert [s for s, _ in CheckpointManager(run / "checkpoints").checkpoints()] == [2]
    assert len(read_metrics(mpath)) in (3, 4)                # killed before checkpoint 4

    assert grpo.main(["--config", CONFIG, "--output-dir", str(run), "--resume", *steps, *FAST]) == 0
    got = read_metrics(mpath)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5]       # metrics trimmed back to the checkpoint
    for a, b in zip(want, got):
        for k in ("reward_mean", "learn/pg_loss", "learn/grad_norm", "rollout/sample_crc32", "data/position",
                  "response_len_mean"):
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9), (a["step"], k)
    assert len({r["rollout/sample_crc32"] for r in got}) == 5          # the digest does tell steps apart


def _in_session(p: psutil.Process, sid: int) -> bool:
    try:
        return os.getsid(p.pid) == sid
    except (ProcessLookupError, PermissionError, psutil.Error):
        return False


def _reap(procs: list[psutil.Process], timeout: float = 30.0) -> None:
    """The killed run's processes (Ray's own included) must all go; kill stragglers by pid, then fail."""
    gone, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        p.kill()
    assert not alive, [p.pid for p in alive]


# ------------------------------------------------------------------ 3. a checkpoint save killed midway


SAVE_AND_DIE = """
import os, sys, time, torch
import rl.train.checkpoint as ck
mgr = ck.CheckpointManager(sys.argv[1])
mgr.save(1, {"w": torch.ones(4)}, optimizer_state={"state": {}, "param_groups": []}, extra={"step": 1})
real = ck._write_bytes
def slow(path, data):
    real(path, data)
    open(sys.argv[2], "w").close()
    time.sleep(60)
ck._write_bytes = slow
mgr.save(2, {"w": torch.zeros(4)}, optimizer_state={"state": {}, "param_groups": []}, extra={"step": 2})
"""


def test_checkpoint_save_killed_midway_previous_loads_partial_ignored(tmp_path):
    root, mark = tmp_path / "ck", tmp_path / "writing"
    proc = subprocess.Popen([sys.executable, "-c", SAVE_AND_DIE, str(root), str(mark)], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    t0 = time.time()
    while not mark.exists():
        assert proc.poll() is None and time.time() - t0 < 60
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)                         # mid-save: model and optimizer written, no manifest
    proc.wait(timeout=30)
    leftovers = [p for p in root.iterdir() if p.name.startswith(".tmp_step_00000002")]
    assert leftovers and (leftovers[0] / "model.safetensors").is_file()
    mgr = CheckpointManager(root)
    assert mgr.latest().name == "step_00000001"
    tensors, opt, extra = mgr.load()
    assert torch.equal(tensors["w"], torch.ones(4)) and extra["step"] == 1
    # the same partial, as if renamed into place without its manifest: skipped with a warning
    fake = root / "step_00000002"
    leftovers[0].rename(fake)
    with pytest.warns(CheckpointWarning, match="missing manifest.json"):
        assert mgr.latest().name == "step_00000001"
    fake.rename(leftovers[0])
    mgr.save(3, {"w": torch.full((4,), 3.0)})                # the next save cleans the dead writer's temp dir
    assert not leftovers[0].exists()


# ------------------------------------------------------------------ 4. disk full during a GRPO checkpoint


@pytest.mark.long
def test_grpo_disk_full_stops_cleanly_previous_checkpoint_intact(ray_local, tmp_path, capsys):
    out = tmp_path / "run"
    assert grpo.main(["--config", CONFIG, "--output-dir", str(out), "steps=2", "checkpoint_every=2", *FAST]) == 0
    before = (out / "checkpoints" / "step_00000002" / "model.safetensors").read_bytes()
    flag("DISK_FULL", True)
    try:
        with pytest.raises(CheckpointError, match=r"step_00000004.*No space left on device.*previous checkpoint "
                                                  r"intact: .*step_00000002") as ei:
            grpo.main(["--config", CONFIG, "--output-dir", str(out), "--resume", "steps=4", "checkpoint_every=2",
                       *FAST])
    finally:
        flag("DISK_FULL", False)
    assert "Traceback" not in str(ei.value) and "\n" not in str(ei.value)     # the actor's error, unwrapped
    mgr = CheckpointManager(out / "checkpoints")
    assert [s for s, _ in mgr.checkpoints()] == [2]
    assert (mgr.latest() / "model.safetensors").read_bytes() == before
    assert mgr.load()[2]["step"] == 2
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]   # temp dir removed
    wait_cpus_released()                                     # learner and workers were stopped


# ------------------------------------------------------------------ 5. NaN/inf loss or gradient


@pytest.mark.long
def test_grpo_nan_loss_steps_skipped_then_run_stops_naming_step_and_cause(ray_local, tmp_path):
    from rl.train.loop import TrainingDiverged

    out = tmp_path / "nan"
    flag("NAN_LOSS", True)
    try:
        with pytest.raises(TrainingDiverged, match=r"stopping at step 3: 3 consecutive GRPO steps skipped "
                                                   r"\(non-finite loss.*\)\. Likely cause: learning rate"):
            grpo.main(["--config", CONFIG, "--output-dir", str(out), "steps=6", "max_bad_steps=3", *FAST])
    finally:
        flag("NAN_LOSS", False)
    recs = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2]              # step 3 raised before it was logged
    for r in recs:
        assert r["learn/skipped_steps"] == r["learn/optimizer_steps"] == 1.0
        assert r["learn/bad_micro_batches"] >= 1.0
    wait_cpus_released()


def _learner(backend: str):
    import warnings

    from rl.grpo.learner import Learner

    cfg = load_grpo_config(data={"model": {"preset": "tiny", "overrides": {"vocab_size": 384}},
                                 "group_size": 2, "prompts_per_step": 2,
                                 "learner": {"backend": backend, "lr": 1.0e-2, "micro_batch_tokens": 8}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Learner(cfg)


def _batch(nan_logprob: bool = False):
    from rl.grpo.learner import TrainBatch

    g = torch.Generator().manual_seed(0)
    P = [torch.randint(10, 300, (4,), generator=g).tolist() for _ in range(2)]
    C = [torch.randint(10, 300, (4,), generator=g).tolist() for _ in range(2)]
    lp = [[-5.0] * 4 for _ in C]
    if nan_logprob:
        lp = [[float("nan")] * 4 for _ in C]
    return TrainBatch(P, C, lp, [[1.0] * 4 for _ in C], [1.0, -1.0])


@pytest.mark.parametrize("backend", ["deepspeed", "torch"])
@pytest.mark.parametrize("fault", ["nan_gradient", "nan_loss_everywhere"])
def test_learner_skips_the_optimizer_step_on_non_finite_loss_or_gradient(backend, fault):
    learner = _learner(backend)
    learner.update(_batch())                                 # a healthy step first: AdamW has momentum now
    before = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    hook = None
    if fault == "nan_gradient":
        hook = next(learner.model.parameters()).register_hook(lambda g: g * float("nan"))
    m = learner.update(_batch(nan_logprob=fault == "nan_loss_everywhere"))
    if hook is not None:
        hook.remove()
    assert m["learn/skipped_steps"] == m["learn/optimizer_steps"] == 1.0
    for n, p in learner.model.named_parameters():
        assert torch.equal(p, before[n]), n                  # skipped: not even momentum moved the weights
    m = learner.update(_batch())
    assert m["learn/skipped_steps"] == 0.0
    assert any(not torch.equal(p, before[n]) for n, p in learner.model.named_parameters())


# ------------------------------------------------------------------ 6. GPU OOM in a generation worker (CPU simulation)


def test_worker_oom_halves_slots_retries_logs_once(caplog):
    cfg = load_grpo_config(data={"model": {"preset": "tiny", "overrides": {"vocab_size": 384}, "backend": "torch"}})
    model = build_model(cfg.model)
    w = GenerationWorker(model.config.to_dict(), cfg.model, slots=8)
    w.load_weights(export_policy(model, version=1))
    g = torch.Generator().manual_seed(0)
    jobs = [PromptJob(f"p{i}", torch.randint(10, 300, (4,), generator=g).tolist(), seed=i) for i in range(3)]
    params = SamplingParams(max_new_tokens=5, temperature=1.0, n=4)
    clean = w.generate(jobs, params)

    real = w.engine.generate
    seen = []

    def oom_above_two(reqs):
        seen.append(w.engine.slots)
        if w.engine.slots > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(reqs)

    w.engine.generate = oom_above_two
    with caplog.at_level(logging.WARNING, logger="rl.grpo.workers"):
        again = w.generate(jobs, params)
    assert seen == [8, 4, 2]
    assert w.ping()["slots"] == 2 and w.ping()["oom_backoffs"] == 2
    assert [r.token_ids for r in again] == [r.token_ids for r in clean]      # same samples, smaller batches
    assert sum("out of memory" in r.getMessage() for r in caplog.records) == 1

    w.engine.generate = lambda reqs: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("still OOM"))
    with pytest.raises(torch.cuda.OutOfMemoryError):
        w.generate(jobs, params)                             # gives up at one slot
    assert w.engine.slots == 1
