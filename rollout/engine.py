"""The generation engine: continuous batching over a fixed set of slots, on any `DecodeBackend`.

    engine = Engine(make_backend(model), tokenizer=tok, slots=32)
    results = engine.generate([GenRequest(ids, SamplingParams(n=8, seed=7, max_new_tokens=256))])

How it runs (top to bottom in `generate`):
1. Every request becomes `n` samples, queued in order. Free slots take queued samples; the distinct
   prompts among them are prefilled together (`backend.prefill_many`: parallel forwards over
   left-padded batches) and each prompt's state row is copied into its samples' slots (`load_rows`):
   one prefill per distinct prompt, never n, and a few forwards per refill, not one per prompt.
2. A window of k <= `sync_every` decode steps for all slots at once: sample on device (per-row
   generators, no host sync), write the token and its two log-probs into column j of a device buffer,
   `backend.step(tokens)`. k is also capped by the smallest remaining length budget of the active
   samples, so a length finish never wastes steps.
3. Sync: copy the window to the host, append each slot's tokens until a stop condition (EOS, stop
   token, stop sequence, stop string, length); tokens sampled past it are discarded. Finished samples
   free their slot, idle slots are reset, and step 1 refills them.

Pausing (multi-turn tool use, issue 8): `on_stop(view) -> list[int] | Future | None` is called when a
sample hits a stop token/sequence/string. Returning token ids injects them (the sample's recurrent
state continues over them, no re-prefill) and the sample resumes; None finishes it ("stop").
Returning a `concurrent.futures.Future` (a tool running in a thread/process pool): if it has resolved
by the end of that sync's host work, the sample keeps its slot as with returned ids; otherwise its
state at the stop is saved (a 1-row copy) and it keeps its slot for up to `defer` windows while the tool
runs beside the GPU (the slot's decoding meanwhile is discarded). With hash noise (or greedy) the
decode loop checks the Future before every step and the sample resumes at the first step after the
answer, mid-window ("rejoined": its steps so far are discarded, its rewind point moves there); with a
per-sample generator it resumes at a sync, so that its noise does not depend on timing. If other
samples wait for a slot and it is still pending after `defer` windows, it is parked off-slot, its slot
takes other work meanwhile, and when the future resolves (to ids or None) the sample re-enters a slot
ahead of new samples.
Because the slot kept stepping past the stop until the sync, the engine snapshots the recurrent state
of every slot at each sync (`RowSnapshot`: in-place copies, KV caches excluded) and, on a pause, restores
the snapshot and feeds it
[the tokens since the snapshot, up to the stop] + [injected tokens]. Up to `force_max` such tokens are
fed by the slot's own decode steps (teacher-forced: the step takes the forced token instead of the
sampled one, so the other slots keep decoding and nothing extra is launched); longer ones take one
parallel forward (`backend.extend`). Injected tokens get `sampled_mask` 0.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from itertools import islice
from concurrent.futures import FIRST_COMPLETED, Future, wait
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from model.errors import BitMambaError
from rollout.backends.base import RowSnapshot
from rollout.tokenizer import FastCodec
from rollout.sampling import SamplingTensors, make_generator, sample, sample_seed, seen_mask
from rollout.types import GenRequest, GenResult, GenStats, SamplingParams

log = logging.getLogger(__name__)


@dataclass
class PauseView:
    """What an `on_stop` hook sees: the sample so far, and which stop condition fired.

    `text` (the decoded completion, None without an engine tokenizer) is decoded on first access: a
    hook that only looks at the last call's tokens does not pay for decoding the whole completion."""

    request: GenRequest
    sample_index: int
    token_ids: list[int]          # completion so far, ending with the stop token(s)
    stop: int | list[int] | str   # the stop token id, token sequence or string that matched
    n_pauses: int                 # how many times this sample was resumed already
    decode: Callable[[Sequence[int]], str] | None = field(default=None, repr=False)

    @property
    def text(self) -> str | None:
        if self.decode is None:
            return None
        if not hasattr(self, "_text"):
            self._text = self.decode(self.token_ids)
        return self._text


StopHook = Callable[[PauseView], "Sequence[int] | Future | None"]


@dataclass
class _Sample:
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
class _Prefilled:
    logits: Tensor            # [P, V] fp32: every prompt of its prefill batch
    state: Any                # P-row ModelState of that batch
    row: int                  # this prompt's row in both
    remaining: int            # samples still to load from it
    prefill_s: float          # the batch's prefill time


class Engine:
    """Continuous-batching generation over `backend` (a `DecodeBackend`).

    slots: rows decoded together (the batch size of every `step`).
    sync_every: decode steps between host checks for finished samples (tokens past a stop are
      computed and discarded; larger = fewer syncs, more waste).
    max_len: state capacity per slot (prompt + completion); default: the longest need so far rounded
      up to a multiple of 256 (it never shrinks, so backends keep their buffers and CUDA graphs).
    on_stop: the pause hook (see module doc); needs a backend with `state` and `extend`.
    force_max: at a pause, feed up to this many tokens (replay + injection) through the slot's decode
      steps; more go through one `backend.extend` (0 = always extend).
    park_wait_s: at a sync with pauses on Futures of samples that cannot resume mid-window (generator
      noise) or would leave their slot at once (defer=0 while others wait), wait up to this long for them, again while each round brings answers (at most
      8 rounds), with the GPU idle meanwhile: a calculator answers in ~0.2 ms, cheaper than a deferred
      window (0 = never wait). Samples that can resume mid-window are not waited for.
    defer: a sample whose Future is still pending keeps its slot (its state at the stop saved, the
      slot's decoding discarded) while the tool runs beside the GPU, and resumes in its slot when
      answered (mid-window with hash noise or greedy, else at a sync). While other samples wait for a
      slot it keeps it at most this many windows, then it is parked (0: park at once); while none wait,
      until answered (a parked sample would free a slot nobody needs). A window is ~10 ms on a GPU.
    batch_prefill: the distinct prompts of the samples entering free slots at once are prefilled together
      (`backend.prefill_many`: a few forwards, not one per prompt; same state up to fp rounding). False:
      one `backend.prefill` per prompt.
    noise: where the sampling randomness comes from, both replay a sample exactly whatever the
      batching: "generator" (a torch.Generator per sample; one small launch per row and step) or
      "hash" (`hash_exponential_noise` of (sample seed, token index): one batched computation,
      the better choice for many slots on GPU); "auto" (default) = "hash" on CUDA, "generator" on CPU.
      The two give different (equally valid) streams for the same seed.
    """

    def __init__(self, backend, tokenizer=None, slots: int = 8, sync_every: int = 8,
                 max_len: int | None = None, on_stop: StopHook | None = None, noise: str = "auto",
                 force_max: int = 64, park_wait_s: float = 0.002, batch_prefill: bool = True, defer: int = 2):
        if slots < 1 or sync_every < 1:
            raise BitMambaError(f"Engine: slots ({slots}) and sync_every ({sync_every}) must be >= 1")
        if on_stop is not None and not (hasattr(backend, "extend") and hasattr(backend, "state")):
            raise BitMambaError(f"Engine(on_stop=...): backend {type(backend).__name__} needs extend() and .state")
        self.backend = backend
        self.tokenizer = tokenizer
        self._codec = FastCodec(tokenizer) if tokenizer is not None else None
        self.slots = slots
        self.sync_every = sync_every
        self.max_len = max_len
        self.on_stop = on_stop
        if noise not in ("auto", "generator", "hash"):
            raise BitMambaError(f"Engine: noise must be 'auto', 'generator' or 'hash', got {noise!r}")
        self.noise = noise
        if force_max < 0:
            raise BitMambaError(f"Engine: force_max must be >= 0, got {force_max}")
        self.force_max = force_max
        if park_wait_s < 0:
            raise BitMambaError(f"Engine: park_wait_s must be >= 0, got {park_wait_s}")
        self.park_wait_s = park_wait_s
        self.batch_prefill = batch_prefill
        if defer < 0:
            raise BitMambaError(f"Engine: defer must be >= 0 windows, got {defer}")
        self.defer = defer
        self.last_stats = GenStats()
        self._auto_max_len = 0

    @property
    def device(self) -> torch.device:
        return next(self.backend.model.parameters()).device

    # ------------------------------------------------------------------ helpers
    def _decode(self, ids: Sequence[int]) -> str:
        return self._codec.decode(ids)

    def _text(self, s: _Sample, reason: str) -> str | None:
        if self.tokenizer is None:
            return None
        ids = s.tokens[:-1] if reason == "eos" else s.tokens
        return self._decode(ids)

    def _stop_match(self, s: _Sample, max_stop_chars: int):
        """The stop condition completed by s.tokens[-1] (a sampled token), or None."""
        p, toks = s.params, s.tokens
        t = toks[-1]
        if p.eos_token_id is not None and t == p.eos_token_id:
            return "eos", t
        if t in p.stop_token_ids:
            return "stop", t
        for seq in p.stop_sequences:
            n = len(seq)
            if len(toks) - n >= s.stop_floor and toks[-n:] == seq:
                return "stop", seq
        if p.stop_strings:
            # a string of c characters spans at most 4c byte-level tokens; decode only that tail
            lo = max(s.stop_floor, len(toks) - 4 * max_stop_chars - 4)
            tail = self._decode(toks[lo:])
            for st in p.stop_strings:
                if st in tail:
                    return "stop", st
        return None

    def _take_window(self, s: _Sample, i: int, toks: list[int], lps: list[float], mlps: list[float], lo: int,
                     k: int, finish, pause) -> None:
        """Window steps lo..k-1 of a sample whose only stops are tokens (EOS, stop_token_ids): the per-token
        loop with `_stop_match`, as list slices up to the first stop or the length limit."""
        p = s.params
        n = min(k, lo + p.max_new_tokens - len(s.tokens))
        stop = None
        for j in range(lo, n):
            t = toks[j]
            if t == p.eos_token_id or t in p.stop_token_ids:
                stop, n = j, j + 1
                break
        s.tokens += toks[lo:n]
        s.logprobs += lps[lo:n]
        s.model_logprobs += mlps[lo:n]
        s.mask += [1] * (n - lo)
        if stop is not None:
            t = toks[stop]
            reason = "eos" if t == p.eos_token_id else "stop"
            if not (reason == "stop" and self.on_stop is not None and len(s.tokens) < p.max_new_tokens
                    and pause(i, s, t)):
                finish(i, reason)
        elif len(s.tokens) >= p.max_new_tokens:
            finish(i, "length")

    def _validate(self, requests: list[GenRequest], params: SamplingParams | None) -> None:
        V = self.backend.model.config.vocab_size
        for r in requests:
            p = r.params or params
            if p is None:
                raise BitMambaError(f"request {r.request_id!r}: no SamplingParams (give params= or request.params)")
            bad = [t for t in r.prompt_ids if not 0 <= t < V]
            if bad:
                raise BitMambaError(f"request {r.request_id!r}: prompt token ids {bad[:5]} outside vocab [0, {V})")
            if p.stop_strings and self.tokenizer is None:
                raise BitMambaError(f"request {r.request_id!r}: stop_strings need an Engine tokenizer")

    def noise_kind(self, device: torch.device | str) -> str:
        """The noise source used on `device` ("auto" resolved)."""
        if self.noise != "auto":
            return self.noise
        return "hash" if torch.device(device).type == "cuda" else "generator"

    # ------------------------------------------------------------------ main loop
    @torch.no_grad()
    def generate(self, requests: Sequence[GenRequest], params: SamplingParams | None = None) -> list[GenResult]:
        """All samples of all requests, ordered by request then sample index."""
        requests = list(requests)
        if not requests:
            return []
        self._validate(requests, params)
        if self.backend.model.training:
            log.warning("Engine.generate: the model is in training mode (call model.eval() for rollouts)")
        t0 = time.perf_counter()
        be, dev, S = self.backend, self.device, self.slots
        V = be.model.config.vocab_size

        queue: deque[_Sample] = deque()
        remaining_by_key: dict[tuple[int, ...], int] = {}
        order = 0
        for r in requests:
            p = r.params or params
            key = tuple(r.prompt_ids)
            for i in range(p.n):
                queue.append(_Sample(req=r, params=p, index=i, order=order, key=key))
                order += 1
            remaining_by_key[key] = remaining_by_key.get(key, 0) + p.n
        n_samples = order
        need = max(len(s.key) + s.params.max_new_tokens for s in queue) + 1
        # never shrink: a backend keeps per-(slots, max_len) buffers and CUDA graphs, so a stable size
        # across calls avoids re-allocation and re-capture (pass max_len= to fix it up front)
        max_len = self.max_len or max(self._auto_max_len, -(-need // 256) * 256)
        self._auto_max_len = max_len if not self.max_len else 0
        if max_len < need:
            raise BitMambaError(f"Engine max_len {max_len} < longest prompt + max_new_tokens + 1 = {need}")
        be.allocate(S, max_len)
        blank = be.model.allocate_state(1, max_len, device=dev)   # zero state for idle slots
        use_penalty = any(s.params.repetition_penalty != 1.0 for s in queue)
        max_stop_chars = max([len(x) for s in queue for x in s.params.stop_strings] or [0])

        slot: list[_Sample | None] = [None] * S
        prefilled: dict[tuple[int, ...], _Prefilled] = {}
        results: list[GenResult | None] = [None] * n_samples
        stats = GenStats(n_requests=len(requests), n_samples=n_samples)
        logits = torch.zeros(S, V, device=dev)
        seen = torch.zeros(S, V, dtype=torch.bool, device=dev) if use_penalty else None
        W = self.sync_every
        buf_tok = torch.zeros(S, W, dtype=torch.long, device=dev)
        buf_lp = torch.zeros(S, W, device=dev)
        buf_mlp = torch.zeros(S, W, device=dev)
        use_hash = self.noise_kind(dev) == "hash"
        hash_keys = torch.zeros(S, dtype=torch.long, device=dev)      # sample_seed per slot
        hash_count = torch.zeros(S, dtype=torch.long, device=dev)     # tokens so far per slot
        parked: list[_Sample] = []       # waiting for an asynchronous hook (tool) result, off-slot
        ready: deque[_Sample] = deque()  # hook answered: go back into a slot before new samples
        snap = RowSnapshot(be.state) if self.on_stop is not None else None   # every slot at the last sync
        batched_prefill = self.batch_prefill and hasattr(be, "prefill_many")
        FB = max(1, self.force_max)
        force_buf = torch.zeros(S, FB, dtype=torch.long, device=dev)   # tokens to feed instead of sampling
        force_len = torch.zeros(S, dtype=torch.long, device=dev)
        force_at = torch.zeros(S, dtype=torch.long, device=dev)
        in_window = False     # True while decode steps are queued (mid-window rejoins)

        def to_dev(x) -> Tensor:
            """Host ints -> a long tensor on the device. Mid-window on CUDA through pinned memory,
            asynchronously: a copy from pageable memory waits for the GPU to drain its queue, which would
            stall the decode loop. At a sync the queue is empty and the plain copy is cheaper (pinning
            costs ~0.2 ms)."""
            t = x if isinstance(x, Tensor) else torch.tensor(x, dtype=torch.long)
            if in_window and dev.type == "cuda":
                return t.pin_memory().to(dev, non_blocking=True)
            return t.to(dev)

        def finish_sample(s: _Sample, reason: str) -> None:
            now = time.perf_counter()
            results[s.order] = GenResult(
                request_id=s.req.request_id, sample_index=s.index, prompt_ids=list(s.key),
                token_ids=s.tokens, text=self._text(s, reason), logprobs=s.logprobs,
                model_logprobs=s.model_logprobs, finish_reason=reason, sampled_mask=s.mask,
                group_id=s.req.group_id, meta=s.req.meta, prefill_s=s.prefill_s,
                decode_s=now - s.t_load, ttft_s=s.ttft_s)
            stats.new_tokens += len(s.tokens)

        def finish(i: int, reason: str) -> None:
            finish_sample(slot[i], reason)
            slot[i] = None

        logits_owned = True   # False while `logits` is the tensor backend.step returned

        def set_logits(i, row: Tensor) -> None:
            nonlocal logits, logits_owned
            if not logits_owned:      # the backend may own the buffer it returned: copy once, then write
                logits, logits_owned = logits.clone(), True
            logits[i] = row

        def load(i: int, s: _Sample) -> None:
            """Put a queued sample into slot i: from its prompt's prefill, or back from a pause."""
            if s.resume is not None:   # from its state at the last sync, over (window up to the stop + injected)
                (src, row), pos = s.resume
                s.resume = None
                hash_keys[i] = sample_seed(s.params.seed, s.index)
                slot[i] = s
                to_feed.append((i, s, src, row, pos))
                return
            pf = prefilled[s.key]       # prefill_pending ran for it
            to_load.append((i, s, pf))
            if seen is not None:
                seen[i] = seen_mask([s.key], V, dev)[0]
            s.gen = None if s.params.greedy else make_generator(s.params.seed, s.index, dev)
            s.prefill_s = pf.prefill_s
            s.t_load = time.perf_counter()
            s.ttft_s = s.t_load - t0
            slot[i] = s
            pf.remaining -= 1
            if pf.remaining == 0:
                del prefilled[s.key]

        def prefill_pending(n_free: int) -> None:
            """Prefill the distinct prompts of the next queued samples that will get a slot now, together
            (`backend.prefill_many`: a few forwards instead of one per prompt)."""
            keys = list(dict.fromkeys(s.key for s in islice(queue, max(0, n_free - len(ready)))
                                      if s.key not in prefilled))
            if not keys:
                return
            tp = time.perf_counter()
            if len(keys) > 1 and batched_prefill:
                lg, st = be.prefill_many(keys)
                dt = time.perf_counter() - tp
                done = [(lg, st, n, dt) for n in range(len(keys))]
            else:   # one prompt, or a backend without prefill_many
                outs = [be.prefill(torch.tensor(k, dtype=torch.long, device=dev)) for k in keys]
                dt = time.perf_counter() - tp
                done = [(lg1[None], st1, 0, dt / len(keys)) for lg1, st1 in outs]
            for k, (lg_k, st_k, row, t_k) in zip(keys, done):
                prefilled[k] = _Prefilled(lg_k, st_k, row, remaining_by_key[k], t_k)
                stats.prompt_tokens += len(k)
            stats.prefill_batches += len({id(d[1]) for d in done})
            stats.n_prefills += len(keys)
            stats.prefill_s += dt

        def by_source(items: list[tuple]) -> list[tuple]:
            """[(slot, source state, its row)] -> [(source, slots, rows)], one group per source object."""
            groups: dict[int, tuple] = {}
            for i, src, row in items:
                g = groups.setdefault(id(src), (src, [], []))
                g[1].append(i)
                g[2].append(row)
            return list(groups.values())

        def copy_rows_in(src, slots_: list[int], rows_: list[int]) -> None:
            """Slots <- those rows of `src`: one select (none when they are all of src, in order) and one load."""
            if rows_ != list(range(src.batch_size)):
                src = src.select(to_dev(rows_))
            be.load_rows(src, to_dev(slots_))

        def load_all() -> None:
            """Copy the prefilled states and logits of the samples `load` queued into their slots: one state
            copy per prefill batch, one write per per-slot tensor (not ~5 launches per slot)."""
            if not to_load:
                return
            logits_of = {id(pf.state): pf.logits for _, _, pf in to_load}
            for src, slots_, rows_ in by_source([(i, pf.state, pf.row) for i, _, pf in to_load]):
                copy_rows_in(src, slots_, rows_)
                set_logits(to_dev(slots_),
                           logits_of[id(src)].index_select(0, to_dev(rows_)))
            host = torch.tensor([[i, sample_seed(s.params.seed, s.index)] for i, s, _ in to_load], dtype=torch.long)
            d = to_dev(host)
            force_len[d[:, 0]] = 0
            hash_keys[d[:, 0]] = d[:, 1]
            hash_count[d[:, 0]] = 0
            to_load.clear()

        def refill() -> None:
            """Load resumed, then queued samples into free slots; reset the slots left idle."""
            free = [i for i in range(S) if slot[i] is None]
            if queue and free:
                prefill_pending(len(free))
            for i in free:
                if ready or queue:
                    load(i, ready.popleft() if ready else queue.popleft())
            load_all()
            feed_all()
            idle = [i for i in range(S) if slot[i] is None]
            if idle:   # keep idle rows bounded (attention positions must stay < max_len)
                be.load_rows(blank, to_dev(idle))

        def add_injected(s: _Sample, inject) -> list[int]:
            inject = [int(t) for t in inject][: s.params.max_new_tokens - len(s.tokens)]
            s.tokens += inject
            s.logprobs += [0.0] * len(inject)
            s.model_logprobs += [0.0] * len(inject)
            s.mask += [0] * len(inject)
            s.stop_floor = len(s.tokens)
            s.n_pauses += 1
            if s.gen is not None:   # a fresh stream per resume: draws wasted past the stop do not matter
                s.gen = make_generator(sample_seed(s.params.seed, s.index), s.n_pauses, dev)
            return inject

        to_load: list[tuple] = []     # (slot, sample, _Prefilled): loaded together by load_all
        to_feed: list[tuple] = []     # (slot, sample, state, its row, pos): fed together by feed_all
        to_park: list[tuple] = []     # (sample, slot) paused on a Future at this sync: see park_all
        waiting: list[tuple] = []     # (sample, slot, windows left) whose Future was pending: resolve_waiting

        def feed_all(at: int | None = None) -> Tensor | None:
            """For each queued (i, s, src, row, pos): slot i (holding s) <- row `row` of state `src`, the state
            after s.tokens[:pos]; s.tokens[pos:] (the window up to the stop + injected ids) are fed next by
            forced decode steps, or by one extend if longer than force_max. One state copy per source and
            one host->device copy for all the forced rows (a pause costs a few launches, not ~100).
            at (rejoin): inside the window, before its step `at`; the slots' `at` steps so far are discarded
            too, and their rewind point moves here (the window's snapshot of them predates the resume, even
            at step 0). -> (at given) the fed slots, as a device tensor; else None."""
            if not to_feed:
                return None
            skip = at or 0
            for src, slots_, rows_ in by_source([(i, src, row) for i, _, src, row, _ in to_feed]):
                if src is snap:            # resumed at the sync in their own slot (row == slot)
                    snap.restore(to_dev(slots_))
                else:
                    copy_rows_in(src, slots_, rows_)
            forced = [(i, s, pos) for i, s, _, _, pos in to_feed if len(s.tokens) - pos <= self.force_max]
            if forced:
                host = torch.zeros(len(forced), FB + 3, dtype=torch.long)   # [tokens | len | pos | slot]
                for n, (i, s, pos) in enumerate(forced):
                    replay = s.tokens[pos:]
                    host[n, : len(replay)] = torch.tensor(replay, dtype=torch.long)
                    host[n, FB:] = torch.tensor([len(replay), pos, i])
                    s.n_force = skip + len(replay)
                    stats.forced_tokens += len(replay)
                d = to_dev(host)
                rows = d[:, FB + 2]
                force_buf[rows] = d[:, :FB]
                force_len[rows] = d[:, FB]
                force_at[rows] = 0
                hash_count[rows] = d[:, FB + 1]     # the forced steps count up to len(s.tokens)
            for i, s, _, _, pos in to_feed:
                if len(s.tokens) - pos > self.force_max:
                    force_len[i] = 0
                    replay = to_dev([s.tokens[pos:]])
                    set_logits(i, be.extend(to_dev([i]), replay)[0])
                    hash_count[i] = len(s.tokens)
                    s.n_force = skip
                if seen is not None:
                    seen[i] = seen_mask([list(s.key) + s.tokens], V, dev)[0]
            fed = None
            if at is not None:
                fed = to_dev([i for i, *_ in to_feed])
                snap.take(fed)
                for i, s, _, _, pos in to_feed:
                    s.fed_at_sync = len(s.tokens) - (s.n_force - at)
            to_feed.clear()
            return fed

        def take_answer(s: _Sample, answer) -> str | None:
            """Inject the hook's answer into s; -> the finish reason if that ends it ("stop": no answer,
            "length": the injection filled the budget), else None (it goes on)."""
            if answer is None:
                return "stop"
            add_injected(s, answer)
            return "length" if len(s.tokens) >= s.params.max_new_tokens else None

        def answer_in_slot(i: int, s: _Sample, answer) -> None:
            """The hook's answer for s, still in slot i: finish it, or queue the rewind + injection."""
            reason = take_answer(s, answer)
            if reason:
                finish(i, reason)
            else:
                to_feed.append((i, s, snap, i, s.fed_at_sync))

        def park_all() -> None:
            """After a sync's pauses: a sample whose tool already answered stays in its slot (no state copy,
            no wait for a free slot); the others leave theirs, with their rows of the snapshot (one select)."""
            leave = []
            others = busy()
            # the GPU idles for a sample that can only resume at a sync, or that would leave its slot at once
            # (defer 0 with samples waiting for one); one that keeps its slot and resumes at the first decode
            # step after its answer is not waited for (a step or two of its slot cost less than an idle GPU)
            pending = [s.parked[0] for s, _ in to_park
                       if not s.parked[0].done() and (not joinable(s) or (others and not self.defer))]
            tw = time.perf_counter()
            for _ in range(8 if self.park_wait_s > 0 else 0):   # more rounds while answers keep coming
                if not pending:                                  # (fast calls queue behind each other)
                    break
                done, pending = wait(pending, timeout=self.park_wait_s)
                if not done:
                    break
            stats.pause_wait_s += time.perf_counter() - tw
            for s, i in to_park:
                if s.parked[0].done():
                    fut, s.parked = s.parked[0], None
                    answer_in_slot(i, s, fut.result())
                else:
                    leave.append((s, i))
            if leave:
                sub = snap.rows(to_dev([i for _, i in leave]))
                held = []
                for n, (s, i) in enumerate(leave):
                    s.parked = (s.parked[0], (sub, n), s.parked[2])
                    if self.defer or not others:
                        held.append((s, i, self.defer))   # keeps its slot for now (decoding is discarded)
                    else:
                        park(s, i)
                blank_held(held)
                waiting.extend(held)
            to_park.clear()

        def blank_held(held: list[tuple]) -> None:
            """Slots held by samples waiting for their tool restart each window from the zero state, like idle
            ones: their discarded steps must not run positions past max_len (KV caches) however long the tool
            takes. Their real state (recurrent and KV) is in their saved row."""
            if held:
                be.load_rows(blank, to_dev([i for _, i, _ in held]))

        def busy() -> bool:
            """Samples wait for a slot (queued, or back from a pause): a pending tool should not hold one."""
            return bool(queue or ready)

        def park(s: _Sample, i: int) -> None:
            stats.parked += 1
            parked.append(s)
            slot[i] = None

        def resolve_waiting() -> None:
            """Samples that kept their slot while their tool ran: resume them in the slot from their saved
            row (answered), keep waiting (windows left) or park them."""
            still = []
            for s, i, left in waiting:
                fut, (src, row), pos = s.parked
                if not fut.done():
                    if not busy():            # nobody needs the slot: keep it, whatever `defer` says
                        still.append((s, i, left))
                    elif left > 1:
                        still.append((s, i, left - 1))
                    else:
                        park(s, i)
                    continue
                s.parked = None
                stats.deferred += 1
                reason = take_answer(s, fut.result())
                if reason:
                    finish(i, reason)
                else:
                    to_feed.append((i, s, src, row, pos))
            waiting[:] = still
            blank_held(still)

        def forced_steps(rows, n: int) -> tuple[Tensor, Tensor]:
            """For those slots (a device index, or slice(None)): which of the next n steps take a forced
            token, and which token ([R, n] each); their force cursors move past them."""
            fidx = force_at[rows, None] + torch.arange(n, device=dev)
            mask = fidx < force_len[rows, None]
            force_at[rows] += mask.sum(1)
            return mask, force_buf[rows].gather(1, fidx.clamp(max=FB - 1))

        def joinable(s: _Sample) -> bool:
            """Whether s may resume mid-window: its noise must not depend on where windows start (hash
            noise is keyed by token index; a per-sample generator would draw a timing-dependent amount)."""
            return use_hash or s.params.greedy

        def rejoin(at: int) -> Tensor | None:
            """Before decode step `at`: waiting samples whose tool has answered (with ids that leave budget)
            resume in their slot now instead of at the next sync. -> their slots, or None."""
            for w in list(waiting):
                s, i, _ = w
                fut = s.parked[0]
                if not (joinable(s) and fut.done()) or fut.cancelled() or fut.exception() is not None:
                    continue
                answer = fut.result()
                if answer is None or len(s.tokens) + len(answer) >= s.params.max_new_tokens:
                    continue                      # it finishes: left to the sync
                waiting.remove(w)
                _, (src, row), pos = s.parked
                s.parked = None
                stats.deferred += 1
                stats.rejoined += 1
                take_answer(s, answer)
                to_feed.append((i, s, src, row, pos))
            return feed_all(at) if to_feed else None

        def pause(i: int, s: _Sample, stop) -> bool:
            """Ask the hook at a stop. False: finish the sample. True: it was resumed or will be parked."""
            answer = self.on_stop(PauseView(s.req, s.index, list(s.tokens), stop, s.n_pauses,
                                            self._decode if self.tokenizer else None))
            if answer is None:
                return False
            stats.pauses += 1
            if isinstance(answer, Future):   # asynchronous tool: decided in park_all, after this sync's slots;
                # the replay of the window waits for the answer, so that it is fed together with the injection
                s.parked = (answer, None, s.fed_at_sync)
                to_park.append((s, i))
                return True
            answer_in_slot(i, s, answer)
            return True

        def collect_parked(block: bool) -> None:
            """Move parked samples whose hook answered to `ready` (or finish them)."""
            if block:
                wait([s.parked[0] for s in parked], return_when=FIRST_COMPLETED)
            for s in [s for s in parked if s.parked[0].done()]:
                parked.remove(s)
                fut, state1, pos = s.parked      # state1: (parked states, row)
                s.parked = None
                reason = take_answer(s, fut.result())
                if reason:
                    finish_sample(s, reason)
                    continue
                s.resume = (state1, pos)
                ready.append(s)

        while True:
            if parked:
                collect_parked(block=False)
            refill()
            active = [i for i in range(S) if slot[i] is not None]
            if not active:
                if parked:
                    collect_parked(block=True)
                    continue
                break
            if self.on_stop is not None:
                ts = time.perf_counter()
                snap.take()
                stats.snapshot_s += time.perf_counter() - ts
                for i in active:
                    slot[i].fed_at_sync = len(slot[i].tokens) - slot[i].n_force
            forcing = any(slot[i].n_force for i in active)
            st = SamplingTensors.from_params([x.params if x else None for x in slot], dev)
            gens = [x.gen if x else None for x in slot]
            drawing = any(g is not None for g in gens)
            k = min([W] + [slot[i].n_force + slot[i].params.max_new_tokens - len(slot[i].tokens) for i in active
                           if slot[i].parked is None])
            td = time.perf_counter()
            if forcing:   # the forced token of every (slot, step) of this window, in a few launches up front
                fmask, ftok = forced_steps(slice(None), k)
            in_window = True
            for j in range(k):
                fed = rejoin(j) if waiting else None
                if fed is not None:      # their forced tokens from step j on (the rows were not forcing)
                    if not forcing:
                        fmask = torch.zeros(S, k, dtype=torch.bool, device=dev)
                        ftok = torch.zeros(S, k, dtype=torch.long, device=dev)
                        forcing = True
                    fmask[fed, j:], ftok[fed, j:] = forced_steps(fed, k - j)
                hk = dict(keys=hash_keys, counters=hash_count) if use_hash and drawing else {}
                out = sample(logits, st, gens, seen=seen, **hk)      # temperature-only rows: one fused kernel
                tok = out.tokens
                if forcing:                  # rows replaying / injecting take the forced token instead
                    tok = torch.where(fmask[:, j], ftok[:, j], tok)
                hash_count += 1
                buf_tok[:, j] = tok
                buf_lp[:, j] = out.logprobs
                buf_mlp[:, j] = out.model_logprobs
                if seen is not None:
                    seen.scatter_(1, tok[:, None], True)
                logits = be.step(tok)
                logits_owned = False
            in_window = False
            stats.decode_steps += k
            stats.idle_slot_steps += (S - len(active)) * k
            toks, lps, mlps = (b[:, :k].tolist() for b in (buf_tok, buf_lp, buf_mlp))
            stats.decode_s += time.perf_counter() - td
            for i in active:
                s = slot[i]
                if s.parked is not None:     # waiting for its tool (resolve_waiting): this window is discarded
                    continue
                skip = min(k, s.n_force)     # forced steps: their tokens are in s.tokens already
                s.n_force -= skip
                if not (s.params.stop_sequences or s.params.stop_strings):
                    self._take_window(s, i, toks[i], lps[i], mlps[i], skip, k, finish, pause)
                    continue
                for j in range(skip, k):
                    s.tokens.append(toks[i][j])
                    s.logprobs.append(lps[i][j])
                    s.model_logprobs.append(mlps[i][j])
                    s.mask.append(1)
                    m = self._stop_match(s, max_stop_chars)
                    if m is not None:
                        reason, what = m
                        if not (reason == "stop" and self.on_stop is not None
                                and len(s.tokens) < s.params.max_new_tokens and pause(i, s, what)):
                            finish(i, reason)
                        break                 # finished, or the rest of this window was rewound
                    if len(s.tokens) >= s.params.max_new_tokens:
                        finish(i, "length")
                        break
            resolve_waiting()
            park_all()
            feed_all()

        stats.wall_s = time.perf_counter() - t0
        self.last_stats = stats
        log.info("generate: %d samples, %d prefills, %d new tokens, %d steps x %d slots, %.2fs, %.1f tok/s",
                 stats.n_samples, stats.n_prefills, stats.new_tokens, stats.decode_steps, S,
                 stats.wall_s, stats.tokens_per_s)
        return results  # type: ignore[return-value]
