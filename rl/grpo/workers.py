"""Generation workers: a plain class doing the work, and an actor group that owns placement and faults.

    RemoteWorker = ray.remote(num_cpus=1, num_gpus=0.25)(GenerationWorker)   # at launch, in rl/grpo/driver.py
    group = WorkerGroup(RemoteWorker, worker_kwargs, num_workers=2)
    group.load_weights([ref] * 2)                   # per worker: an object-store reference (the same
                                                    # one for all) or a CUDA IPC `SharedPolicy`
    samples = group.generate(jobs, params)          # sharded by prompt; dead workers restarted

Every prompt is a `PromptJob` with a unique `uid` and its own seed, and is sampled as one engine
request with `n = group size` (one prefill shared by the group). Its samples are `uid/0 .. uid/n-1`.
Because sampling seeds derive from (job seed, sample index) only, a prompt regenerated on another
worker after a crash yields the same samples, and the group checks that every sample id is present
exactly once.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import ray
import torch
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from model.errors import BitMambaError
from rl.grpo.config import ModelSection, build_tokenizer, model_from_config
from rl.grpo.weight_sync import PolicyWeights, SharedPolicy, gpu_uuid, load_into, open_shared
from rollout.backends import make_backend
from rollout.engine import Engine
from rollout.types import GenRequest, GenResult, SamplingParams

log = logging.getLogger("rl.grpo.workers")

ACTOR_FAILURES = (RayActorError, ActorDiedError, ActorUnavailableError)


@dataclass
class PromptJob:
    uid: str                 # unique across the run, e.g. "s00012-p003"
    prompt_ids: list[int]
    seed: int                # sampling seed of this prompt's group


def sample_id(uid: str, index: int) -> str:
    return f"{uid}/{index}"


class GenerationWorker:
    """Wraps the rollout engine over a decode backend for one model replica (CPU or one GPU share)."""

    def __init__(self, model_config: dict, model_section: ModelSection, slots: int = 16,
                 sync_every: int = 8):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model_from_config(model_config).to(self.device).eval()
        self.model.requires_grad_(False)
        self.tokenizer = build_tokenizer(model_section)
        self.backend = make_backend(self.model, model_section.backend,
                                    ssm_dtype=getattr(torch, model_section.ssm_dtype))
        self.engine = Engine(self.backend, self.tokenizer, slots=slots, sync_every=sync_every)
        self.version = -1
        self._crash_next = False
        self.oom_backoffs = 0              # times the slots were halved after a CUDA OOM
        self._oom_logged = False

    def ping(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "version": self.version, "device": str(self.device),
                "backend": type(self.backend).__name__, "slots": self.engine.slots,
                "oom_backoffs": self.oom_backoffs, "gpu": gpu_uuid() if self.device.type == "cuda" else None}

    def engine_stats(self) -> dict[str, Any]:
        """The last generate's engine counters and seconds (`GenStats`)."""
        return asdict(self.engine.last_stats)

    def load_weights(self, weights: PolicyWeights | SharedPolicy) -> int:
        """Load a policy version: an object-store reference (Ray resolves it) or a `SharedPolicy` on this
        GPU (mapped by CUDA IPC; loaded on the GPU, then unmapped)."""
        t0 = time.perf_counter()
        if isinstance(weights, SharedPolicy):
            weights = open_shared(weights)
        load_into(self.model, weights)
        t1 = time.perf_counter()
        self.backend.refresh_weights()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.last_load = {"sync/worker_load_s": t1 - t0, "sync/worker_refresh_s": time.perf_counter() - t1}
        self.version = weights.version
        return self.version

    def load_stats(self) -> dict[str, float]:
        """Seconds of the last `load_weights`: into the model, and the backend's re-pack."""
        return dict(getattr(self, "last_load", {}))

    def generate(self, jobs: list[PromptJob], params: SamplingParams) -> list[GenResult]:
        """All `params.n` samples of every job, ordered by job then sample index."""
        if self._crash_next:       # fault injection (tests): die like a killed process, mid-rollout
            os._exit(17)
        reqs = [GenRequest(j.prompt_ids, replace(params, seed=j.seed), request_id=j.uid) for j in jobs]
        while True:
            try:
                with torch.no_grad():
                    return self.engine.generate(reqs)
            except torch.cuda.OutOfMemoryError:
                self._oom_backoff()

    def _oom_backoff(self) -> None:
        """GPU out of memory: halve the engine's slots and let the caller retry (samples replay exactly
        whatever the batching, since seeds are per sample). Logged once per worker; gives up at 1 slot."""
        if self.engine.slots <= 1:
            raise
        old, self.engine.slots = self.engine.slots, self.engine.slots // 2
        self.oom_backoffs += 1
        if not self._oom_logged:
            log.warning("generation worker: CUDA out of memory with %d slots; halving to %d and retrying "
                        "(further halvings are not logged)", old, self.engine.slots)
            self._oom_logged = True
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def crash_on_next_generate(self) -> None:
        """Fault injection: the next `generate` call kills this worker's process."""
        self._crash_next = True

    @torch.no_grad()
    def logits(self, input_ids: list[int]) -> torch.Tensor:
        """Eval-mode logits of one sequence [T, V] (for sync checks)."""
        ids = torch.tensor([input_ids], device=self.device)
        return self.model(ids).logits[0].float().cpu()


class WorkerGroup:
    """A set of generation actors: shards prompts, restarts dead actors, resyncs, regenerates.

    remote_cls: `ray.remote(...)(GenerationWorker)`; kwargs: its constructor arguments.
    """

    def __init__(self, remote_cls, kwargs: dict, num_workers: int, max_restarts: int = 3):
        self.remote_cls = remote_cls
        self.kwargs = kwargs
        self.max_restarts = max_restarts
        self.actors = [self._spawn() for _ in range(num_workers)]
        self.weights_refs: list | None = None
        self.ipc_loads: list[bool] = []
        self.restarts = 0
        self._gpus = [p.get("gpu") for p in ray.get([a.ping.remote() for a in self.actors])]

    def _spawn(self):
        return self.remote_cls.options(max_restarts=0, max_task_retries=0).remote(**self.kwargs)

    def gpus(self) -> list[str | None]:
        """Per worker: its GPU UUID (None on CPU, or after a failed CUDA IPC load: object store from then on)."""
        return list(self._gpus)

    def load_weights(self, refs: list, fallback=None) -> list[int]:
        """Worker w loads refs[w]: an object-store reference or a `SharedPolicy` (CUDA IPC). A worker that
        cannot map a `SharedPolicy` loads `fallback()` (an object-store reference of the same version)
        instead, with a warning, and stays on the object store. Returns the workers' versions;
        `self.ipc_loads` says which loaded by IPC. Remembered for restarts."""
        if len(refs) != len(self.actors):
            raise ValueError(f"load_weights: {len(refs)} references for {len(self.actors)} workers")
        self.weights_refs, self._fallback = list(refs), fallback
        calls = [a.load_weights.remote(r) for a, r in zip(self.actors, refs)]
        used, versions = [], []
        for w, (call, r) in enumerate(zip(calls, refs)):
            try:
                versions.append(ray.get(call))
                used.append(isinstance(r, SharedPolicy))
            except ray.exceptions.RayTaskError as e:
                if not isinstance(r, SharedPolicy) or fallback is None:
                    raise
                log.warning("worker %d could not load the policy by CUDA IPC (%s); using the object store "
                            "from now on", w, str(e).strip().splitlines()[-1])
                self._gpus[w] = None
                self.weights_refs[w] = fallback()
                versions.append(ray.get(self.actors[w].load_weights.remote(self.weights_refs[w])))
                used.append(False)
        self.ipc_loads = used
        return versions

    def load_stats(self) -> dict[str, float]:
        """The slowest worker's `load_stats` (the sync waits for it)."""
        per = ray.get([a.load_stats.remote() for a in self.actors])
        keys = {k for d in per for k in d}
        return {k: float(max(d.get(k, 0.0) for d in per)) for k in sorted(keys)}

    def _restart(self, w: int, reason: Exception) -> None:
        log.warning("generation worker %d died (%s); restarting and resyncing weights", w,
                    type(reason).__name__)
        try:
            ray.kill(self.actors[w], no_restart=True)
        except Exception:  # already gone; nothing to clean up
            pass
        self.actors[w] = self._spawn()
        gpu = ray.get(self.actors[w].ping.remote()).get("gpu")
        if self.weights_refs is not None:
            ref = self.weights_refs[w]
            if isinstance(ref, SharedPolicy) and ref.gpu != gpu:   # came back on another GPU
                ref = self.weights_refs[w] = self._fallback()
            ray.get(self.actors[w].load_weights.remote(ref))
        if self._gpus[w] is not None:           # (None after a failed IPC load: stays on the object store)
            self._gpus[w] = gpu

    def generate(self, jobs: list[PromptJob], params: SamplingParams) -> tuple[list[GenResult], dict]:
        """Samples of every job (ordered by job, then sample index) and stats (restarts, regenerated)."""
        W = len(self.actors)
        shards = [jobs[w::W] for w in range(W)]
        pending = {self.actors[w].generate.remote(shards[w], params): w for w in range(W) if shards[w]}
        by_uid: dict[str, list[GenResult]] = {}
        restarts, regenerated = 0, 0
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            ref = ready[0]
            w = pending.pop(ref)
            try:
                results = ray.get(ref)
            except ACTOR_FAILURES as e:
                restarts += 1
                self.restarts += 1
                if restarts > self.max_restarts:
                    raise BitMambaError(f"generation worker {w} died {restarts} times in one step "
                                        f"(last: {e}); giving up") from None
                self._restart(w, e)
                regenerated += len(shards[w])
                pending[self.actors[w].generate.remote(shards[w], params)] = w
                continue
            for r in results:
                by_uid.setdefault(r.request_id, []).append(r)
        out: list[GenResult] = []
        for j in jobs:
            got = sorted(by_uid.get(j.uid, []), key=lambda r: r.sample_index)
            if [r.sample_index for r in got] != list(range(params.n)):
                raise RuntimeError(f"prompt {j.uid}: got samples {[r.sample_index for r in got]}, "
                                   f"expected 0..{params.n - 1}")
            out.extend(got)
        stats = {"workers/restarts": float(restarts), "workers/regenerated_prompts": float(regenerated)}
        # where the generate phase goes: the slowest worker's engine (the rest is Ray and transfer)
        es = ray.get([self.actors[w].engine_stats.remote() for w in range(W) if shards[w]])
        for key in ("wall_s", "prefill_s", "decode_s", "decode_steps"):
            stats[f"gen/engine_{key}"] = float(max(e[key] for e in es)) if es else 0.0
        stats["gen/idle_slot_steps"] = float(sum(e["idle_slot_steps"] for e in es))
        return out, stats

    def ping(self) -> list[dict]:
        return ray.get([a.ping.remote() for a in self.actors])

    def shutdown(self) -> None:
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # already dead
                pass
        self.actors = []
