"""GRPO soak run: resident memory, open files and processes over many steps; every checkpoint loaded.

    OMP_NUM_THREADS=1 python tests/reliability/soak.py --steps 300 --out runs/soak    # ~6-10 min on 2 CPU cores
    OMP_NUM_THREADS=1 python tests/reliability/soak.py --steps 60 --sample-every 5     # a shorter look

Runs the tiny GRPO config (configs/grpo_tiny.yaml, small batches) through `rl.grpo.driver.Driver` in this
process, and every `--sample-every` steps records for the driver, the learner actor and each generation
worker: RSS (MiB), open file descriptors, and the driver's child processes (reward pool workers, and
Ray's own processes when this script started Ray). At the end it loads every checkpoint (the manager's
checksummed loader and `BitMambaLM.from_pretrained`), closes the driver, checks that the actors and the
reward workers are gone, and writes `OUT/soak_report.json`:

    samples: [{step, time, driver_rss_mb, learner_rss_mb, worker_rss_mb: [...], *_fds, driver_children}]
    growth: per process, RSS at the last sample minus RSS at the first sample after warm-up
            (`--warmup` steps; allocator and import growth settle in the first steps), and MiB per 100 steps
    checkpoints: [{step, ok, error}]
    leaks: {actors_alive_after_close, driver_children_after_close, driver_fds_before/after (all
            descriptors), driver_files_before/after (without sockets: Ray keeps the gRPC connections
            of the first actors a process talks to for its whole life)}
Exit status 0 when every checkpoint loads and nothing leaked (memory growth is reported, not judged).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import ray  # noqa: E402

CONFIG = ROOT / "configs" / "grpo_tiny.yaml"
SMALL = ["prompts_per_step=4", "group_size=4", "eval_every=0", "wandb=false", "reward_pool.num_workers=1",
         "keep_checkpoints=0", "learner.num_cpus=0.5", "workers.num_cpus=0.5"]


def _proc_stats(pid: int) -> tuple[float, int]:
    try:
        p = psutil.Process(pid)
        return p.memory_info().rss / 2**20, p.num_fds()
    except psutil.Error:
        return float("nan"), -1


def _open_files(pid: int) -> int:
    """Open descriptors that are not sockets (the first actors a process talks to open gRPC
    connections that Ray's core worker keeps for the life of the process)."""
    n = 0
    for f in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += not os.readlink(f"/proc/{pid}/fd/{f}").startswith("socket:")
        except OSError:
            pass
    return n


def _children(pid: int) -> set[int]:
    try:
        return {c.pid for c in psutil.Process(pid).children(recursive=True)}
    except psutil.Error:
        return set()


class Sampler(threading.Thread):
    """Polls the driver's step; records one sample whenever it reaches a multiple of `every`."""

    def __init__(self, driver, every: int):
        super().__init__(daemon=True)
        self.driver, self.every = driver, every
        self.samples: list[dict] = []
        self.stop = threading.Event()
        self.learner_pid = ray.get(driver.learner.ping.remote())["pid"]
        self.last = -1

    def sample(self, step: int) -> None:
        d = self.driver
        worker_pids = [a["pid"] for a in d.workers.ping()]          # after a restart these are the new ones
        me = os.getpid()
        rss, fds = _proc_stats(me)
        lrss, lfds = _proc_stats(self.learner_pid)
        w = [_proc_stats(p) for p in worker_pids]
        self.samples.append({"step": step, "time": time.time(), "driver_rss_mb": rss, "driver_fds": fds,
                             "learner_rss_mb": lrss, "learner_fds": lfds,
                             "worker_rss_mb": [x[0] for x in w], "worker_fds": [x[1] for x in w],
                             "worker_pids": worker_pids, "driver_children": len(_children(me))})

    def run(self) -> None:
        while not self.stop.is_set():
            s = self.driver.step
            if s % self.every == 0 and s != self.last:
                self.last = s
                self.sample(s)
            time.sleep(0.05)


def _growth(samples: list[dict], warmup: int) -> dict:
    after = [s for s in samples if s["step"] >= warmup] or samples
    if len(after) < 2:
        return {}
    a, b = after[0], after[-1]
    per100 = 100.0 / max(b["step"] - a["step"], 1)
    out = {"from_step": a["step"], "to_step": b["step"]}
    for k in ("driver_rss_mb", "learner_rss_mb"):
        out[k] = round(b[k] - a[k], 2)
        out[k.replace("_mb", "_mb_per_100_steps")] = round((b[k] - a[k]) * per100, 2)
    out["worker_rss_mb"] = [round(y - x, 2) for x, y in zip(a["worker_rss_mb"], b["worker_rss_mb"])]
    for k in ("driver_fds", "learner_fds", "driver_children"):
        out[k] = b[k] - a[k]
    out["worker_fds"] = [y - x for x, y in zip(a["worker_fds"], b["worker_fds"])]
    return out


def load_all_checkpoints(ckpt_root: Path) -> list[dict]:
    from model.lm import BitMambaLM
    from rl.train.checkpoint import CheckpointManager, load_checkpoint

    out = []
    for step, path in CheckpointManager(ckpt_root).checkpoints():
        try:
            tensors, opt, extra = load_checkpoint(path)
            BitMambaLM.from_pretrained(path)
            ok = bool(tensors) and opt is not None and int(extra["step"]) == step
            out.append({"step": step, "ok": ok, "error": None if ok else "incomplete content"})
        except Exception as e:  # report every checkpoint, whatever the failure
            out.append({"step": step, "ok": False, "error": f"{type(e).__name__}: {e}"})
    return sorted(out, key=lambda r: r["step"])


def soak(steps: int, out: Path, sample_every: int = 10, checkpoint_every: int = 50, warmup: int = 10,
         extra_overrides: list[str] | None = None) -> dict:
    """Run the soak; returns the report (also written to out/soak_report.json)."""
    from rl.grpo.driver import Driver, connect_ray
    from rl.grpo.config import load_grpo_config

    cfg = load_grpo_config(CONFIG, [*SMALL, f"steps={steps}", f"checkpoint_every={checkpoint_every}",
                                    f"output_dir={out}", *(extra_overrides or [])])
    # Ray first (as the driver would start it), so that the baseline below holds Ray's own files and
    # processes and the leak check sees only what the driver, its actors and the reward pool leave
    owns_ray = connect_ray(cfg)
    me = os.getpid()
    fds_before, files_before, children_before = psutil.Process(me).num_fds(), _open_files(me), _children(me)
    t0 = time.time()
    driver = Driver(cfg)
    actor_pids = []
    try:
        sampler = Sampler(driver, sample_every)
        actor_pids = [sampler.learner_pid] + [a["pid"] for a in driver.workers.ping()]
        sampler.sample(0)
        sampler.last = 0
        sampler.start()
        driver.run()
        sampler.stop.set()
        sampler.join()
        if not sampler.samples or sampler.samples[-1]["step"] != driver.step:
            sampler.sample(driver.step)
        actor_pids += [p for s in sampler.samples for p in s["worker_pids"]]
    finally:
        driver.close()
    wall = time.time() - t0
    time.sleep(1.0)
    alive = [p for p in set(actor_pids) if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    leftover = sorted(_children(me) - children_before)
    fds_after, files_after = psutil.Process(me).num_fds(), _open_files(me)
    if owns_ray:
        ray.shutdown()
    ckpts = load_all_checkpoints(out / "checkpoints")
    report = {
        "steps": steps, "wall_s": round(wall, 1), "sample_every": sample_every, "warmup_steps": warmup,
        "samples": sampler.samples, "growth": _growth(sampler.samples, warmup), "checkpoints": ckpts,
        "leaks": {"actors_alive_after_close": alive, "driver_children_after_close": leftover,
                  "driver_fds_before": fds_before, "driver_fds_after": fds_after,
                  "driver_files_before": files_before, "driver_files_after": files_after},
    }
    report["ok"] = (bool(ckpts) and all(c["ok"] for c in ckpts) and not alive and not leftover
                    and report["leaks"]["driver_files_after"] <= files_before)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak_report.json").write_text(json.dumps(report, indent=1))
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--out", default="runs/soak")
    p.add_argument("--sample-every", type=int, default=10)
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("overrides", nargs="*", help="extra key=value GRPO config overrides")
    a = p.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    r = soak(a.steps, Path(a.out), a.sample_every, a.checkpoint_every, a.warmup, a.overrides)
    print(json.dumps({k: r[k] for k in ("steps", "wall_s", "growth", "checkpoints", "leaks", "ok")}, indent=1))
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
