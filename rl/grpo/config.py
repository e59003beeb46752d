"""Typed configuration of a GRPO run (`configs/grpo_*.yaml`).

    cfg = load_grpo_config("configs/grpo_tiny.yaml", overrides=["learner.lr=3e-5"])

Loaded with `model.typed.load_config`: unknown keys, wrong types and conflicting options raise
`ConfigError` naming the key and the file. Nothing here is silently rewritten.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from model.config import BitMambaConfig
from model.errors import ConfigError
from model.lm import BitMambaLM
from model.typed import load_config
from rollout.agent.loop import AgentConfig
from rollout.types import SamplingParams
from rollout.tokenizer import build_tiny_tokenizer, load_tokenizer
from rollout.agent.loader import load_tools


@dataclass
class ModelSection:
    """Where the policy comes from: exactly one of `path` (a `save_pretrained` directory) and
    `preset` (a `BitMambaConfig.preset` name, randomly initialised with `init_seed`)."""

    RENAMED = {"ssm_state": "ssm_dtype"}

    path: str | None = None
    preset: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)   # preset field overrides (e.g. vocab_size)
    init_seed: int = 0
    tokenizer: str = "tiny"            # "tiny" (rollout.tokenizer.build_tiny_tokenizer) or a path
    max_seq_len: int = 512             # context limit: prompt + completion tokens
    backend: Literal["auto", "torch", "fast"] = "auto"   # decode backend of the generation workers
    ssm_dtype: Literal["float32", "bfloat16"] = "float32"   # the workers' SSM state (bf16: faster, more mismatch)

    def __post_init__(self):
        if (self.path is None) == (self.preset is None):
            raise ConfigError("model: give exactly one of model.path and model.preset")
        if self.max_seq_len < 2:
            raise ConfigError(f"model.max_seq_len: must be >= 2, got {self.max_seq_len}")


@dataclass
class TaskSection:
    """Prompts: a synthetic task of `rl/grpo/tasks.py` (`name`) or a JSONL file (`path`, one object per
    line with `prompt_key` and the reward's fields). Giving neither means `name: arithmetic`."""

    DEFAULT_NAME = "arithmetic"

    name: str | None = None
    path: str | None = None
    eval_path: str | None = None
    prompt_key: str = "prompt"
    kwargs: dict[str, Any] = field(default_factory=dict)     # task options (e.g. max_operand)
    eval_size: int = 64                                        # held-out prompts for eval
    prompt_too_long: Literal["truncate", "drop"] = "drop"      # prompts longer than the context

    def __post_init__(self):
        if self.name is not None and self.path is not None:
            raise ConfigError(f"task: give one of task.name ({self.name!r}) and task.path ({self.path!r}), not both")
        if self.name is None and self.path is None:
            self.name = self.DEFAULT_NAME
        if self.path is not None and self.kwargs:
            raise ConfigError(f"task.kwargs {sorted(self.kwargs)} only apply to a synthetic task (task.name), "
                              "not to task.path")
        if self.eval_size < 0:
            raise ConfigError(f"task.eval_size: must be >= 0, got {self.eval_size}")


# Modules of ours that configs name in `module:attr` specs, under the paths they had before the package
# layout of rl/ (rl/train, rl/grpo, rl/eval) and rollout/agent: a spec naming one is refused with the new path.
MOVED_MODULES = {
    "rl.tasks": "rl.grpo.tasks", "rl.tool_task_defs": "rl.grpo.tasks", "rl.reasoning_tasks": "rl.grpo.reasoning_tasks",
    "rl.tool_tasks": "rl.grpo.tasks", "rollout.tools": "rollout.agent.tools",
}


def check_spec_module(spec: str, where: str) -> None:
    """Raise a `ConfigError` naming the new module when `spec` (`module:attr`) names a moved module."""
    module = spec.split(":", 1)[0].strip()
    if module in MOVED_MODULES:
        new = MOVED_MODULES[module]
        raise ConfigError(f"{where}: module {module!r} is now {new!r}; write {spec.replace(module, new, 1)!r}")


@dataclass
class RewardItem:
    """One reward function (see rewards.load_reward): built-in name, file.py:fn or module:fn."""

    spec: str
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)
    timeout_s: float | None = None
    fallback: float | None = None
    name: str | None = None

    def __post_init__(self):
        check_spec_module(self.spec, "rewards[].spec")


@dataclass
class RewardPoolSection:
    num_workers: int = 2
    timeout_s: float = 10.0
    fallback: float = 0.0              # reward of a sample whose function raised or timed out

    def __post_init__(self):
        if self.num_workers < 0:
            raise ConfigError(f"reward_pool.num_workers: must be >= 0, got {self.num_workers}")
        if self.timeout_s <= 0:
            raise ConfigError(f"reward_pool.timeout_s: must be > 0, got {self.timeout_s}")


@dataclass
class SamplingSection:
    """The rollout's `SamplingParams` a GRPO config may set (defaults: SamplingParams', except the
    completion budget, which a GRPO config sizes to its task: 32 fits the synthetic tasks' answers).
    Repetition penalties are left out: the learner cannot score the distribution they sample from."""

    max_new_tokens: int = 32
    temperature: float = SamplingParams.temperature
    top_k: int = SamplingParams.top_k
    top_p: float = SamplingParams.top_p
    min_p: float = SamplingParams.min_p
    stop_strings: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ConfigError(f"sampling.max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ConfigError("sampling.temperature: must be > 0 for GRPO (greedy groups carry no signal)")


@dataclass
class AlgoSection:
    advantage: Literal["grpo", "drgrpo"] = "grpo"
    adv_eps: float = 1e-6
    clip_low: float = 0.2
    clip_high: float = 0.28
    aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-sum-const"] = "token-mean"
    seq_sum_const: float | None = None  # Dr. GRPO constant; None -> sampling.max_new_tokens
    kl_coef: float = 0.0                 # > 0 keeps a frozen reference model in the learner
    tis_cap: float | None = 2.0          # truncated IS cap against rollout log-probs; None = off
    clip_ratio_c: float | None = None    # dual-clip bound for negative advantages (veRL uses 3.0); None = off
    dynamic_sampling: bool = False       # drop groups whose task reward is all equal and draw more prompts
    dynamic_sampling_rewards: list[str] | None = None   # reward names deciding that; None: all (no shaping)
    max_resample_rounds: int = 3         # extra generate rounds per step when dynamic sampling
    overlong_buffer: int = 0             # DAPO soft overlong punishment ramp (tokens); 0 = off
    overlong_factor: float = 1.0
    mask_truncated: bool = False         # completions cut at max_new_tokens get no loss

    def __post_init__(self):
        if not (0 <= self.clip_low < 1):
            raise ConfigError(f"algo.clip_low: must be in [0, 1), got {self.clip_low}")
        if self.clip_high < 0:
            raise ConfigError(f"algo.clip_high: must be >= 0, got {self.clip_high}")
        if self.kl_coef < 0:
            raise ConfigError(f"algo.kl_coef: must be >= 0, got {self.kl_coef}")
        if self.tis_cap is not None and self.tis_cap < 1:
            raise ConfigError(f"algo.tis_cap: must be >= 1 (or null), got {self.tis_cap}")
        if self.overlong_buffer < 0:
            raise ConfigError(f"algo.overlong_buffer: must be >= 0, got {self.overlong_buffer}")
        if self.clip_ratio_c is not None and self.clip_ratio_c <= 1:
            raise ConfigError(f"algo.clip_ratio_c: must be > 1 (or null), got {self.clip_ratio_c}")


@dataclass
class LearnerSection:
    """The DeepSpeed learner. `deepspeed` passes through to `deepspeed.initialize` and overrides the
    defaults built from the other keys (ZeRO-2, CPU-offloaded AdamW, bf16 on GPU).

    Ranks: `num_gpus` is the learner's GPUs in all. At most 1 (a GPU or a share of one, 0 on CPU) runs
    `num_ranks` ranks (default 1; more than one rank is refused on a GPU share: two ranks cannot share a
    GPU under NCCL). An integer N > 1 runs N ranks of one GPU each (`num_ranks` then left at 1 or set to N).
    `num_cpus` is per rank. Several ranks form a learner group (rl/grpo/learner_group.py)."""

    backend: Literal["deepspeed", "torch"] = "deepspeed"   # "torch": plain AdamW, warned at start
    lr: float = 1e-6
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"   # after the warmup, per optimizer step
    warmup_steps: int = 0                # optimizer steps of linear warmup from 0 to lr
    min_lr_ratio: float = 0.0            # cosine / linear: final lr = min_lr_ratio * lr
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    zero_stage: int = 2                  # 0-2; 3 shards the parameters over the ranks too
    offload_optimizer: bool = True
    bf16: bool | None = None             # None: bf16 on GPU, fp32 on CPU
    micro_batch_tokens: int = 4096       # token budget of one packed micro-batch (prompt + completion)
    packing: bool = True                 # samples end to end with seq_idx boundaries (false: padded rows)
    minibatches: int = 1                 # optimizer steps per rollout batch
    epochs: int = 1                      # passes over the rollout batch
    gradient_checkpointing: bool = False
    num_gpus: float = 0.0                # the learner's GPUs in all: <= 1 a share of one; N > 1: N ranks
    num_cpus: float = 1.0                # per rank
    num_ranks: int = 1                   # data-parallel learner ranks (CPU: gloo; see the class docstring)
    placement_timeout_s: float = 60.0    # a learner group not placed by then fails at start, resources named
    collective_timeout_s: float = 1800.0   # a rank waiting this long on a collective (a peer died) fails
    deepspeed: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.lr <= 0:
            raise ConfigError(f"learner.lr: must be > 0, got {self.lr}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"learner.zero_stage: must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.zero_stage == 3 and self.backend != "deepspeed":
            raise ConfigError("learner.zero_stage: 3 needs learner.backend 'deepspeed'")
        if self.num_gpus < 0:
            raise ConfigError(f"learner.num_gpus: must be >= 0, got {self.num_gpus}")
        if self.num_ranks < 1:
            raise ConfigError(f"learner.num_ranks: must be >= 1, got {self.num_ranks}")
        if self.num_gpus > 1:
            if self.num_gpus != int(self.num_gpus):
                raise ConfigError(f"learner.num_gpus: above 1 it counts whole GPUs (one rank each), got "
                                  f"{self.num_gpus}")
            if self.num_ranks not in (1, int(self.num_gpus)):
                raise ConfigError(f"learner.num_ranks: {self.num_ranks} conflicts with learner.num_gpus "
                                  f"{int(self.num_gpus)} (N GPUs run N ranks of one GPU each)")
        elif self.num_gpus > 0 and self.num_ranks > 1:
            raise ConfigError(f"learner.num_ranks: {self.num_ranks} ranks cannot share learner.num_gpus "
                              f"{self.num_gpus} (one GPU at most); give whole GPUs (num_gpus: N runs N ranks)")
        if self.ranks > 1 and self.backend != "deepspeed":
            raise ConfigError("learner.num_ranks / num_gpus: several learner ranks need learner.backend 'deepspeed'")
        if self.placement_timeout_s <= 0 or self.collective_timeout_s <= 0:
            raise ConfigError("learner.placement_timeout_s and learner.collective_timeout_s must be > 0")
        if self.warmup_steps < 0:
            raise ConfigError(f"learner.warmup_steps: must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"learner.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if self.micro_batch_tokens < 1 or self.minibatches < 1 or self.epochs < 1:
            raise ConfigError("learner.micro_batch_tokens, learner.minibatches and learner.epochs must be >= 1")

    @property
    def ranks(self) -> int:
        """How many learner ranks run: num_gpus when it is above 1, else num_ranks."""
        return int(self.num_gpus) if self.num_gpus > 1 else self.num_ranks

    @property
    def gpus_per_rank(self) -> float:
        return 1.0 if self.num_gpus > 1 else self.num_gpus


@dataclass
class WorkersSection:
    num_workers: int = 1
    num_gpus: float = 0.0                # per generation worker; fractional shares a GPU
    num_cpus: float = 1.0
    max_restarts: int = 3                # per step, restarts of dead workers before giving up
    cluster_address: str | None = None   # None: local Ray (or "auto" when RAY_ADDRESS is set)
    local_dashboard: bool = False        # local Ray: start the dashboard / job server (bound below)
    dashboard_host: str = "127.0.0.1"    # local Ray: dashboard / job server bind address
    engine_slots: int = 64               # rows decoded together per worker
    weight_sync: str = "auto"            # auto: CUDA IPC for workers on the learner's GPU | object_store

    def __post_init__(self):
        if self.weight_sync not in ("auto", "object_store"):
            raise ConfigError(f"workers.weight_sync: 'auto' or 'object_store', got {self.weight_sync!r}")
        if self.num_workers < 1:
            raise ConfigError(f"workers.num_workers: must be >= 1, got {self.num_workers}")
        if self.num_gpus < 0 or self.num_cpus < 0:
            raise ConfigError("workers.num_gpus and workers.num_cpus must be >= 0")


@dataclass
class AgentSection:
    """Per-episode limits of tool-using rollouts (used when `tools` is non-empty; see docs/tools.md),
    passed to `rollout.agent.loop.AgentConfig`."""

    max_tool_calls: int = 4              # calls per episode; the next one ends the episode
    max_total_tokens: int | None = None  # sampled + injected tokens; None: sampling.max_new_tokens
    tool_timeout_s: float = 10.0         # per call; a late tool gives the model a timeout message
    max_result_chars: int = 2000         # a longer tool result is cut, with a note
    tool_workers: int = 8                # threads per generation worker for synchronous tools

    def __post_init__(self):
        AgentConfig(**{k: getattr(self, k) for k in self.__dataclass_fields__})   # raises ConfigError


@dataclass
class GRPOConfig:
    model: ModelSection
    task: TaskSection = field(default_factory=TaskSection)
    rewards: list[RewardItem] = field(default_factory=lambda: [RewardItem(spec="math")])
    reward_pool: RewardPoolSection = field(default_factory=RewardPoolSection)
    group_size: int = 8
    prompts_per_step: int = 8
    steps: int = 100
    sampling: SamplingSection = field(default_factory=SamplingSection)
    algo: AlgoSection = field(default_factory=AlgoSection)
    learner: LearnerSection = field(default_factory=LearnerSection)
    workers: WorkersSection = field(default_factory=WorkersSection)
    tools: list[str | dict[str, Any]] = field(default_factory=list)   # non-empty: rollouts run the agent loop
    agent: AgentSection = field(default_factory=AgentSection)
    tools_base_dir: str | None = None    # where relative tool files resolve (relative: to the config's directory)
    max_staleness: int = 0               # policy versions a batch may lag the learner; 0 = on-policy
    one_step_off_policy: bool = False    # alias of max_staleness: 1 (with max_staleness 0 or 1 only)
    eval_every: int = 0                  # 0 = off; also evaluated after the last step when > 0
    eval_samples: int = 4                # completions per held-out prompt (pass@k needs k <= this)
    eval_k: int = 4
    eval_temperature: float = 1.0
    eval_correct_threshold: float = 1.0  # a sample counts as correct for pass@k when reward >= this
    checkpoint_every: int = 0            # 0 = only at the end
    max_bad_steps: int = 5               # consecutive steps whose update was skipped (NaN/inf) before stopping
    keep_checkpoints: int = 2
    resume: bool = False                 # continue the run in output_dir from its latest checkpoint
    overwrite: bool = False              # delete the run in output_dir and start over (else a reused dir is refused)
    seed: int = 0
    output_dir: str = "runs/grpo"
    wandb: bool = True                   # offline unless WANDB_MODE / WANDB_API_KEY say otherwise
    wandb_project: str = "bitmamba-rl"

    def __post_init__(self):
        if self.group_size < 2:
            raise ConfigError(f"group_size: must be >= 2 (advantages are relative within a group), got {self.group_size}")
        if self.prompts_per_step < 1 or self.steps < 0:
            raise ConfigError("prompts_per_step must be >= 1 and steps >= 0")
        if not self.rewards:
            raise ConfigError("rewards: at least one reward function")
        if self.max_staleness < 0:
            raise ConfigError(f"max_staleness: must be >= 0 (0 = on-policy), got {self.max_staleness}")
        if self.one_step_off_policy and self.max_staleness > 1:
            raise ConfigError(f"one_step_off_policy: true means max_staleness 1, but max_staleness is "
                              f"{self.max_staleness}; set only max_staleness")
        if self.max_bad_steps < 1:
            raise ConfigError(f"max_bad_steps: must be >= 1, got {self.max_bad_steps}")
        if self.eval_every > 0 and self.eval_k > self.eval_samples:
            raise ConfigError(f"eval_k ({self.eval_k}) must be <= eval_samples ({self.eval_samples})")
        total = self.group_size * self.prompts_per_step
        if total % self.learner.minibatches:
            raise ConfigError(f"learner.minibatches ({self.learner.minibatches}) must divide "
                              f"group_size * prompts_per_step ({total}) so every minibatch holds whole groups")
        if self.learner.minibatches > self.prompts_per_step:
            raise ConfigError(f"learner.minibatches ({self.learner.minibatches}) must be <= prompts_per_step "
                              f"({self.prompts_per_step})")
        s = self.sampling
        if (s.top_k > 0 or s.top_p < 1.0 or s.min_p > 0.0) and self.algo.tis_cap is None:
            raise ConfigError("sampling.top_k / top_p / min_p sample from a filtered distribution that the learner "
                              "(log_softmax(logits / T)) does not reproduce; algo.tis_cap must be set so importance "
                              "weights correct for the filter (docs/grpo.md)")
        if self.sampling.max_new_tokens >= self.model.max_seq_len:
            raise ConfigError(f"sampling.max_new_tokens ({self.sampling.max_new_tokens}) must be < "
                              f"model.max_seq_len ({self.model.max_seq_len}) to leave room for the prompt")

    @property
    def staleness_bound(self) -> int:
        """The policy versions a batch may lag the learner: `max_staleness`, or 1 with `one_step_off_policy`."""
        return 1 if self.one_step_off_policy else self.max_staleness

    @property
    def seq_sum_const(self) -> float:
        return float(self.algo.seq_sum_const or self.sampling.max_new_tokens)


def load_grpo_config(path: str | Path | None = None, overrides: list[str] | None = None,
                     data: dict | None = None) -> GRPOConfig:
    """Load and validate a GRPO config (file and/or dict, then `key=value` overrides).

    With `tools`, every tool spec is loaded once here (a bad one is a `ConfigError` naming it), with
    relative files resolved against `tools_base_dir`, which defaults to the config file's directory
    (the working directory without a file) and is stored absolute so workers resolve the same files."""
    cfg = load_config(GRPOConfig, path, overrides=overrides, data=data)
    if cfg.tools:
        default = Path(path).resolve().parent if path is not None else Path.cwd()
        cfg.tools_base_dir = os.path.abspath(os.path.join(default, cfg.tools_base_dir or "."))
        try:
            check_tools(cfg)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}" if path is not None else str(e)) from None
    return cfg


def check_tools(cfg: GRPOConfig) -> list:
    """Load the config's tools (imports user files; raises `ConfigError` naming a bad spec)."""
    for t in cfg.tools:
        spec = t.get("spec") if isinstance(t, dict) else t
        if isinstance(spec, str):
            check_spec_module(spec, "tools[].spec")
    return load_tools(cfg.tools, base_dir=cfg.tools_base_dir)


# ------------------------------------------------------------------------------------------------
# The objects a config names (shared by the learner, the workers and the demo)

TINY_TOKENIZER_VOCAB = 384


def build_model(sec: ModelSection, init_dir: str | None = None) -> BitMambaLM:
    """The policy: `init_dir` (a checkpoint / model directory) wins, else model.path, else the
    preset initialised from `init_seed` (independent of the global RNG)."""
    src = init_dir or sec.path
    if src is not None:
        return BitMambaLM.from_pretrained(src)
    cfg = BitMambaConfig.preset(sec.preset, **sec.overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(sec.init_seed)
        return BitMambaLM(cfg)


def model_from_config(config: dict) -> BitMambaLM:
    """A model of the given architecture (workers build one, then load the learner's weights)."""
    return BitMambaLM(BitMambaConfig.from_dict(config))


def build_tokenizer(sec: ModelSection):
    """`tiny` -> the embedded byte-level BPE (vocab 384); otherwise a tokenizer directory/name."""
    if sec.tokenizer == "tiny":
        return build_tiny_tokenizer(TINY_TOKENIZER_VOCAB)
    return load_tokenizer(sec.tokenizer)
