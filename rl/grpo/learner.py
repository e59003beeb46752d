"""The GRPO learner: a plain class around a DeepSpeed engine (Ray wraps it at launch, see rl/grpo/driver.py).

    learner = Learner(cfg)                      # builds the policy (and a frozen reference if kl_coef > 0)
    metrics = learner.update(batch)             # minibatch updates over one rollout batch
    weights = learner.export_weights()          # PolicyWeights for the generation workers

DeepSpeed by default: ZeRO stage 2, AdamW with its state offloaded to CPU (DeepSpeedCPUAdam), bf16 on
GPU, fp32 on CPU. On a CPU-only machine DeepSpeed selects its CPU accelerator and the same path runs
(CI exercises it). `learner.backend: torch` is an explicit opt-out (plain torch AdamW) and warns.
`learner.deepspeed` in the YAML is merged over the defaults built here and passes through.

One update over a rollout batch of N samples:
1. split the samples into `minibatches` minibatches (one optimizer step each), for `epochs` passes;
2. cut each minibatch into micro-batches by token budget. `learner.packing: true` (default): samples
   end to end in one row of at most micro_batch_tokens tokens, `seq_idx` marking them (every mixer
   resets its SSM state, conv window and attention at a boundary), so padding costs nothing;
   `false`: rows right-padded to the longest (rows * longest <= micro_batch_tokens). A longer sample
   goes alone either way;
3. per micro-batch: current log-probs (and entropy) via `model.token_logprobs`, read back per sample
   (`MicroBatch.view`: [N, W], the layout the loss sees whatever the packing), the loss from
   `rl.grpo.algo.policy_loss` normalised by the minibatch's totals (so accumulated gradients equal the
   full-minibatch gradient), `engine.backward`; the engine steps at the minibatch boundary.
The proximal "old" log-probs are the policy's before the first step: with one optimizer step the loss's
own log-probs detached; with more, computed once without grad over the same micro-batches, in train mode
through the same fused head and dtype as the loss, so the first step's ratio is 1 up to kernel determinism.
Every log-prob is of `log_softmax(logits / sampling.temperature)`: the distribution the workers sampled
(before any top-k / top-p / min-p / penalty filter, which the TIS weight corrects; docs/grpo.md).
The learning rate follows `learner.lr_schedule` (warmup, then constant / cosine / linear) per optimizer step.

In a learner group (rl/grpo/learner_group.py; `RankSpec`) every rank runs this class over the same rollout batch:
each minibatch's samples are split over the ranks by token count, padding micro-batches keep the ranks'
collectives matched, the loss keeps the whole minibatch's totals and is x world_size (DeepSpeed averages
gradients over ranks), and the metrics are combined over the ranks. ZeRO-3 runs the policy through
`ZeroScorer` and gathers the parameters for exports, checkpoints and the reference copy.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from torch import Tensor

from model.checkpoint import config_json
from model.config import BitMambaConfig
from model.errors import ConfigError
from model.lm import BitMambaLM
from rl.grpo import algo
from rl.grpo import ds_ops
from rl.train.checkpoint import CheckpointManager, load_checkpoint
from rl.grpo.config import GRPOConfig, LearnerSection, build_model
from rl.train.schedule import Schedule, ScheduleConfig
from rl.grpo.weight_sync import PolicyWeights, SharedPolicy, export_policy, export_shared, gpu_uuid, policy_views, to_host

log = logging.getLogger("rl.grpo.learner")


@dataclass
class TrainBatch:
    """One rollout batch as the learner consumes it: N samples of variable lengths.

    rollout_logprobs are the generation worker's `logprobs` of the completion tokens: log-probs under the
    distribution it sampled from (temperature and filters applied), the behaviour policy of the TIS
    weight and the mismatch metrics; loss_mask is 1 for trained completion tokens (0: injected,
    truncated, excluded).
    """

    prompt_ids: list[list[int]]          # [N][P_i]
    completion_ids: list[list[int]]      # [N][C_i]
    rollout_logprobs: list[list[float]]  # [N][C_i]
    loss_mask: list[list[float]]         # [N][C_i]
    advantages: list[float]              # [N]

    def __len__(self) -> int:
        return len(self.completion_ids)

    def num_tokens(self, i: int) -> int:
        return len(self.prompt_ids[i]) + len(self.completion_ids[i])


@dataclass
class MicroBatch:
    """The rows the model runs over, shifted for next-token prediction, and the per-sample view the loss reads.

    Padded (`collate`): row r is sample index[r] right-padded; the sample view is the rows themselves
    (W = T, completion token k of row r at column len(prompt) - 1 + k). Packed (`collate_packed`): the
    N samples end to end in R rows, each sample shifted on its own (no position's target lies in another
    sample), `seq_idx` numbering them; the sample view gathers each sample's completion targets
    (W = longest completion, token k at column k).
    """

    input_ids: Tensor      # [R, T] int64
    targets: Tensor        # [R, T] int64
    mask: Tensor           # [N, W] fp32 sample view: 1 on trained completion tokens
    rollout_logp: Tensor   # [N, W] fp32 sample view (0 outside completions)
    advantages: Tensor     # [N] fp32
    index: list[int]       # [N] sample indices
    seq_idx: Tensor | None = None    # [R, T] int32, packed only: sample number within the row
    gather: Tensor | None = None     # [N, W] int64, packed only: flat position in [R * T] of each view column
    first: list[int] | None = None   # [N] view column of completion token 0 (None: len(prompt) - 1, padded)
    padding: bool = False            # a learner group's filler micro-batch: runs, trains nothing, counts nothing

    def view(self, x: Tensor) -> Tensor:
        """Per-position values over the rows [R, T] -> the sample view [N, W] (as is when padded)."""
        if self.gather is None:
            return x
        return x.reshape(-1)[self.gather.to(x.device)]

    def completion(self, x: Tensor, batch: "TrainBatch") -> list[list[float]]:
        """The sample view [N, W] -> each sample's completion values [N][C_i]."""
        out = []
        for r, i in enumerate(self.index):
            s = len(batch.prompt_ids[i]) - 1 if self.first is None else self.first[r]
            out.append(x[r, s: s + len(batch.completion_ids[i])].float().cpu().tolist())
        return out


@dataclass
class Minibatch:
    """The micro-batches of one optimizer step and the totals the loss is normalised by."""

    micro: list[MicroBatch]
    n_tokens: float          # valid (trained) tokens of the minibatch
    n_seqs: float            # rows with at least one valid token


class _MetricAccumulator:
    """Per-update metrics: token-weighted means, pg_loss summed over micro-batches, mismatch extremes."""

    EXTREMES = {"mismatch_max_ratio": max, "mismatch_min_ratio": min}

    def __init__(self, n_opt_steps: int):
        self.n_opt_steps = n_opt_steps
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}
        self.extremes: dict[str, float] = {}
        self.bad = 0

    def add(self, m: dict[str, float], w: float) -> None:
        for key, v in m.items():
            if key in self.EXTREMES:
                self.extremes[key] = self.EXTREMES[key](self.extremes.get(key, v), v)
            elif key == "pg_loss":      # micro-batch parts sum to the minibatch loss
                self.sums[key] = self.sums.get(key, 0.0) + v / self.n_opt_steps
                self.weights[key] = 1.0
            else:
                self.sums[key] = self.sums.get(key, 0.0) + v * w
                self.weights[key] = self.weights.get(key, 0.0) + w

    def merge_ranks(self) -> None:
        """Combine every rank's sums, weights, extremes and bad count (a collective: all ranks call it), so
        each rank's `result()` describes the whole update as one rank would."""
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (self.sums, self.weights, self.extremes, self.bad))
        self.sums, self.weights, self.extremes, self.bad = {}, {}, {}, 0
        for sums, weights, extremes, bad in parts:
            for k, v in sums.items():
                self.sums[k] = self.sums.get(k, 0.0) + v
            for k, v in weights.items():
                # pg_loss parts sum (weight 1 per rank that saw a micro-batch); the others are weighted sums
                self.weights[k] = 1.0 if k == "pg_loss" else self.weights.get(k, 0.0) + v
            for k, v in extremes.items():
                self.extremes[k] = self.EXTREMES[k](self.extremes.get(k, v), v)
            self.bad += bad

    def result(self) -> dict[str, float]:
        out = {f"learn/{k}": (self.sums[k] / self.weights[k] if self.weights[k] else 0.0) for k in self.sums}
        out.update({f"learn/{k}": v for k, v in self.extremes.items()})
        out["learn/bad_micro_batches"] = float(self.bad)
        return out


def pack_micro_batches(batch: TrainBatch, indices: list[int], token_budget: int) -> list[list[int]]:
    """Greedy in order: rows * longest row <= token_budget; an over-long sample forms its own."""
    out: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i in indices:
        n = batch.num_tokens(i)
        if cur and (len(cur) + 1) * max(longest, n) > token_budget:
            out.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    if cur:
        out.append(cur)
    return out


def collate(batch: TrainBatch, rows: list[int], pad_id: int = 0) -> MicroBatch:
    L = max(batch.num_tokens(i) for i in rows)
    B = len(rows)
    ids = torch.full((B, L), pad_id, dtype=torch.long)                       # [B, L]
    mask = torch.zeros(B, L - 1)                                             # [B, L-1]
    rlp = torch.zeros(B, L - 1)                                              # [B, L-1]
    for r, i in enumerate(rows):
        p, c = batch.prompt_ids[i], batch.completion_ids[i]
        ids[r, : len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
        # completion token k sits at position len(p) + k, predicted from position len(p) + k - 1
        sl = slice(len(p) - 1, len(p) - 1 + len(c))
        mask[r, sl] = torch.tensor(batch.loss_mask[i], dtype=torch.float32)
        rlp[r, sl] = torch.tensor(batch.rollout_logprobs[i], dtype=torch.float32)
    adv = torch.tensor([batch.advantages[i] for i in rows], dtype=torch.float32)  # [B]
    return MicroBatch(ids[:, :-1], ids[:, 1:], mask, rlp, adv, list(rows))


def pack_samples(batch: TrainBatch, indices: list[int], token_budget: int) -> list[list[int]]:
    """Greedy in order: the samples' lengths (prompt + completion) sum to <= token_budget per micro-batch;
    an over-long sample forms its own. Packed rows hold no padding, so order costs nothing."""
    out: list[list[int]] = []
    cur: list[int] = []
    total = 0
    for i in indices:
        n = batch.num_tokens(i)
        if cur and total + n > token_budget:
            out.append(cur)
            cur, total = [], 0
        cur.append(i)
        total += n
    if cur:
        out.append(cur)
    return out


def collate_packed(batch: TrainBatch, samples: list[int]) -> MicroBatch:
    """The samples end to end in one row: sample j contributes its tokens[:-1] as inputs and tokens[1:] as
    targets (shifted on its own, so the last token of a sample predicts nothing and no target crosses a
    boundary), `seq_idx` j on its positions. Row length T = sum(len(prompt) + len(completion) - 1)."""
    ids: list[int] = []
    tgt: list[int] = []
    seq: list[int] = []
    W = max(1, max(len(batch.completion_ids[i]) for i in samples))
    N = len(samples)
    gather = torch.zeros(N, W, dtype=torch.long)                             # [N, W]
    mask = torch.zeros(N, W)                                                 # [N, W]
    rlp = torch.zeros(N, W)                                                  # [N, W]
    for j, i in enumerate(samples):
        p, c = batch.prompt_ids[i], batch.completion_ids[i]
        if not p:
            raise ValueError(f"learner: sample {i} has an empty prompt (its first completion token has no "
                             "position to be predicted from)")
        toks = p + c
        off = len(ids)
        ids += toks[:-1]
        tgt += toks[1:]
        seq += [j] * (len(toks) - 1)
        # completion token k is the target of the sample's position len(p) - 1 + k
        gather[j, : len(c)] = torch.arange(off + len(p) - 1, off + len(p) - 1 + len(c))
        mask[j, : len(c)] = torch.tensor(batch.loss_mask[i], dtype=torch.float32)
        rlp[j, : len(c)] = torch.tensor(batch.rollout_logprobs[i], dtype=torch.float32)
    adv = torch.tensor([batch.advantages[i] for i in samples], dtype=torch.float32)  # [N]
    return MicroBatch(torch.tensor([ids], dtype=torch.long), torch.tensor([tgt], dtype=torch.long), mask, rlp, adv,
                      list(samples), seq_idx=torch.tensor([seq], dtype=torch.int32), gather=gather, first=[0] * N)


def micro_batches(batch: TrainBatch, indices: list[int], token_budget: int, packing: bool) -> list[MicroBatch]:
    """The samples `indices` as micro-batches of at most `token_budget` tokens: packed end to end with
    `seq_idx` boundaries, or right-padded rows."""
    if packing:
        return [collate_packed(batch, s) for s in pack_samples(batch, indices, token_budget)]
    return [collate(batch, rows) for rows in pack_micro_batches(batch, indices, token_budget)]


def lr_schedule(sec: LearnerSection, total_opt_steps: int) -> Schedule:
    """`learner.lr_schedule` over the run's optimizer steps (steps x minibatches x epochs): linear warmup
    over `warmup_steps` optimizer steps, then constant, cosine or linear decay to `min_lr_ratio` x lr."""
    total = max(total_opt_steps, 1)
    warm = min(sec.warmup_steps, total - 1) / total if total > 1 else 0.0
    if sec.lr_schedule == "constant":
        sc = ScheduleConfig(kind="wsd", warmup=warm, decay=0.0)
    elif sec.lr_schedule == "cosine":
        sc = ScheduleConfig(kind="cosine", warmup=warm, min_lr_ratio=sec.min_lr_ratio)
    else:
        sc = ScheduleConfig(kind="wsd", warmup=warm, decay=1.0 - warm, decay_shape="linear",
                            min_lr_ratio=sec.min_lr_ratio)
    return Schedule(sc, total)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_config(sec: LearnerSection, on_gpu: bool) -> dict:
    """The DeepSpeed config this learner runs with: defaults from the typed section, then the YAML's
    `learner.deepspeed` merged over them (nested dicts merged, values replaced)."""
    bf16 = on_gpu if sec.bf16 is None else sec.bf16
    zero: dict = {"stage": sec.zero_stage}
    if sec.offload_optimizer and sec.zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    cfg = {
        "train_micro_batch_size_per_gpu": 1,      # one packed micro-batch per backward
        "gradient_accumulation_steps": 1,         # set per minibatch to its micro-batch count
        "gradient_clipping": sec.grad_clip,
        "optimizer": {"type": "AdamW", "params": {"lr": sec.lr, "betas": list(sec.betas),
                                                  "weight_decay": sec.weight_decay, "eps": 1e-8}},
        "zero_optimization": zero,
        "bf16": {"enabled": bool(bf16)},
        # bf16 weights, fp32 gradient accumulation: ZeRO-2 then accumulates the micro-batches' gradients
        # in one fp32 buffer on the device and copies them to the offloaded optimizer once per step;
        # with bf16 accumulation and offload it round-trips every gradient through the CPU at every
        # micro-batch (deepspeed/runtime/zero/stage_1_and_2.py, copy_grads_in_partition)
        **({"data_types": {"grad_accum_dtype": "fp32"}} if bf16 else {}),
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    return _merge(cfg, sec.deepspeed)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _init_single_process_dist() -> None:
    """DeepSpeed wants a process group; this learner is one process and gets a private one on a free
    port. Set unconditionally: inherited MASTER_PORT values (a parent that ran a learner before) would
    collide with a port still held by an earlier learner."""
    if dist.is_available() and dist.is_initialized():
        return
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())})


@dataclass(frozen=True)
class RankSpec:
    """This learner's place in a learner group (rl/grpo/learner_group.py): rank r of `world_size`, meeting at
    master_addr:master_port (chosen on rank 0's node). Rank 0 exports weights and writes checkpoints."""

    rank: int
    world_size: int
    master_addr: str
    master_port: int


def init_group_dist(spec: RankSpec, on_gpu: bool, timeout_s: float) -> None:
    """Join the learner group's torch.distributed group: NCCL on GPUs, gloo on CPU. DeepSpeed finds the
    group initialised and uses it (its CPU accelerator would otherwise pick oneCCL when installed).
    `timeout_s` bounds every collective: a rank stuck on a peer that died fails instead of waiting."""
    from datetime import timedelta

    os.environ.update({"RANK": str(spec.rank), "LOCAL_RANK": "0", "WORLD_SIZE": str(spec.world_size),
                       "MASTER_ADDR": spec.master_addr, "MASTER_PORT": str(spec.master_port)})
    dist.init_process_group(backend="nccl" if on_gpu else "gloo",
                            init_method=f"tcp://{spec.master_addr}:{spec.master_port}",
                            rank=spec.rank, world_size=spec.world_size, timeout=timedelta(seconds=timeout_s))


def split_by_tokens(sizes: list[int], ranks: int) -> list[list[int]]:
    """Positions 0..len(sizes)-1 split over `ranks` so each rank's token total is about equal: longest
    first onto the lightest rank (LPT); each rank's positions in ascending order. Deterministic, so every
    rank computes the same split from the same batch."""
    out: list[list[int]] = [[] for _ in range(ranks)]
    load = [0] * ranks
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(ranks), key=lambda r: (load[r], r))
        out[r].append(i)
        load[r] += sizes[i]
    return [sorted(o) for o in out]


def padding_micro_batch() -> MicroBatch:
    """A one-token micro-batch that trains nothing (mask 0): a rank with fewer micro-batches than the
    others in a minibatch runs these so every rank makes the same forward/backward calls (ZeRO's
    collectives are matched call by call)."""
    b = TrainBatch([[1]], [[1]], [[0.0]], [[0.0]], [0.0])
    mb = collate_packed(b, [0])
    mb.padding = True
    return mb


class ZeroScorer(torch.nn.Module):
    """`lm.token_logprobs` as a module forward, the shape ZeRO-3 needs: it gathers a module's sharded
    parameters in forward/backward hooks, and the mixers read child parameters directly (conv1d.weight)
    while the fused head reads lm_head's weight outside any forward. Each Block is a ZeRO-3 leaf (all its
    parameters gathered at its forward, released after); the parameters outside the Blocks (embedding,
    final norm, head) are external parameters of this module, gathered for the whole call."""

    def __init__(self, lm: BitMambaLM):
        super().__init__()
        self.lm = lm

    def forward(self, ids: Tensor, targets: Tensor, **kw):
        return self.lm.token_logprobs(ids, targets, **kw)

    def register_external(self) -> None:
        """After deepspeed.initialize: the parameters outside the Blocks become this module's."""
        inner = {id(p) for b in self.lm.layers for p in b.parameters()}
        for p in self.lm.parameters():
            if id(p) not in inner:
                deepspeed.zero.register_external_parameter(self, p)


class Learner:
    """Owns the policy, its optimizer (inside DeepSpeed) and the optional frozen reference."""

    def __init__(self, cfg: GRPOConfig, init_dir: str | None = None, rank: RankSpec | None = None):
        """rank: this learner's place in a learner group (None: a group of one, private process group)."""
        self.cfg = cfg
        self.sec = cfg.learner
        self.rank = rank.rank if rank is not None else 0
        self.world_size = rank.world_size if rank is not None else 1
        torch.manual_seed(cfg.seed)
        self.device = torch.device("cuda" if torch.cuda.is_available() and self.sec.num_gpus > 0 else "cpu")
        model = build_model(cfg.model, init_dir)
        model.gradient_checkpointing = self.sec.gradient_checkpointing
        self.model_config = model.config.to_dict()
        self.temperature = cfg.sampling.temperature      # the learner scores log_softmax(logits / T)
        self.loss_cfg = algo.LossConfig(
            clip_low=cfg.algo.clip_low, clip_high=cfg.algo.clip_high, aggregation=cfg.algo.aggregation,
            seq_sum_const=cfg.seq_sum_const, kl_coef=cfg.algo.kl_coef, tis_cap=cfg.algo.tis_cap,
            clip_ratio_c=cfg.algo.clip_ratio_c)
        self.schedule = lr_schedule(self.sec, cfg.steps * self.sec.minibatches * self.sec.epochs)
        self.version = 0
        self.optimizer_steps = 0
        self._skipped = 0                  # optimizer steps skipped in the current update (non-finite)
        self._last_export = {"bytes": 0.0, "seconds": 0.0}
        self._shared: tuple[SharedPolicy, torch.Tensor] | None = None   # the last CUDA IPC export, kept alive
        if self.sec.backend == "deepspeed":
            if rank is None:
                _init_single_process_dist()
            else:
                init_group_dist(rank, self.device.type == "cuda", self.sec.collective_timeout_s)
            self.ds_config = deepspeed_config(self.sec, self.device.type == "cuda")
            if self.device.type == "cuda" and self.ds_config["bf16"]["enabled"]:
                # the fp32 matmul left in a bf16 learner is the head's (fp32 log-probs); TF32 keeps it on
                # tensor cores (its inputs lose nothing a bf16 trunk had not already rounded away)
                torch.set_float32_matmul_precision("high")
            model = model.to(self.device)
            ds_ops.build_ops(self.ds_config)     # C++ ops compiled once per environment, announced
            self._scorer = ZeroScorer(model) if self.sec.zero_stage == 3 else None
            if self._scorer is not None:       # leaves marked before initialize installs the hooks
                from deepspeed.utils import set_z3_leaf_modules

                set_z3_leaf_modules(model, [type(model.layers[0])])
            self.engine, self.optimizer, _, _ = deepspeed.initialize(
                model=self._scorer or model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                config=self.ds_config)
            self.model = model
            if self._scorer is not None:
                self._scorer.register_external()
            log.info("learner: DeepSpeed %s, ZeRO-%d, optimizer %s, accelerator %s", deepspeed.__version__,
                     self.sec.zero_stage, type(self.optimizer).__name__,
                     deepspeed.get_accelerator().device_name())
        else:
            if rank is not None:
                raise ValueError("learner.backend 'torch' runs one rank only (LearnerSection refuses more)")
            warnings.warn("learner.backend is 'torch': plain torch AdamW without DeepSpeed (no ZeRO, "
                          "no optimizer offload); chosen explicitly in the config", stacklevel=2)
            self.engine = None
            self.ds_config = None
            self._scorer = None
            self.model = model.to(self.device)
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.sec.lr, betas=self.sec.betas,
                                               weight_decay=self.sec.weight_decay)
        self.ref = self._build_reference(cfg, init_dir) if cfg.algo.kl_coef > 0 else None

    def _build_reference(self, cfg: GRPOConfig, init_dir: str | None) -> BitMambaLM:
        """The frozen reference: a copy of the initial policy in the policy's device and dtype (bf16 when the
        learner trains in bf16: no fp32 copy), scored like the policy (train mode, fused head), so its KL
        to the policy is exactly 0 before the first step."""
        like = next(self.model.parameters())
        ref = build_model(cfg.model, init_dir).to(device=like.device, dtype=like.dtype)
        with self._full_params():
            ref.load_state_dict(self.model.state_dict())
        ref.requires_grad_(False)
        return ref.train()

    # ------------------------------------------------------------------ info
    def ping(self) -> dict:
        return {"pid": os.getpid(), "version": self.version, "backend": self.sec.backend,
                "optimizer": type(self.optimizer).__name__, "rank": self.rank, "world_size": self.world_size}

    def _full_params(self, modifier_rank: int | None = None):
        """Context in which every parameter holds its full value: under ZeRO-3 gathered from the ranks
        (a collective: every rank enters it; with `modifier_rank` that rank's edits are broadcast on exit),
        otherwise a no-op."""
        if self.engine is None or self.sec.zero_stage != 3:
            return contextlib.nullcontext()
        return deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=modifier_rank)

    def get_model_config(self) -> dict:
        return self.model_config

    # ------------------------------------------------------------------ log-probs
    def _logprobs(self, model: BitMambaLM, mb: MicroBatch, entropy: bool):
        """log p_T of the micro-batch's targets under `log_softmax(logits / sampling.temperature)` through
        the fused head: the loss's numerical path, also when called without grad (old / reference).
        Returns (log-probs, entropy or None) in the sample view [N, W]."""
        ids = mb.input_ids.to(self.device)
        tg = mb.targets.to(self.device)
        seq = None if mb.seq_idx is None else mb.seq_idx.to(self.device)
        score = self._scorer if model is self.model and self._scorer is not None else model.token_logprobs
        out = score(ids, tg, seq_idx=seq, return_entropy=entropy, temperature=self.temperature,
                    fused=True)                                              # [R, T] (, [R, T])
        lp, ent = out if entropy else (out, None)
        return mb.view(lp), (None if ent is None else mb.view(ent))         # [N, W]

    def _micro_batches(self, batch: TrainBatch, indices: list[int]) -> list[MicroBatch]:
        return micro_batches(batch, indices, self.sec.micro_batch_tokens, self.sec.packing)

    @torch.no_grad()
    def compute_logprobs(self, batch: TrainBatch) -> list[list[float]]:
        """The current policy's log p_T of every completion token -> [N][C_i], on the loss's numerical path
        (train mode: straight-through BitLinears, the learner's dtype, the fused head, the same packing)."""
        self.model.train()
        out: list[list[float]] = [[] for _ in range(len(batch))]
        for mb in self._micro_batches(batch, list(range(len(batch)))):
            lp, _ = self._logprobs(self.model, mb, entropy=False)
            for i, vals in zip(mb.index, mb.completion(lp, batch)):
                out[i] = vals
        return out

    # ------------------------------------------------------------------ update
    def update(self, batch: TrainBatch) -> dict[str, float]:
        """Minibatch updates over one rollout batch; returns averaged metrics.

        BITMAMBA_PROFILE_LEARN=DIR: the update after `BITMAMBA_PROFILE_STEP` (default 1, i.e. the second;
        the first one compiles) runs under torch.profiler; its op tables go to DIR/learn_profile.txt."""
        where = os.environ.get("BITMAMBA_PROFILE_LEARN")
        if not where or self.version != int(os.environ.get("BITMAMBA_PROFILE_STEP", "1")):
            return self._update(batch)
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=acts) as prof:
            out = self._update(batch)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
        ka = prof.key_averages()
        dev_key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        Path(where).mkdir(parents=True, exist_ok=True)
        (Path(where) / "learn_profile.txt").write_text(
            f"update {self.version - 1}: {out['learn/seconds']:.2f} s (profiled)\n\n"
            + ka.table(sort_by="self_cpu_time_total", row_limit=40) + "\n\n" + ka.table(sort_by=dev_key, row_limit=40))
        return out

    def _plan(self, batch: TrainBatch) -> list[Minibatch]:
        """The rollout batch cut into `minibatches` contiguous minibatches, each packed into micro-batches.

        In a group of R ranks each minibatch's samples are split over the ranks by token count
        (`split_by_tokens`, the same split on every rank) and this rank packs its share; a rank with fewer
        micro-batches than the most loaded one is topped up with padding micro-batches. n_tokens and
        n_seqs stay the whole minibatch's, so the ranks' losses sum to the single-rank loss."""
        n = len(batch)
        n_mb = min(self.sec.minibatches, n)
        bounds = [round(k * n / n_mb) for k in range(n_mb + 1)]
        plan = []
        for k in range(n_mb):
            idx = list(range(bounds[k], bounds[k + 1]))
            if self.world_size == 1:
                micro = self._micro_batches(batch, idx)
            else:
                shares = split_by_tokens([batch.num_tokens(i) for i in idx], self.world_size)
                per_rank = [self._micro_batches(batch, [idx[j] for j in sh]) if sh else [] for sh in shares]
                micro = per_rank[self.rank]
                micro += [padding_micro_batch() for _ in range(max(map(len, per_rank)) - len(micro))]
            plan.append(Minibatch(micro, n_tokens=float(sum(sum(batch.loss_mask[i]) for i in idx)),
                                  n_seqs=float(sum(1 for i in idx if any(batch.loss_mask[i])))))
        return plan

    @torch.no_grad()
    def _frozen_logprobs(self, model: BitMambaLM, plan: list[Minibatch]) -> list[list[Tensor]]:
        """log p_T of every micro-batch of the plan without grad, in train mode (the loss's path)."""
        model.train()
        return [[self._logprobs(model, mb, entropy=False)[0] for mb in m.micro] for m in plan]

    def _update(self, batch: TrainBatch) -> dict[str, float]:
        t0 = time.perf_counter()
        plan = self._plan(batch)
        n_opt_steps = len(plan) * self.sec.epochs
        # the proximal policy: with one optimizer step the loss's own log-probs (detached) are it exactly
        old = self._frozen_logprobs(self.model, plan) if n_opt_steps > 1 else None
        ref = self._frozen_logprobs(self.ref, plan) if self.ref is not None else None
        self.model.train()
        acc = _MetricAccumulator(n_opt_steps)
        grad_norms: list[float | None] = []
        for _ in range(self.sec.epochs):
            for k, mini in enumerate(plan):
                self._set_lr()
                if self.engine is not None:
                    self.engine.set_train_batch_size(len(mini.micro) * self.world_size)   # micro x GAS x ranks
                else:
                    self.optimizer.zero_grad(set_to_none=True)
                n_ok = 0                            # finite micro-batches of this minibatch so far (this rank)
                for j, mb in enumerate(mini.micro):
                    if self.engine is not None:
                        # DeepSpeed's own boundary is a global micro-step count modulo the current GAS: with
                        # a GAS that changes between minibatches it falls mid-minibatch (gradients leak into
                        # the next update and the last step() is a no-op). Mark the boundary explicitly.
                        self.engine.set_gradient_accumulation_boundary(j == len(mini.micro) - 1)
                    old_lp = None if old is None else old[k][j]
                    ref_lp = None if ref is None else ref[k][j]
                    n_ok += self._micro_step(mb, mini, old_lp, ref_lp, acc, n_ok, last=j == len(mini.micro) - 1)
                grad_norms.append(self._finish_step())
        self.version += 1
        if self.world_size > 1:
            acc.merge_ranks()
        out = acc.result()
        finite = [g for g in grad_norms if g is not None]
        out["learn/grad_norm"] = sum(finite) / len(finite) if finite else float("nan")
        out["learn/optimizer_steps"] = float(n_opt_steps)
        out["learn/skipped_steps"] = float(self._skipped)
        out["learn/lr"] = self._last_lr
        if acc.bad:
            log.warning("update %d: %d micro-batch(es) with a non-finite loss were left out", self.version, acc.bad)
        if self._skipped:
            log.warning("update %d: %d of %d optimizer step(s) skipped (non-finite loss or gradient)", self.version,
                        self._skipped, n_opt_steps)
        self._skipped = 0
        out["learn/tokens"] = float(sum(sum(m) for m in batch.loss_mask))
        out["learn/seconds"] = time.perf_counter() - t0
        return out

    def _micro_step(self, mb: MicroBatch, mini: Minibatch, old_lp: Tensor | None, ref_lp: Tensor | None,
                    acc: "_MetricAccumulator", n_ok: int, last: bool) -> bool:
        """Loss and backward of one micro-batch (normalised by the minibatch totals); True if it was a finite
        one that trains (not padding). n_ok: such micro-batches of this minibatch before it on this rank."""
        logp, ent = self._logprobs(self.model, mb, entropy=True)            # [N, W]
        mask = mb.mask.to(self.device)                                       # [N, W]
        loss, m = algo.policy_loss(
            logp, logp.detach() if old_lp is None else old_lp, mb.advantages.to(self.device), mask, self.loss_cfg,
            rollout_logp=mb.rollout_logp.to(self.device), ref_logp=ref_lp, entropy=ent,
            n_tokens=mini.n_tokens, n_seqs=mini.n_seqs)
        if mb.padding:
            # trains nothing; the backward keeps this rank's ZeRO collectives in step with the others
            loss = logp.sum() * 0.0
        ok = bool(torch.isfinite(loss))
        if last:                                # finite micro-batches of the whole minibatch, all ranks
            n_ok += ok and not mb.padding
            if self.world_size > 1:
                t = torch.tensor([float(n_ok)], device=self.device)
                dist.all_reduce(t)
                n_ok = int(t.item())
        if not ok:
            # a NaN/inf micro-batch contributes nothing: a zero loss through the weights keeps DeepSpeed's
            # accumulation count; it is counted, never applied
            loss = sum(p.sum() for p in self.model.parameters() if p.requires_grad) * 0.0
            if last and n_ok == 0:
                # no finite micro-batch in this minibatch: NaN gradients make the optimizer skip the step
                # (a zero gradient would still move AdamW's momentum)
                loss = loss * float("nan")
            m = {}
            acc.bad += 1
        if self.engine is not None:
            # DeepSpeed averages gradients over the data-parallel ranks; each rank's loss is its part of the
            # minibatch loss (normalised by the minibatch's totals), so x world_size makes the result their sum
            self.engine.backward(loss * self.world_size if self.world_size > 1 else loss, scale_wrt_gas=False)
            self.engine.step()
        else:
            loss.backward()
        if not mb.padding:
            acc.add(m, float(mask.sum()))
        return ok and not mb.padding

    # ------------------------------------------------------------------ learning rate
    def _lr_now(self) -> float:
        return self.sec.lr * self.schedule.lr_mult(self.optimizer_steps)

    def _set_lr(self) -> None:
        """The schedule's LR for the coming optimizer step (a pure function of the step: resume-exact)."""
        lr = self._last_lr = self._lr_now()
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _finish_step(self) -> float | None:
        """Close one optimizer step; a non-finite gradient skips it (DeepSpeed does so itself)."""
        self.optimizer_steps += 1
        if self.engine is not None:
            g = self.engine.get_global_grad_norm()
            if not self.engine.was_step_applied():
                self._skipped += 1
            self._drop_eval_caches()
            return None if g is None else float(g)
        g = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.sec.grad_clip)
        if torch.isfinite(g):
            self.optimizer.step()
        else:
            self._skipped += 1
        self.optimizer.zero_grad(set_to_none=True)
        return float(g)

    def _drop_eval_caches(self) -> None:
        """DeepSpeed writes updated weights through `.data` of its flat buffers, which leaves the
        parameters' version counters unchanged: the BitLinear eval caches keyed on them would go stale
        (old log-probs of the next minibatch computed with the previous weights)."""
        for _, lin in self.model.bitlinears():
            lin.invalidate_eval_cache()

    # ------------------------------------------------------------------ weights
    def export_weights(self) -> PolicyWeights:
        """The current policy for the generation workers (ternary packed, the rest as is), on CPU."""
        t0 = time.perf_counter()
        with self._full_params():
            w = export_policy(self.model, self.version)
        self._note_export(w.nbytes, t0)
        return w

    def export_shared(self) -> SharedPolicy:
        """The current policy in one buffer on this GPU, as a CUDA IPC handle for workers on the same GPU.
        The buffer stays alive until the next `export_shared` (restarted workers may still load it)."""
        t0 = time.perf_counter()
        self._shared = None                     # the previous version's buffer goes first
        with self._full_params():
            sp, buf = export_shared(self.model, self.version)
        self._shared = (sp, buf)
        self._note_export(sp.nbytes, t0)
        return sp

    def last_shared_as_weights(self) -> PolicyWeights:
        """The last `export_shared` version as `PolicyWeights` on CPU (for a worker that cannot map it)."""
        if self._shared is None:
            raise RuntimeError("last_shared_as_weights: nothing was exported with export_shared")
        sp, buf = self._shared
        return to_host(policy_views(sp.version, buf, sp.packed, sp.dense))

    def gpu(self) -> str | None:
        """This learner's GPU UUID (None on CPU): workers with the same UUID load by CUDA IPC."""
        return gpu_uuid() if self.device.type == "cuda" else None

    def _note_export(self, nbytes: int, t0: float) -> None:
        self._last_export["bytes"] += float(nbytes)
        self._last_export["seconds"] += time.perf_counter() - t0

    def last_export_stats(self) -> dict[str, float]:
        """Bytes and seconds of the exports since the last call (for the sync metrics)."""
        out, self._last_export = self._last_export, {"bytes": 0.0, "seconds": 0.0}
        return out

    def optimizer_state(self) -> dict:
        """Optimizer state readable with torch.load(weights_only=True) (no pickled objects)."""
        if self.engine is None:
            return {"kind": "torch", "state": self.optimizer.state_dict()}
        zopt = self.optimizer
        if hasattr(zopt, "single_partition_of_fp32_groups"):      # ZeRO-1/2: this rank's partition
            return {"kind": "zero", "base": zopt.optimizer.state_dict(),
                    "fp32": [t.detach().cpu().clone() for t in zopt.single_partition_of_fp32_groups]}
        if hasattr(zopt, "fp32_partitioned_groups_flat"):
            # ZeRO-3: this rank's partition, one flat fp32 tensor per sub-group. The inner optimizer's state
            # is keyed by those tensors, which its param_groups list only one at a time (DeepSpeed swaps them
            # in per sub-group), so torch's state_dict() cannot index it: read it tensor by tensor
            flats = zopt.fp32_partitioned_groups_flat
            return {"kind": "zero3", "fp32": [t.detach().cpu().clone() for t in flats],
                    "state": [{k: (v.detach().cpu().clone() if torch.is_tensor(v) else v)
                               for k, v in zopt.optimizer.state.get(t, {}).items()} for t in flats]}
        return {"kind": "plain", "state": zopt.state_dict()}

    def load_optimizer_state(self, state: dict) -> None:
        kind = state["kind"]
        if self.engine is None:
            self.optimizer.load_state_dict(state["state"])
            return
        zopt = self.optimizer
        if kind == "ranks":                      # a group's checkpoint: one partition per rank
            if len(state["ranks"]) != self.world_size:
                raise ConfigError(f"checkpoint optimizer state was written by a learner group of "
                                  f"{len(state['ranks'])} rank(s); this learner has {self.world_size} "
                                  "(resume with the same learner.num_ranks / num_gpus)")
            state, kind = state["ranks"][self.rank], state["ranks"][self.rank]["kind"]
        elif self.world_size > 1:
            raise ConfigError(f"checkpoint optimizer state was written by one learner rank; this learner group "
                              f"has {self.world_size} (resume with the same learner.num_ranks / num_gpus)")
        if kind == "zero":
            zopt.optimizer.load_state_dict(state["base"])
            for dst, src in zip(zopt.single_partition_of_fp32_groups, state["fp32"]):
                dst.data.copy_(src.to(dst.device, dst.dtype))
        elif kind == "zero3":
            for dst, src, st in zip(zopt.fp32_partitioned_groups_flat, state["fp32"], state["state"]):
                dst.data.copy_(src.to(dst.device, dst.dtype))
                zopt.optimizer.state[dst] = {k: (v.to(dst.device).clone() if torch.is_tensor(v) else v)
                                             for k, v in st.items()}
        else:
            zopt.load_state_dict(state["state"])

    def save_checkpoint(self, root: str, step: int, extra: dict, keep: int) -> str | None:
        """Write checkpoint `step` under `root` (atomic; a from_pretrained-loadable model dir).

        In a learner group every rank calls this: the optimizer partitions are gathered to rank 0
        (optimizer state `{"kind": "ranks", "ranks": [...]}`), parameters gathered under ZeRO-3, and rank 0
        writes; the other ranks return None."""
        opt = self.optimizer_state()
        if self.world_size > 1:
            parts: list | None = [None] * self.world_size if self.rank == 0 else None
            dist.gather_object(opt, parts, dst=0)
            opt = {"kind": "ranks", "ranks": parts}
        with self._full_params():
            if self.rank != 0:
                return None
            cfg_json = config_json(BitMambaConfig.from_dict(self.model_config)).encode()
            extra = {**extra, "learner": {"version": self.version, "optimizer_steps": self.optimizer_steps}}
            path = CheckpointManager(root, keep=keep).save(
                step, self.model, optimizer_state=opt, extra=extra, files={"config.json": cfg_json})
        return str(path)

    def load_checkpoint(self, path: str) -> dict:
        """Restore model and optimizer from `path`; returns the checkpoint's extra dict."""
        tensors, opt_state, extra = load_checkpoint(path)
        with self._full_params(modifier_rank=0):
            self.model.load_state_dict(tensors)
        if opt_state is not None:
            self.load_optimizer_state(opt_state)
        st = extra.get("learner", {})
        self.version = int(st.get("version", 0))
        self.optimizer_steps = int(st.get("optimizer_steps", 0))
        return extra
