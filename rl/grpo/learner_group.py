"""A learner of several data-parallel ranks, driven like one learner actor.

    group = LearnerGroup(cfg, init_dir)               # cfg.learner.ranks > 1
    metrics = ray.get(group.update.remote(batch))     # the same calls as on one `Learner` actor
    weights = group.export_weights.remote()           # rank 0's PolicyWeights
    group.shutdown()

Placement: one placement group, one bundle per rank ({"CPU": learner.num_cpus, "GPU": 1 or 0}), PACK
strategy. A group the cluster cannot hold at all fails at once; one that does not fit the free resources
fails after `learner.placement_timeout_s`; both name the resources asked for and the cluster's.
Rendezvous: a zero-CPU task in rank 0's bundle picks the node address and a free port; every rank is a
`Learner` actor given its `RankSpec`, and they form one torch.distributed group (gloo on CPU, NCCL on
GPU) that DeepSpeed runs ZeRO-2 or ZeRO-3 over (world size = ranks).

Calls: `update`, `save_checkpoint` and `load_checkpoint` (and under ZeRO-3 the exports, which gather
the parameters) run on every rank; their result is rank 0's (its metrics are already combined over the
ranks; it writes the checkpoint). The other calls go to rank 0 only. A call made on every rank returns
the reference of a zero-CPU waiter task: if any rank fails, it stops the group (the others would wait in
a collective) and raises `LearnerGroupError` naming the rank, the call and the cause; a user error
(`BitMambaError`: a corrupt checkpoint) is raised as itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from model.errors import BitMambaError, ConfigError
from rl.grpo.config import GRPOConfig
from rl.grpo.learner import Learner, RankSpec, free_port

log = logging.getLogger("rl.grpo.learner_group")


class LearnerGroupError(BitMambaError):
    """A learner rank died or failed during a call on every rank; the group has been stopped."""


@ray.remote(num_cpus=0)
def _rendezvous() -> tuple[str, int]:
    """Rank 0's node address and a free port on it (runs in rank 0's bundle)."""
    return ray.util.get_node_ip_address(), free_port()


def _first_line(e: BaseException) -> str:
    if isinstance(e, ray.exceptions.RayTaskError):
        e = e.cause
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}"[:300]


@ray.remote(num_cpus=0)
def _await_ranks(refs: list, actors: list, call: str) -> Any:
    """Rank 0's result once every rank has finished `call`; the first failure stops all ranks and raises
    (refs arrive in a list, so Ray leaves them unresolved and this task sees each one finish)."""
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        try:
            ray.get(done[0])
        except Exception as e:
            rank = refs.index(done[0])
            for a in actors:
                ray.kill(a, no_restart=True)
            if isinstance(e, ray.exceptions.RayTaskError) and isinstance(e.cause, BitMambaError):
                raise e.cause from None
            raise LearnerGroupError(f"learner rank {rank} of {len(refs)} failed during {call} "
                                    f"({_first_line(e)}); the learner group was stopped") from None
    return ray.get(refs[0])


@dataclass
class _Call:
    """`group.<method>.remote(*args)`: the same call shape as on one learner actor."""

    group: "LearnerGroup"
    method: Callable
    every_rank: bool

    def remote(self, *args, **kwargs) -> ray.ObjectRef:
        name = self.method.__name__
        if not self.every_rank:
            return getattr(self.group.actors[0], name).remote(*args, **kwargs)
        refs = [getattr(a, name).remote(*args, **kwargs) for a in self.group.actors]
        return _await_ranks.remote(refs, self.group.actors, name)


def bundle(cfg: GRPOConfig) -> dict[str, float]:
    """One rank's resources."""
    sec = cfg.learner
    out = {"CPU": float(sec.num_cpus)}
    if sec.gpus_per_rank > 0:
        out["GPU"] = float(sec.gpus_per_rank)
    return out


def check_fits(cfg: GRPOConfig) -> None:
    """Refuse at once a group larger than the whole cluster (waiting could not help)."""
    need = bundle(cfg)
    n = cfg.learner.ranks
    total = ray.cluster_resources()
    short = {k: v * n for k, v in need.items() if v * n > total.get(k, 0.0)}
    if short:
        raise ConfigError(f"learner group: {n} ranks x {need} need {short} but the Ray cluster has "
                          f"{ {k: total.get(k, 0.0) for k in short} } in all (learner.num_ranks / num_gpus / "
                          f"num_cpus)")


class LearnerGroup:
    """`learner.ranks` Learner actors in one placement group and one torch.distributed group."""

    def __init__(self, cfg: GRPOConfig, init_dir: str | None = None):
        sec = cfg.learner
        self.n = sec.ranks
        self.actors: list = []
        check_fits(cfg)
        self.pg = placement_group([bundle(cfg)] * self.n, strategy="PACK")
        if not self.pg.wait(timeout_seconds=sec.placement_timeout_s):
            free = ray.available_resources()
            remove_placement_group(self.pg)
            self.pg = None
            raise ConfigError(f"learner group: {self.n} ranks x {bundle(cfg)} could not be placed within "
                              f"{sec.placement_timeout_s:g} s (learner.placement_timeout_s); free now: "
                              f"{ {k: free.get(k, 0.0) for k in bundle(cfg)} }")
        try:
            self._start(cfg, init_dir)
        except BaseException:
            self.shutdown()
            raise
        self.zero3 = sec.zero_stage == 3
        for m in (Learner.update, Learner.save_checkpoint, Learner.load_checkpoint):
            setattr(self, m.__name__, _Call(self, m, every_rank=True))
        for m in (Learner.export_weights, Learner.export_shared, Learner.compute_logprobs):
            setattr(self, m.__name__, _Call(self, m, every_rank=self.zero3))
        for m in (Learner.gpu, Learner.get_model_config, Learner.last_export_stats, Learner.last_shared_as_weights,
                  Learner.ping):
            setattr(self, m.__name__, _Call(self, m, every_rank=False))

    def _start(self, cfg: GRPOConfig, init_dir: str | None) -> None:
        sec = cfg.learner

        def place(i: int) -> PlacementGroupSchedulingStrategy:
            return PlacementGroupSchedulingStrategy(placement_group=self.pg, placement_group_bundle_index=i)

        addr, port = ray.get(_rendezvous.options(scheduling_strategy=place(0)).remote())
        Remote = ray.remote(Learner)
        for r in range(self.n):
            spec = RankSpec(rank=r, world_size=self.n, master_addr=addr, master_port=port)
            self.actors.append(Remote.options(num_cpus=sec.num_cpus, num_gpus=sec.gpus_per_rank,
                                              scheduling_strategy=place(r)).remote(cfg, init_dir, spec))
        # every rank is up (and in the process group) once it answers
        ray.get(_await_ranks.remote([a.ping.remote() for a in self.actors], self.actors, "start"))
        log.info("learner group: %d ranks at %s:%d", self.n, addr, port)

    def shutdown(self) -> None:
        """Stop every rank and release the placement group."""
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception as e:          # already gone with its node
                log.warning("learner group: stopping a rank failed: %s", e)
        self.actors = []
        if getattr(self, "pg", None) is not None:
            remove_placement_group(self.pg)
            self.pg = None
