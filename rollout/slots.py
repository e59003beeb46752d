"""The run state of one `Engine.generate` call, and the slot phases that need nothing else from the engine:
admission (queued samples and samples back from a pause into free slots, with their prompts' prefills)
and retirement (a finished sample's result recorded, its slot freed).

    run = engine._start(requests, params, t0)   # a RunState: slots allocated, every sample queued
    admit(run)              # free slots <- resumed samples first, then queued ones in request order
    blank_idle(run)         # slots still free restart from the zero state
    retire(run, i, "eos")   # slot i's sample -> run.results[its order]; slot i is free

Every per-slot tensor of `RunState` has one row per slot; row i belongs to `run.slot[i]`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import torch
from torch import Tensor

from rollout.backends.base import RowSnapshot
from rollout.sampling import make_generator, sample_seed, seen_mask
from rollout.types import GenRequest, GenResult, GenStats, SamplingParams


@dataclass
class Sample:
    """One (request, sample index) on its way through a slot. Host-side bookkeeping only."""

    req: GenRequest
    params: SamplingParams
    index: int
    order: int                                  # position in the output list
    key: tuple[int, ...]                        # prompt ids (prefill cache key)
    gen: torch.Generator | None = None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    model_logprobs: list[float] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    stop_floor: int = 0                         # stop matches must lie at or after this token index
    n_pauses: int = 0
    prefill_s: float = 0.0
    t_load: float = 0.0
    ttft_s: float = 0.0
    parked: tuple | None = None    # (future, 1-row state at the last sync, its position in tokens)
    resume: tuple | None = None    # (1-row state at the last sync, its position in tokens)
    n_force: int = 0               # the last n_force tokens are not in the slot's state yet (forced steps)
    fed_at_sync: int = 0           # len(tokens) - n_force at the last sync (the snapshot's position)


@dataclass
class Prefilled:
    logits: Tensor            # [P, V] fp32: every prompt of its prefill batch
    state: Any                # P-row ModelState of that batch
    row: int                  # this prompt's row in both
    remaining: int            # samples still to load from it
    prefill_s: float          # the batch's prefill time


def queue_samples(requests: Sequence[GenRequest], params: SamplingParams | None
                  ) -> tuple[deque[Sample], dict[tuple[int, ...], int]]:
    """Every request as its `n` samples, in request then sample order; and the sample count per prompt."""
    queue: deque[Sample] = deque()
    remaining_by_key: dict[tuple[int, ...], int] = {}
    order = 0
    for r in requests:
        p = r.params or params
        key = tuple(r.prompt_ids)
        for i in range(p.n):
            queue.append(Sample(req=r, params=p, index=i, order=order, key=key))
            order += 1
        remaining_by_key[key] = remaining_by_key.get(key, 0) + p.n
    return queue, remaining_by_key


@dataclass
class RunState:
    """What the phases of one `Engine.generate` call share (S slots, vocabulary V, window W = sync_every).

    Samples move queue -> slot -> results, or slot -> (paused on a Future) waiting (keeps the slot) ->
    parked (off-slot) -> ready -> slot. `to_load`, `to_feed` and `to_park` collect one sync's work so that
    it runs batched (one state copy per source, one host->device copy per tensor).
    """

    # fixed for the call
    backend: Any
    device: torch.device
    vocab: int
    window: int                      # W: decode steps between syncs
    blank: Any                       # 1-row zero state: idle and held slots restart from it
    use_hash: bool                   # hash noise (else per-sample generators)
    batched_prefill: bool            # distinct prompts admitted together share one prefill_many
    max_stop_chars: int              # longest stop string of any sample (0: none)
    on_stop: Callable | None         # the pause hook (`rollout.pauses.StopHook`)
    force_max: int
    defer: int
    park_wait_s: float
    decode: Callable[[Sequence[int]], str] | None    # the engine tokenizer's decode (None: no tokenizer)
    t0: float                        # perf_counter at the generate call (ttft_s counts from it)
    # host bookkeeping
    queue: deque[Sample]             # not started yet, in request order
    remaining_by_key: dict[tuple[int, ...], int]     # samples per prompt (a prefill lives until all loaded)
    stats: GenStats
    slot: list[Sample | None]        # [S] the sample in each slot (None: free)
    results: list[GenResult | None]  # by sample order
    # device tensors, one row per slot
    logits: Tensor                   # [S, V] fp32: the logits each slot samples from next
    seen: Tensor | None              # [S, V] bool: prompt + completion tokens (repetition penalty only)
    buf_tok: Tensor                  # [S, W] int64: this window's tokens
    buf_lp: Tensor                   # [S, W] fp32: their sampling log-probs
    buf_mlp: Tensor                  # [S, W] fp32: their model log-probs
    hash_keys: Tensor                # [S] int64: sample_seed of each slot's sample
    hash_count: Tensor               # [S] int64: tokens so far of each slot's sample (hash noise counter)
    snap: RowSnapshot | None         # every slot's recurrent state at the last sync (with on_stop)
    force_buf: Tensor                # [S, FB] int64: tokens to feed instead of sampling (FB = max(1, force_max))
    force_len: Tensor                # [S] int64: how many of them
    force_at: Tensor                 # [S] int64: how many were fed
    prefilled: dict[tuple[int, ...], Prefilled] = field(default_factory=dict)
    parked: list[Sample] = field(default_factory=list)         # waiting for a Future, off-slot
    ready: deque[Sample] = field(default_factory=deque)        # answered: back into a slot before new samples
    to_load: list[tuple] = field(default_factory=list)    # (slot, sample, Prefilled): loaded by load_all
    to_feed: list[tuple] = field(default_factory=list)    # (slot, sample, state, its row, pos): fed by feed_all
    to_park: list[tuple] = field(default_factory=list)    # (sample, slot) paused on a Future at this sync
    waiting: list[tuple] = field(default_factory=list)    # (sample, slot, windows left): Future pending, slot held
    logits_owned: bool = True        # False while `logits` is the tensor backend.step returned
    in_window: bool = False          # True while decode steps are queued (mid-window rejoins)

    @classmethod
    def allocate(cls, backend, device: torch.device, slots: int, max_len: int, queue: deque[Sample],
                 remaining_by_key: dict, n_requests: int, **fixed) -> RunState:
        """The state of a call over `slots` rows of `max_len` (the backend allocated already); `fixed`: the
        per-call settings (window, use_hash, batched_prefill, on_stop, force_max, defer, park_wait_s,
        decode, t0)."""
        S, V, W, dev = slots, backend.model.config.vocab_size, fixed["window"], device
        use_penalty = any(s.params.repetition_penalty != 1.0 for s in queue)
        FB = max(1, fixed["force_max"])
        return cls(
            backend=backend, device=dev, vocab=V,
            blank=backend.model.allocate_state(1, max_len, device=dev),
            max_stop_chars=max([len(x) for s in queue for x in s.params.stop_strings] or [0]),
            queue=queue, remaining_by_key=remaining_by_key,
            stats=GenStats(n_requests=n_requests, n_samples=len(queue)),
            slot=[None] * S, results=[None] * len(queue),
            logits=torch.zeros(S, V, device=dev),
            seen=torch.zeros(S, V, dtype=torch.bool, device=dev) if use_penalty else None,
            buf_tok=torch.zeros(S, W, dtype=torch.long, device=dev),
            buf_lp=torch.zeros(S, W, device=dev),
            buf_mlp=torch.zeros(S, W, device=dev),
            hash_keys=torch.zeros(S, dtype=torch.long, device=dev),
            hash_count=torch.zeros(S, dtype=torch.long, device=dev),
            snap=RowSnapshot(backend.state) if fixed["on_stop"] is not None else None,
            force_buf=torch.zeros(S, FB, dtype=torch.long, device=dev),
            force_len=torch.zeros(S, dtype=torch.long, device=dev),
            force_at=torch.zeros(S, dtype=torch.long, device=dev),
            **fixed)

    @property
    def slots(self) -> int:
        return len(self.slot)

    def active(self) -> list[int]:
        """The slots holding a sample."""
        return [i for i in range(self.slots) if self.slot[i] is not None]

    def free(self) -> list[int]:
        return [i for i in range(self.slots) if self.slot[i] is None]

    def to_dev(self, x) -> Tensor:
        """Host ints -> a long tensor on the device. Mid-window on CUDA through pinned memory,
        asynchronously: a copy from pageable memory waits for the GPU to drain its queue, which would
        stall the decode loop. At a sync the queue is empty and the plain copy is cheaper (pinning
        costs ~0.2 ms)."""
        t = x if isinstance(x, Tensor) else torch.tensor(x, dtype=torch.long)
        if self.in_window and self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def set_logits(self, i, row: Tensor) -> None:
        """logits[i] <- row (i: a slot or a device index of slots)."""
        if not self.logits_owned:      # the backend may own the buffer it returned: copy once, then write
            self.logits, self.logits_owned = self.logits.clone(), True
        self.logits[i] = row


def by_source(items: list[tuple]) -> list[tuple]:
    """[(slot, source state, its row)] -> [(source, slots, rows)], one group per source object."""
    groups: dict[int, tuple] = {}
    for i, src, row in items:
        g = groups.setdefault(id(src), (src, [], []))
        g[1].append(i)
        g[2].append(row)
    return list(groups.values())


def copy_rows_in(run: RunState, src, slots_: list[int], rows_: list[int]) -> None:
    """Slots <- those rows of `src`: one select (none when they are all of src, in order) and one load."""
    if rows_ != list(range(src.batch_size)):
        src = src.select(run.to_dev(rows_))
    run.backend.load_rows(src, run.to_dev(slots_))


# ------------------------------------------------------------------ retirement
def record_result(run: RunState, s: Sample, reason: str) -> None:
    """s is finished with `reason`: its GenResult goes to its place in run.results."""
    now = time.perf_counter()
    text = None
    if run.decode is not None:
        text = run.decode(s.tokens[:-1] if reason == "eos" else s.tokens)
    run.results[s.order] = GenResult(
        request_id=s.req.request_id, sample_index=s.index, prompt_ids=list(s.key),
        token_ids=s.tokens, text=text, logprobs=s.logprobs,
        model_logprobs=s.model_logprobs, finish_reason=reason, sampled_mask=s.mask,
        group_id=s.req.group_id, meta=s.req.meta, prefill_s=s.prefill_s,
        decode_s=now - s.t_load, ttft_s=s.ttft_s)
    run.stats.new_tokens += len(s.tokens)


def retire(run: RunState, i: int, reason: str) -> None:
    """Slot i's sample is finished with `reason`: record its result and free the slot."""
    record_result(run, run.slot[i], reason)
    run.slot[i] = None


# ------------------------------------------------------------------ admission
def prefill_pending(run: RunState, n_free: int) -> None:
    """Prefill the distinct prompts of the next queued samples that will get a slot now, together
    (`backend.prefill_many`: a few forwards instead of one per prompt)."""
    keys = list(dict.fromkeys(s.key for s in islice(run.queue, max(0, n_free - len(run.ready)))
                              if s.key not in run.prefilled))
    if not keys:
        return
    be, stats = run.backend, run.stats
    tp = time.perf_counter()
    if len(keys) > 1 and run.batched_prefill:
        lg, st = be.prefill_many(keys)
        dt = time.perf_counter() - tp
        done = [(lg, st, n, dt) for n in range(len(keys))]
    else:   # one prompt, or a backend without prefill_many
        outs = [be.prefill(torch.tensor(k, dtype=torch.long, device=run.device)) for k in keys]
        dt = time.perf_counter() - tp
        done = [(lg1[None], st1, 0, dt / len(keys)) for lg1, st1 in outs]
    for k, (lg_k, st_k, row, t_k) in zip(keys, done):
        run.prefilled[k] = Prefilled(lg_k, st_k, row, run.remaining_by_key[k], t_k)
        stats.prompt_tokens += len(k)
    stats.prefill_batches += len({id(d[1]) for d in done})
    stats.n_prefills += len(keys)
    stats.prefill_s += dt


def load(run: RunState, i: int, s: Sample) -> None:
    """Put sample s into free slot i: from its prompt's prefill (queued for `load_all`), or back from a pause
    (its saved row queued for `rollout.pauses.feed_all`)."""
    if s.resume is not None:   # from its state at the last sync, over (window up to the stop + injected)
        (src, row), pos = s.resume
        s.resume = None
        run.hash_keys[i] = sample_seed(s.params.seed, s.index)
        run.slot[i] = s
        run.to_feed.append((i, s, src, row, pos))
        return
    pf = run.prefilled[s.key]       # prefill_pending ran for it
    run.to_load.append((i, s, pf))
    if run.seen is not None:
        run.seen[i] = seen_mask([s.key], run.vocab, run.device)[0]
    s.gen = None if s.params.greedy else make_generator(s.params.seed, s.index, run.device)
    s.prefill_s = pf.prefill_s
    s.t_load = time.perf_counter()
    s.ttft_s = s.t_load - run.t0
    run.slot[i] = s
    pf.remaining -= 1
    if pf.remaining == 0:
        del run.prefilled[s.key]


def load_all(run: RunState) -> None:
    """Copy the prefilled states and logits of the samples `load` queued into their slots: one state
    copy per prefill batch, one write per per-slot tensor (not ~5 launches per slot)."""
    if not run.to_load:
        return
    logits_of = {id(pf.state): pf.logits for _, _, pf in run.to_load}
    for src, slots_, rows_ in by_source([(i, pf.state, pf.row) for i, _, pf in run.to_load]):
        copy_rows_in(run, src, slots_, rows_)
        run.set_logits(run.to_dev(slots_), logits_of[id(src)].index_select(0, run.to_dev(rows_)))
    host = torch.tensor([[i, sample_seed(s.params.seed, s.index)] for i, s, _ in run.to_load], dtype=torch.long)
    d = run.to_dev(host)
    run.force_len[d[:, 0]] = 0
    run.hash_keys[d[:, 0]] = d[:, 1]
    run.hash_count[d[:, 0]] = 0
    run.to_load.clear()


def admit(run: RunState) -> None:
    """Free slots <- samples back from a pause (`ready`) first, then queued ones in request order; the
    queued ones' prompts are prefilled first (each distinct prompt once) and their rows copied in."""
    free = run.free()
    if run.queue and free:
        prefill_pending(run, len(free))
    for i in free:
        if run.ready or run.queue:
            load(run, i, run.ready.popleft() if run.ready else run.queue.popleft())
    load_all(run)


def blank_idle(run: RunState) -> None:
    """Slots left free restart from the zero state (their attention positions must stay < max_len)."""
    idle = run.free()
    if idle:
        run.backend.load_rows(run.blank, run.to_dev(idle))
