"""GRPO on Ray: the driver loop.

    python -m rl.grpo --config configs/grpo_tiny.yaml [--output-dir DIR] [--resume] [key=value ...]
    bitmamba grpo --config configs/grpo_tiny.yaml
    ray job submit --working-dir . -- python -m rl.grpo --config configs/grpo_tiny.yaml

Setup: connect to Ray (a cluster when `workers.cluster_address` is set or RAY_ADDRESS is in the
environment, else a private local one bound to 127.0.0.1, even beside another cluster on the
machine), start the learner actor (DeepSpeed) and the generation actors, the reward pool, the metrics writer; restore the latest checkpoint on --resume.
Loop, one step:
  1. sample prompts (the data position is one integer; too-long prompts truncated or dropped)
  2. generate a group of n completions per prompt (one prefill per prompt) on the workers
  3. score them in the reward pool (timeouts and crashes become the fallback reward)
  4. group advantages; dynamic sampling drops zero-std groups and goes back to 1 for more prompts
  5. learner update (minibatches of micro-batches packed by token budget)
  6. sync: the learner's packed weights go into the object store once, every worker loads them
  7. log metrics.jsonl (+ wandb offline, + console); eval every K; checkpoint every K
With `max_staleness: k` > 0 (`one_step_off_policy` is k = 1), a background thread generates batches
with the newest weights the workers hold, up to k policy versions ahead of the learner, while the
learner updates (rl/grpo/async_rollout.py); truncated IS corrects for the lag.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import threading
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch

from model.errors import BitMambaError, ConfigError
from model.typed import to_dict
from model.checkpoint import load_config as load_model_config
from model.config import BitMambaConfig
from model.seeds import job_seed
from rewards import RewardPool, RewardSpec
from rl.grpo import algo
from rl.grpo import ds_ops
from rl.args import grpo_parser
from rl.grpo.async_rollout import RolloutProducer
from rl.train.checkpoint import (CheckpointManager, add_files, capture_rng_state, publish_final, restore_rng_state,
                           tokenizer_files)
from rl.grpo.config import GRPOConfig, build_tokenizer, check_tools, load_grpo_config
from rl.grpo.learner import Learner, TrainBatch, deepspeed_config
from rl.grpo.learner_group import LearnerGroup, LearnerGroupError
from rl.train.metrics import MetricsWriter
from rl.train.run_dir import GRPO_ENTRIES, check_run_dir, clear_run
from rl.grpo.tasks import make_task
from rl.train.loop import TrainingDiverged
from rl.grpo.weight_sync import sync_to_workers
from rl.grpo.workers import GenerationWorker, PromptJob, WorkerGroup
from rollout.types import GenResult, SamplingParams

log = logging.getLogger("rl.grpo.driver")


# ------------------------------------------------------------------------------------------------
# Ray


def connect_ray(cfg: GRPOConfig) -> bool:
    """Connect to a cluster or start a private local Ray; returns True when this process called
    `ray.init` (and must call `ray.shutdown`).

    With an address (`workers.cluster_address`, or RAY_ADDRESS as under `ray job submit`) it connects
    without resource arguments (the cluster owns them). Without one it starts its own local instance
    (`address="local"`), even when another cluster (`ray start --head`) runs on this machine: Ray's
    default would attach to that cluster instead."""
    if ray.is_initialized():
        return False
    sec = cfg.workers
    address = sec.cluster_address or ("auto" if os.environ.get("RAY_ADDRESS") else None)
    if address:
        ray.init(address=address, log_to_driver=True)
        return True
    ray.init(**local_ray_kwargs(cfg))
    return True


def local_ray_kwargs(cfg: GRPOConfig) -> dict[str, Any]:
    """`ray.init` arguments of the private local cluster: a new instance (`address="local"`, never one
    found on the machine), dashboard (and with it the job server) off unless `workers.local_dashboard`,
    and bound to `workers.dashboard_host` (127.0.0.1 by default) either way."""
    sec = cfg.workers
    need = cfg.learner.num_cpus * cfg.learner.ranks + sec.num_workers * sec.num_cpus
    return {"address": "local", "num_cpus": max(os.cpu_count() or 1, math.ceil(need)), "include_dashboard": sec.local_dashboard,
            "dashboard_host": sec.dashboard_host, "log_to_driver": True}


def preflight(cfg: GRPOConfig, init_dir: str | None = None):
    """Checks that need no Ray and write nothing: the task's data, every reward spec, the tokenizer
    against the model's vocabulary. Bad inputs fail here, before any cluster or output directory
    exists. Returns (task, tokenizer)."""
    task = make_task(cfg.task.name, cfg.task.path, seed=cfg.seed, eval_path=cfg.task.eval_path,
                     prompt_key=cfg.task.prompt_key, **cfg.task.kwargs)
    for i, r in enumerate(cfg.rewards):
        RewardSpec.from_config(to_dict(r), f"rewards[{i}]").load()   # file exists, imports, has the function
    if cfg.tools:
        check_tools(cfg)                                               # every tool spec loads
    if cfg.learner.backend == "deepspeed":       # a missing C++ compiler fails here, not in the learner actor
        ds_ops.check_ops(deepspeed_config(cfg.learner, torch.cuda.is_available() and cfg.learner.num_gpus > 0))
    tokenizer = build_tokenizer(cfg.model)
    vocab = model_vocab_size(cfg.model, init_dir)
    if len(tokenizer) > vocab:
        raise ConfigError(f"tokenizer {cfg.model.tokenizer!r} has {len(tokenizer)} tokens but the model's "
                          f"vocab_size is {vocab}")
    return task, tokenizer


def model_vocab_size(sec, init_dir: str | None = None) -> int:
    """The policy's vocab_size from its config alone (a checkpoint's config.json, or the preset)."""
    src = init_dir or sec.path
    if src is not None:
        return int(load_model_config(src).vocab_size)
    return int(BitMambaConfig.preset(sec.preset, **sec.overrides).vocab_size)


def get_user(ref):
    """`ray.get`, re-raising a user error (`BitMambaError`: a full disk, a corrupt checkpoint) raised
    inside an actor as itself, so the CLI prints its one-line message instead of a remote traceback."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, BitMambaError):
            raise e.cause from None
        raise


def worker_class(cfg: GRPOConfig) -> tuple[type, dict[str, Any]]:
    """The generation actor's class and extra constructor kwargs: with `tools`, the agent loop
    (`rl.grpo.agent_worker.AgentGenerationWorker`, imported only then)."""
    if not cfg.tools:
        return GenerationWorker, {}
    from rl.grpo.agent_worker import AgentGenerationWorker
    return AgentGenerationWorker, {"tools": list(cfg.tools), "agent": to_dict(cfg.agent),
                                   "base_dir": cfg.tools_base_dir}


TRAJECTORY_FIELDS = ("tool_calls", "final_text")


def reward_fields(row: dict[str, Any], result: GenResult) -> dict[str, Any]:
    """One sample's reward-row fields: the task row's (without the prompt) plus, for agent rollouts,
    the trajectory from `result.meta`: `tool_calls`, `final_text`, and `messages` = the row's prompt
    messages followed by the completion's assistant/tool turns."""
    out = {k: v for k, v in row.items() if k != "prompt"}
    meta = result.meta or {}
    out.update({k: meta[k] for k in TRAJECTORY_FIELDS if k in meta})
    if "messages" in meta:
        out["messages"] = list(row.get("messages", [])) + list(meta["messages"])
    return out


# ------------------------------------------------------------------------------------------------
# Prompts


@dataclass
class PromptRow:
    index: int                 # train-split row index (the data position)
    row: dict[str, Any]        # the task row (prompt, reward fields)
    ids: list[int]             # prompt token ids (after truncation)


@dataclass
class PromptSource:
    """The train stream with the context-limit policy; `pos` is all the state resume needs."""

    task: Any
    tokenizer: Any
    limit: int                 # longest allowed prompt in tokens
    policy: str                # truncate | drop
    pos: int = 0
    truncated: int = 0
    dropped: int = 0

    def encode(self, text: str, count: bool = True) -> list[int] | None:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) <= self.limit:
            return ids
        if self.policy == "drop":
            self.dropped += count
            return None
        self.truncated += count
        return ids[-self.limit:]          # keep the end of the prompt (where the question is)

    def take(self, count: int) -> list[PromptRow]:
        out: list[PromptRow] = []
        misses = 0
        while len(out) < count:
            row = self.task.row("train", self.pos)
            ids = self.encode(row["prompt"])
            if ids is not None:
                out.append(PromptRow(self.pos, row, ids))
                misses = 0
            else:
                misses += 1
                if misses > 1000:
                    raise ConfigError(f"1000 prompts in a row exceed the context limit of {self.limit} tokens "
                                      "(model.max_seq_len - sampling.max_new_tokens - 1)")
            self.pos += 1
        return out


def sample_digest(results: list[GenResult]) -> int:
    """crc32 of the sample ids and token ids of a rollout (logged, so that replays can be compared)."""
    crc = 0
    for r in results:
        crc = zlib.crc32(f"{r.request_id}/{r.sample_index}:{','.join(map(str, r.token_ids))};".encode(), crc)
    return crc


def rollout_metrics(rewards: list[float | None], results: list[GenResult], kept: list[GenResult]) -> dict[str, float]:
    """Reward and length statistics of every sample generated in a step (kept or not)."""
    vals = [r for r in rewards if r is not None]
    mean = sum(vals) / len(vals) if vals else float("nan")
    lens = [r.num_tokens for r in results]
    n = max(len(results), 1)
    return {
        "reward_mean": mean,
        "reward_std": math.sqrt(sum((r - mean) ** 2 for r in vals) / len(vals)) if vals else float("nan"),
        "response_len_mean": sum(lens) / n,
        "response_len_max": float(max(lens, default=0)),
        "response_sampled_len_mean": sum(sum(r.sampled_mask) if r.sampled_mask else r.num_tokens
                                         for r in results) / n,
        "response_clip_ratio": sum(r.finish_reason == "length" for r in results) / n,
        "rollout/sample_crc32": float(sample_digest(kept)),
        "rollout/tokens": float(sum(lens)),
    }


# ------------------------------------------------------------------------------------------------
# One rollout batch


@dataclass
class Rollout:
    prompts: list[PromptRow]
    results: list[GenResult]             # [len(prompts) * G], grouped
    rewards: list[float | None]          # [N] after shaping
    advantages: list[float]              # [N]
    valid: list[bool]                    # [N]
    start_pos: int                       # data position before this rollout took its prompts
    metrics: dict[str, float] = field(default_factory=dict)
    policy_version: int = 0              # the workers' policy version (completed steps) when generated


class Driver:
    """Owns the actors, the reward pool and the run state; `run()` is the loop."""

    def __init__(self, cfg: GRPOConfig, init_dir: str | None = None):
        try:
            self._setup(cfg, init_dir)
        except BaseException:
            self.close()
            raise

    def _setup(self, cfg: GRPOConfig, init_dir: str | None) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.task, self.tokenizer = preflight(cfg, init_dir)
        check_run_dir(self.out, GRPO_ENTRIES, cfg.resume, cfg.overwrite)   # a reused directory: refuse early
        self.owns_ray = connect_ray(cfg)
        limit = cfg.model.max_seq_len - cfg.sampling.max_new_tokens - 1
        self.prompts = PromptSource(self.task, self.tokenizer, limit, cfg.task.prompt_too_long)
        if cfg.learner.ranks > 1:            # a learner group, driven like one actor (rl/grpo/learner_group.py)
            self.learner = LearnerGroup(cfg, init_dir)
        else:
            RemoteLearner = ray.remote(num_cpus=cfg.learner.num_cpus, num_gpus=cfg.learner.num_gpus)(Learner)
            self.learner = RemoteLearner.remote(cfg, init_dir)
        self.learner_gpu = ray.get(self.learner.gpu.remote())
        model_config = ray.get(self.learner.get_model_config.remote())
        if len(self.tokenizer) > model_config["vocab_size"]:
            raise ConfigError(f"tokenizer {cfg.model.tokenizer!r} has {len(self.tokenizer)} tokens but the model's "
                              f"vocab_size is {model_config['vocab_size']}")
        worker_cls, worker_kwargs = worker_class(cfg)
        RemoteWorker = ray.remote(num_cpus=cfg.workers.num_cpus, num_gpus=cfg.workers.num_gpus)(worker_cls)
        self.workers = WorkerGroup(RemoteWorker, {"model_config": model_config, "model_section": cfg.model,
                                                  "slots": cfg.workers.engine_slots, **worker_kwargs},
                                   cfg.workers.num_workers, cfg.workers.max_restarts)
        self.rewards = RewardPool([to_dict(r) for r in cfg.rewards], num_workers=cfg.reward_pool.num_workers,
                                  timeout_s=cfg.reward_pool.timeout_s, fallback=cfg.reward_pool.fallback)
        if cfg.overwrite:                                # only once every input has been checked
            clear_run(self.out, GRPO_ENTRIES)
        self.out.mkdir(parents=True, exist_ok=True)
        self.ckpt = CheckpointManager(self.out / "checkpoints", keep=cfg.keep_checkpoints)
        self.step = 0
        self.producer: RolloutProducer | None = None
        self.staleness_seen: list[int] = []          # per step of this invocation
        self.workers_lock = threading.RLock()        # workers driven by one thread at a time (rl/grpo/async_rollout.py)
        if cfg.resume:
            self._resume()
        self.sync_stats = self.sync_weights()
        self.metrics = MetricsWriter(self.out, wandb={"project": cfg.wandb_project} if cfg.wandb else False,
                                     config=to_dict(cfg), resume_step=self.step if cfg.resume else None,
                                     console=False)

    # -------------------------------------------------------------- setup helpers
    def _resume(self) -> None:
        path = self.ckpt.latest()
        if path is None:
            warnings.warn(f"--resume: no complete checkpoint under {self.ckpt.root}; starting from step 0",
                          stacklevel=2)
            return
        extra = get_user(self.learner.load_checkpoint.remote(str(path)))
        self.step = int(extra["step"])
        self.prompts.pos = int(extra["data_pos"])
        restore_rng_state(extra["rng"])
        log.info("resumed from %s (step %d, data position %d)", path, self.step, self.prompts.pos)

    def sampling_params(self, n: int, temperature: float | None = None) -> SamplingParams:
        s = self.cfg.sampling
        return SamplingParams(max_new_tokens=s.max_new_tokens,
                              temperature=s.temperature if temperature is None else temperature,
                              top_k=s.top_k, top_p=s.top_p, min_p=s.min_p, stop_strings=list(s.stop_strings),
                              eos_token_id=self.tokenizer.eos_token_id, n=n, seed=0)

    def sync_weights(self) -> dict[str, float]:
        """Learner -> every worker: by CUDA IPC on the learner's GPU, else through the object store (once).
        Under `workers_lock`: waits for a batch the producer is generating (it ends on the old weights)."""
        with self.workers_lock:
            return sync_to_workers(self.learner, self.workers, self.cfg.workers.weight_sync, self.learner_gpu)

    # -------------------------------------------------------------- rollout
    def generate(self, rows: list[PromptRow], n: int, salt: int = 0, temperature: float | None = None,
                 split: str = "train") -> tuple[list[GenResult], dict]:
        jobs = [PromptJob(f"{split}-{r.index:09d}", r.ids, job_seed(self.cfg.seed, r.index, salt)) for r in rows]
        return self.workers.generate(jobs, self.sampling_params(n, temperature))

    def score(self, rows: list[PromptRow], results: list[GenResult], n: int):
        prompts = [rows[i // n].row["prompt"] for i in range(len(results))]
        fields = [reward_fields(rows[i // n].row, r) for i, r in enumerate(results)]
        completions = [r.text or "" for r in results]
        return self.rewards.score(prompts, completions, fields)

    def decision_rewards(self, scored) -> list[float | None]:
        """The task reward that dynamic sampling decides on: the weighted sum of the reward functions named
        in `algo.dynamic_sampling_rewards` (all of them by default), never the overlong shaping."""
        names = self.cfg.algo.dynamic_sampling_rewards
        if names is None:
            return list(scored.rewards)
        unknown = sorted(set(names) - set(scored.per_function))
        if unknown:
            raise ConfigError(f"algo.dynamic_sampling_rewards: {unknown} name no reward function "
                              f"(known: {sorted(scored.per_function)})")
        w = self.rewards.weights
        cols = [scored.per_function[k] for k in names]
        return [None if any(c[i] is None for c in cols) else sum(w[k] * c[i] for k, c in zip(names, cols))
                for i in range(len(scored.rewards))]

    def prompts_to_draw(self, need: int, kept: int, seen: int) -> int:
        """Prompts for the next generate round: `need` at first; when refilling, `need` divided by the share of
        informative groups seen so far (at least a quarter), so one round usually fills the batch."""
        if seen == 0:
            return need
        share = max(kept / seen, 0.25)
        return min(math.ceil(need / share), 4 * need)

    def rollout(self) -> Rollout:
        """Steps 1-4: prompts -> groups -> rewards -> advantages (+ dynamic sampling rounds)."""
        cfg, G = self.cfg, self.cfg.group_size
        kept_rows: list[PromptRow] = []
        kept_res: list[GenResult] = []
        kept_rew: list[float | None] = []
        t_gen = t_score = 0.0
        m: dict[str, float] = {}
        all_rewards: list[float | None] = []
        all_results: list[GenResult] = []
        zero_std = groups_seen = informative = 0
        rounds = 0
        score_metrics: dict[str, float] = {}
        need = cfg.prompts_per_step
        start_pos = self.prompts.pos
        too_long = (self.prompts.truncated, self.prompts.dropped)
        while need > 0:
            rows = self.prompts.take(self.prompts_to_draw(need, informative, groups_seen))
            t0 = time.perf_counter()
            results, wstats = self.generate(rows, G)
            t_gen += time.perf_counter() - t0
            for k, v in wstats.items():
                m[k] = m.get(k, 0.0) + v
            t0 = time.perf_counter()
            scored = self.score(rows, results, G)
            t_score += time.perf_counter() - t0
            if not score_metrics:
                score_metrics = scored.metrics("reward/")
            rewards = list(scored.rewards)
            if cfg.algo.overlong_buffer > 0:
                pen = algo.overlong_penalty([r.num_tokens for r in results], cfg.sampling.max_new_tokens,
                                            cfg.algo.overlong_buffer, cfg.algo.overlong_factor).tolist()
                rewards = [None if r is None else r + p for r, p in zip(rewards, pen)]
            all_rewards += rewards
            all_results += results
            keep = algo.informative_groups(self.decision_rewards(scored), G).tolist()
            zero_std += keep.count(False)
            informative += keep.count(True)
            groups_seen += len(keep)
            for g, ok in enumerate(keep):
                if ok or not cfg.algo.dynamic_sampling:
                    kept_rows.append(rows[g])
                    kept_res += results[g * G:(g + 1) * G]
                    kept_rew += rewards[g * G:(g + 1) * G]
            rounds += 1
            if not cfg.algo.dynamic_sampling or rounds > cfg.algo.max_resample_rounds:
                break
            need = cfg.prompts_per_step - len(kept_rows)
        kept_rows, kept_res, kept_rew = (kept_rows[:cfg.prompts_per_step], kept_res[:cfg.prompts_per_step * G],
                                         kept_rew[:cfg.prompts_per_step * G])
        if (self.prompts.truncated, self.prompts.dropped) != too_long:
            log.warning("prompts longer than %d tokens so far: %d truncated, %d dropped (task.prompt_too_long=%s)",
                        self.prompts.limit, self.prompts.truncated, self.prompts.dropped, self.prompts.policy)
        adv, valid = algo.group_advantages(kept_rew, G, mode=cfg.algo.advantage, eps=cfg.algo.adv_eps)
        m.update(score_metrics)
        m.update(rollout_metrics(all_rewards, all_results, kept_res))
        m.update({
            "frac_zero_std_groups": zero_std / max(groups_seen, 1),
            "rollout/rounds": float(rounds),
            "rollout/groups_kept": float(len(kept_rows)),
            "time/generate": t_gen,
            "time/score": t_score,
            "tokens_per_s": m["rollout/tokens"] / t_gen if t_gen > 0 else 0.0,
            "data/position": float(self.prompts.pos),
            "data/prompts_truncated": float(self.prompts.truncated),
            "data/prompts_dropped": float(self.prompts.dropped),
        })
        if cfg.tools:
            from rl.grpo.agent_worker import agent_result_metrics
            m.update(agent_result_metrics(all_results))
        return Rollout(kept_rows, kept_res, kept_rew, adv.tolist(), valid.tolist(), start_pos, m)

    def train_batch(self, ro: Rollout) -> TrainBatch:
        masks = []
        for r, ok in zip(ro.results, ro.valid):
            keep = ok and not (self.cfg.algo.mask_truncated and r.finish_reason == "length")
            sm = r.sampled_mask or [1] * len(r.token_ids)
            masks.append([float(s) if keep else 0.0 for s in sm])
        return TrainBatch(prompt_ids=[list(r.prompt_ids) for r in ro.results],
                          completion_ids=[list(r.token_ids) for r in ro.results],
                          rollout_logprobs=[list(r.logprobs) for r in ro.results],   # the sampled distribution
                          loss_mask=masks, advantages=list(ro.advantages))

    # -------------------------------------------------------------- eval / checkpoint
    def evaluate(self) -> dict[str, float]:
        cfg, n = self.cfg, self.cfg.eval_samples
        rows = []
        for i in range(cfg.task.eval_size):
            row = self.task.row("eval", i)
            ids = self.prompts.encode(row["prompt"], count=False)
            if ids is not None:
                rows.append(PromptRow(i, row, ids))
        if not rows:
            return {}
        t0 = time.perf_counter()
        results, _ = self.generate(rows, n, temperature=cfg.eval_temperature, split="eval")
        scored = self.score(rows, results, n)
        vals = [r for r in scored.rewards if r is not None]
        p1, pk = [], []
        for g in range(len(rows)):
            rs = scored.rewards[g * n:(g + 1) * n]
            c = sum(1 for r in rs if r is not None and r >= cfg.eval_correct_threshold)
            p1.append(algo.pass_at_k(n, c, 1))
            pk.append(algo.pass_at_k(n, c, cfg.eval_k))
        mean1 = sum(p1) / len(p1)
        # standard error of the mean over prompts (each prompt's pass@1 is one observation)
        se1 = math.sqrt(sum((p - mean1) ** 2 for p in p1) / (len(p1) - 1) / len(p1)) if len(p1) > 1 else 0.0
        return {"eval/reward_mean": sum(vals) / max(len(vals), 1), "eval/pass@1": mean1,
                "eval/pass@1_stderr": se1, f"eval/pass@{cfg.eval_k}": sum(pk) / len(pk),
                "time/eval": time.perf_counter() - t0}

    def checkpoint(self) -> str:
        """The learner writes the checkpoint (weights, optimizer, config.json); the driver adds the
        tokenizer, so every checkpoint is a complete model directory (`generate`, `eval --gen`). After
        the last step the model is also published as `output_dir/final`, like the supervised stages'."""
        extra = {"step": self.step, "data_pos": self.data_position(), "rng": capture_rng_state(),
                 "config": to_dict(self.cfg)}
        path = get_user(self.learner.save_checkpoint.remote(str(self.ckpt.root), self.step, extra,
                                                             self.cfg.keep_checkpoints))
        files = tokenizer_files(self.tokenizer)
        add_files(path, files)
        if self.step == self.cfg.steps:
            publish_final(path, self.out / "final", list(files))
        return path

    # -------------------------------------------------------------- the loop
    def run(self) -> dict[str, float]:
        cfg = self.cfg
        last: dict[str, float] = {}
        self.producer = self.start_producer()
        while self.step < cfg.steps:
            self.step += 1
            t_step = time.perf_counter()
            ro, staleness = self.next_rollout()                                   # 1-4
            batch = self.train_batch(ro)
            t0 = time.perf_counter()
            empty = len(batch) == 0 or not any(any(m) for m in batch.loss_mask)
            if empty:   # dynamic sampling found no informative group: nothing to learn from this step
                log.warning("step %d: no sample carries a learning signal; update skipped", self.step)
            update = None if empty else self.learner.update.remote(batch)        # 5 (a producer generates on)
            learn = {"learn/skipped": 1.0} if update is None else {**ray.get(update), "learn/skipped": 0.0}
            self._check_finite(learn)
            t_learn = time.perf_counter() - t0
            sync = self.sync_weights() if update is not None else {"sync/seconds": 0.0, "sync/bytes": 0.0}  # 6
            if self.producer is not None:
                self.producer.set_version(self.step)
            m = dict(ro.metrics)
            m.update(learn)
            m.update(sync)
            m.update(self.staleness_metrics(ro, staleness))
            m.update({"time/learn": t_learn, "time/sync": sync["sync/seconds"],
                      "time/step": time.perf_counter() - t_step, "policy_version": float(self.step)})
            if cfg.eval_every > 0 and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
                with self.workers_lock:
                    m.update(self.evaluate())                                      # 7
            if (cfg.checkpoint_every > 0 and self.step % cfg.checkpoint_every == 0) or self.step == cfg.steps:
                self.checkpoint()
            last = self.metrics.log(self.step, **m)
            print(progress_line(self.step, cfg.steps, m), file=sys.stderr, flush=True)
        return last

    def start_producer(self) -> RolloutProducer | None:
        """With `max_staleness` > 0 (or `one_step_off_policy`), the background producer of rollouts
        (rl/grpo/async_rollout.py); None on-policy, where each step generates its own batch."""
        bound = self.cfg.staleness_bound
        if bound == 0 or self.step >= self.cfg.steps:
            return None
        return RolloutProducer(self.rollout, lambda: self.prompts.pos, bound, version=self.step,
                               batches=self.cfg.steps - self.step, lock=self.workers_lock).start()

    def next_rollout(self) -> tuple[Rollout, int]:
        """This step's batch and its staleness (learner version minus the batch's policy version)."""
        if self.producer is None:
            ro = self.rollout()
            ro.policy_version = self.step - 1
            return ro, 0
        return self.producer.take(learner_version=self.step - 1)

    def staleness_metrics(self, ro: Rollout, staleness: int) -> dict[str, float]:
        """`rollout/staleness` of this step's batch, its mean and max over this invocation's steps, and the
        batches dropped as too stale so far."""
        self.staleness_seen.append(staleness)
        seen = self.staleness_seen
        return {"rollout/staleness": float(staleness), "rollout/staleness_mean": sum(seen) / len(seen),
                "rollout/staleness_max": float(max(seen)), "rollout/policy_version": float(ro.policy_version),
                "rollout/start_position": float(ro.start_pos),
                "rollout/dropped_stale": float(self.producer.dropped if self.producer is not None else 0)}

    def data_position(self) -> int:
        """The data position a checkpoint saves: the start of the oldest batch drawn but not yet trained
        (generated ahead by the producer), so a resume draws those prompts again."""
        return self.producer.resume_position() if self.producer is not None else self.prompts.pos

    def _check_finite(self, learn: dict[str, float]) -> None:
        """A step whose every optimizer step was skipped (NaN/inf loss or gradient) is a bad step;
        `max_bad_steps` of them in a row stop the run."""
        skipped = learn.get("learn/skipped_steps", 0.0)
        if learn.get("learn/skipped", 0.0) or skipped < learn.get("learn/optimizer_steps", 1.0):
            self.bad_in_a_row = 0
            return
        self.bad_in_a_row = getattr(self, "bad_in_a_row", 0) + 1
        cause = ("non-finite loss in every micro-batch (NaN/inf rollout log-probs, rewards or advantages)"
                 if learn.get("learn/bad_micro_batches", 0.0) else
                 f"non-finite gradient (grad norm {learn.get('learn/grad_norm', float('nan'))})")
        log.warning("step %d: update skipped: %s", self.step, cause)
        if self.bad_in_a_row >= self.cfg.max_bad_steps:
            raise TrainingDiverged(
                f"stopping at step {self.step}: {self.bad_in_a_row} consecutive GRPO steps skipped ({cause}). "
                f"Likely cause: learning rate too high (learner.lr {self.cfg.learner.lr:.3g}) or diverged "
                f"weights, or a reward function returning NaN/inf; the last checkpoint is intact")

    def close(self) -> None:
        """Stop everything this driver started (also after a failed __init__: parts may be missing, and
        after the cluster went away: each part is stopped on its own, a failure logged, not raised)."""
        producer = getattr(self, "producer", None)
        if producer is not None:
            producer.close(timeout_s=0)              # starts nothing more; a batch in progress fails below
        stops = {"metrics": lambda m: m.close(), "rewards": lambda r: r.close(),
                 "workers": lambda w: w.shutdown(),
                 "learner": lambda a: a.shutdown() if isinstance(a, LearnerGroup) else ray.kill(a, no_restart=True)}
        for attr, stop in stops.items():
            part = getattr(self, attr, None)
            if part is None:
                continue
            try:
                stop(part)
            except Exception as e:          # the cluster may be gone: keep stopping the rest
                log.warning("close: stopping the %s failed: %s: %s", attr, type(e).__name__, e)
        if producer is not None:
            producer.close(timeout_s=10)
        if getattr(self, "owns_ray", False):
            ray.shutdown()


def progress_line(step: int, total: int, m: dict[str, float]) -> str:
    """One console line per step: the numbers worth watching (all of them are in metrics.jsonl)."""
    width = 20
    done = int(width * step / max(total, 1))
    parts = [f"[{'#' * done}{'.' * (width - done)}] step {step}/{total}",
             f"reward {m.get('reward_mean', float('nan')):.3f}",
             f"zero-std {m.get('frac_zero_std_groups', 0):.2f}",
             f"len {m.get('response_len_mean', 0):.1f}",
             f"kl/mismatch {m.get('learn/mismatch_kl', 0):.1e}",
             f"gen {m.get('time/generate', 0):.2f}s learn {m.get('time/learn', 0):.2f}s "
             f"sync {m.get('time/sync', 0):.2f}s"]
    if "eval/reward_mean" in m:
        parts.append(f"EVAL reward {m['eval/reward_mean']:.3f} pass@1 {m['eval/pass@1']:.3f}")
    return " | ".join(parts)


class RunAborted(BitMambaError):
    """The run cannot go on (its Ray cluster went away, the learner died); checkpoints are intact."""


# what a lost cluster or a dead actor raises in the driver (a dead worker is restarted by WorkerGroup)
RAY_LOST = (ray.exceptions.RayActorError, ray.exceptions.RaySystemError, ray.exceptions.ObjectLostError,
            ray.exceptions.OwnerDiedError, ConnectionError, LearnerGroupError)


def aborted_message(driver: "Driver", e: BaseException) -> str:
    """One line: what died, at which step, and the checkpoint to `--resume` from."""
    if isinstance(e, ray.exceptions.RayTaskError) and isinstance(e.cause, LearnerGroupError):
        e = e.cause                          # raised in the group's waiter task: its own one-line message
    what = ("the learner actor died" if isinstance(e, ray.exceptions.RayActorError) else
            "a learner rank failed" if isinstance(e, LearnerGroupError) else "the Ray cluster went away")
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    latest = driver.ckpt.latest() if getattr(driver, "ckpt", None) is not None else None
    keep = (f"last checkpoint intact: {latest} (continue with --resume)" if latest is not None
            else "no checkpoint was written yet")
    return (f"GRPO stopped at step {getattr(driver, 'step', 0)}: {what} ({type(e).__name__}: {first}); {keep}; "
            f"a learner killed for memory shows in `dmesg` / the Ray logs under /tmp/ray/session_latest/logs")


def run(cfg: GRPOConfig, init_dir: str | None = None) -> dict[str, float]:
    """Run GRPO to `cfg.steps`; returns the last step's metrics record. A lost Ray cluster or a dead
    learner ends the run with `RunAborted` (one line naming the last checkpoint), not a traceback."""
    driver = Driver(cfg, init_dir)
    try:
        return driver.run()
    except RAY_LOST as e:
        raise RunAborted(aborted_message(driver, e)) from None
    finally:
        driver.close()


def parse_args(argv: list[str]) -> argparse.Namespace:
    return grpo_parser().parse_args(argv)         # declared in rl.args (no torch: `--help` is instant)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    if args.resume:
        overrides.append("resume=true")
    if args.overwrite:
        overrides.append("overwrite=true")
    cfg = load_grpo_config(args.config, overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    last = run(cfg, init_dir=args.init)
    print(f"done: {cfg.steps} steps, reward_mean {last.get('reward_mean', float('nan')):.3f}, "
          f"output in {cfg.output_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from rl.args import run_main

    sys.exit(run_main(main, sys.argv[1:]))
