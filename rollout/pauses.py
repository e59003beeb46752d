"""The pause phases of `Engine.generate` (the tool-use seam): ask the hook at a stop, inject its answer,
defer / park / rejoin a sample whose answer is a pending Future, and feed rewound rows their tokens.

    pause(run, i, s, stop)     # at a stop: the hook's ids resume s, None finishes it, a Future pauses it
    resolve_waiting(run)       # at a sync: held slots whose Future answered resume, the rest wait or park
    park_all(run)              # at a sync: this sync's Futures: answered ones resume, pending ones are held
    feed_all(run)              # rewound slots <- their saved rows; their replay + injection queued as forced
    rejoin(run, j)             # inside a window, before step j: answered held samples resume there
    collect_parked(run, block) # parked samples whose Future answered -> run.ready (admitted before new ones)

The module doc of `rollout.engine` says how a pause runs end to end.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field

import torch
from torch import Tensor

from rollout.sampling import make_generator, sample_seed, seen_mask
from rollout.slots import RunState, Sample, by_source, copy_rows_in, record_result, retire
from rollout.types import GenRequest


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


# ------------------------------------------------------------------ answers
def add_injected(run: RunState, s: Sample, inject) -> list[int]:
    """Append the hook's ids to s (cut to its token budget) as injected tokens; s resumes after them."""
    inject = [int(t) for t in inject][: s.params.max_new_tokens - len(s.tokens)]
    s.tokens += inject
    s.logprobs += [0.0] * len(inject)
    s.model_logprobs += [0.0] * len(inject)
    s.mask += [0] * len(inject)
    s.stop_floor = len(s.tokens)
    s.n_pauses += 1
    if s.gen is not None:   # a fresh stream per resume: draws wasted past the stop do not matter
        s.gen = make_generator(sample_seed(s.params.seed, s.index), s.n_pauses, run.device)
    return inject


def take_answer(run: RunState, s: Sample, answer) -> str | None:
    """Inject the hook's answer into s; -> the finish reason if that ends it ("stop": no answer,
    "length": the injection filled the budget), else None (it goes on)."""
    if answer is None:
        return "stop"
    add_injected(run, s, answer)
    return "length" if len(s.tokens) >= s.params.max_new_tokens else None


def answer_in_slot(run: RunState, i: int, s: Sample, answer) -> None:
    """The hook's answer for s, still in slot i: finish it, or queue the rewind + injection."""
    reason = take_answer(run, s, answer)
    if reason:
        retire(run, i, reason)
    else:
        run.to_feed.append((i, s, run.snap, i, s.fed_at_sync))


def pause(run: RunState, i: int, s: Sample, stop) -> bool:
    """Ask the hook at a stop. False: finish the sample. True: it was resumed or will be parked."""
    answer = run.on_stop(PauseView(s.req, s.index, list(s.tokens), stop, s.n_pauses, run.decode))
    if answer is None:
        return False
    run.stats.pauses += 1
    if isinstance(answer, Future):   # asynchronous tool: decided in park_all, after this sync's slots;
        # the replay of the window waits for the answer, so that it is fed together with the injection
        s.parked = (answer, None, s.fed_at_sync)
        run.to_park.append((s, i))
        return True
    answer_in_slot(run, i, s, answer)
    return True


# ------------------------------------------------------------------ feeding rewound rows
def _queue_forced(run: RunState, forced: list[tuple], skip: int) -> None:
    """Write the replay + injection of each (slot, sample, pos) into the force buffers: one host->device
    copy for all of them; the slots' next decode steps take those tokens instead of sampling."""
    FB = run.force_buf.shape[1]
    host = torch.zeros(len(forced), FB + 3, dtype=torch.long)   # [tokens | len | pos | slot]
    for n, (i, s, pos) in enumerate(forced):
        replay = s.tokens[pos:]
        host[n, : len(replay)] = torch.tensor(replay, dtype=torch.long)
        host[n, FB:] = torch.tensor([len(replay), pos, i])
        s.n_force = skip + len(replay)
        run.stats.forced_tokens += len(replay)
    d = run.to_dev(host)
    rows = d[:, FB + 2]
    run.force_buf[rows] = d[:, :FB]
    run.force_len[rows] = d[:, FB]
    run.force_at[rows] = 0
    run.hash_count[rows] = d[:, FB + 1]     # the forced steps count up to len(s.tokens)


def feed_all(run: RunState, at: int | None = None) -> Tensor | None:
    """For each queued (i, s, src, row, pos): slot i (holding s) <- row `row` of state `src`, the state
    after s.tokens[:pos]; s.tokens[pos:] (the window up to the stop + injected ids) are fed next by
    forced decode steps, or by one extend if longer than force_max. One state copy per source and
    one host->device copy for all the forced rows (a pause costs a few launches, not ~100).
    at (rejoin): inside the window, before its step `at`; the slots' `at` steps so far are discarded
    too, and their rewind point moves here (the window's snapshot of them predates the resume, even
    at step 0). -> (at given) the fed slots, as a device tensor; else None."""
    to_feed, snap = run.to_feed, run.snap
    if not to_feed:
        return None
    skip = at or 0
    for src, slots_, rows_ in by_source([(i, src, row) for i, _, src, row, _ in to_feed]):
        if src is snap:            # resumed at the sync in their own slot (row == slot)
            snap.restore(run.to_dev(slots_))
        else:
            copy_rows_in(run, src, slots_, rows_)
    forced = [(i, s, pos) for i, s, _, _, pos in to_feed if len(s.tokens) - pos <= run.force_max]
    if forced:
        _queue_forced(run, forced, skip)
    for i, s, _, _, pos in to_feed:
        if len(s.tokens) - pos > run.force_max:
            run.force_len[i] = 0
            replay = run.to_dev([s.tokens[pos:]])
            run.set_logits(i, run.backend.extend(run.to_dev([i]), replay)[0])
            run.hash_count[i] = len(s.tokens)
            s.n_force = skip
        if run.seen is not None:
            run.seen[i] = seen_mask([list(s.key) + s.tokens], run.vocab, run.device)[0]
    fed = None
    if at is not None:
        fed = run.to_dev([i for i, *_ in to_feed])
        snap.take(fed)
        for i, s, _, _, pos in to_feed:
            s.fed_at_sync = len(s.tokens) - (s.n_force - at)
    to_feed.clear()
    return fed


def forced_steps(run: RunState, rows, n: int) -> tuple[Tensor, Tensor]:
    """For those slots (a device index, or slice(None)): which of the next n steps take a forced
    token, and which token ([R, n] each); their force cursors move past them."""
    fidx = run.force_at[rows, None] + torch.arange(n, device=run.device)
    mask = fidx < run.force_len[rows, None]
    run.force_at[rows] += mask.sum(1)
    return mask, run.force_buf[rows].gather(1, fidx.clamp(max=run.force_buf.shape[1] - 1))


# ------------------------------------------------------------------ defer, park, rejoin
def busy(run: RunState) -> bool:
    """Samples wait for a slot (queued, or back from a pause): a pending tool should not hold one."""
    return bool(run.queue or run.ready)


def joinable(run: RunState, s: Sample) -> bool:
    """Whether s may resume mid-window: its noise must not depend on where windows start (hash
    noise is keyed by token index; a per-sample generator would draw a timing-dependent amount)."""
    return run.use_hash or s.params.greedy


def park(run: RunState, s: Sample, i: int) -> None:
    """s leaves slot i until its Future answers (its saved row is in s.parked)."""
    run.stats.parked += 1
    run.parked.append(s)
    run.slot[i] = None


def blank_held(run: RunState, held: list[tuple]) -> None:
    """Slots held by samples waiting for their tool restart each window from the zero state, like idle
    ones: their discarded steps must not run positions past max_len (KV caches) however long the tool
    takes. Their real state (recurrent and KV) is in their saved row."""
    if held:
        run.backend.load_rows(run.blank, run.to_dev([i for _, i, _ in held]))


def _wait_for_answers(run: RunState, others: bool) -> None:
    """The GPU idles for this sync's pending Futures of samples that can only resume at a sync, or that
    would leave their slot at once (defer 0 with samples waiting for one): up to park_wait_s, again while
    each round brings answers (at most 8 rounds; fast calls queue behind each other). One that keeps its
    slot and resumes at the first decode step after its answer is not waited for (a step or two of its
    slot cost less than an idle GPU)."""
    pending = [s.parked[0] for s, _ in run.to_park
               if not s.parked[0].done() and (not joinable(run, s) or (others and not run.defer))]
    tw = time.perf_counter()
    for _ in range(8 if run.park_wait_s > 0 else 0):
        if not pending:
            break
        done, pending = wait(pending, timeout=run.park_wait_s)
        if not done:
            break
    run.stats.pause_wait_s += time.perf_counter() - tw


def park_all(run: RunState) -> None:
    """After a sync's pauses: a sample whose tool already answered stays in its slot (no state copy,
    no wait for a free slot); the others leave theirs, with their rows of the snapshot (one select): held
    in the slot for `defer` windows (while samples wait for a slot; else until answered) or parked."""
    leave = []
    others = busy(run)
    _wait_for_answers(run, others)
    for s, i in run.to_park:
        if s.parked[0].done():
            fut, s.parked = s.parked[0], None
            answer_in_slot(run, i, s, fut.result())
        else:
            leave.append((s, i))
    if leave:
        sub = run.snap.rows(run.to_dev([i for _, i in leave]))
        held = []
        for n, (s, i) in enumerate(leave):
            s.parked = (s.parked[0], (sub, n), s.parked[2])
            if run.defer or not others:
                held.append((s, i, run.defer))   # keeps its slot for now (decoding is discarded)
            else:
                park(run, s, i)
        blank_held(run, held)
        run.waiting.extend(held)
    run.to_park.clear()


def resolve_waiting(run: RunState) -> None:
    """Samples that kept their slot while their tool ran: resume them in the slot from their saved
    row (answered), keep waiting (windows left) or park them."""
    still = []
    for s, i, left in run.waiting:
        fut, (src, row), pos = s.parked
        if not fut.done():
            if not busy(run):            # nobody needs the slot: keep it, whatever `defer` says
                still.append((s, i, left))
            elif left > 1:
                still.append((s, i, left - 1))
            else:
                park(run, s, i)
            continue
        s.parked = None
        run.stats.deferred += 1
        reason = take_answer(run, s, fut.result())
        if reason:
            retire(run, i, reason)
        else:
            run.to_feed.append((i, s, src, row, pos))
    run.waiting[:] = still
    blank_held(run, still)


def rejoin(run: RunState, at: int) -> Tensor | None:
    """Before decode step `at`: waiting samples whose tool has answered (with ids that leave budget)
    resume in their slot now instead of at the next sync. -> their slots, or None."""
    for w in list(run.waiting):
        s, i, _ = w
        fut = s.parked[0]
        if not (joinable(run, s) and fut.done()) or fut.cancelled() or fut.exception() is not None:
            continue
        answer = fut.result()
        if answer is None or len(s.tokens) + len(answer) >= s.params.max_new_tokens:
            continue                      # it finishes: left to the sync
        run.waiting.remove(w)
        _, (src, row), pos = s.parked
        s.parked = None
        run.stats.deferred += 1
        run.stats.rejoined += 1
        take_answer(run, s, answer)
        run.to_feed.append((i, s, src, row, pos))
    return feed_all(run, at) if run.to_feed else None


def collect_parked(run: RunState, block: bool) -> None:
    """Move parked samples whose hook answered to `ready` (or finish them). block: first wait for one."""
    if block:
        wait([s.parked[0] for s in run.parked], return_when=FIRST_COMPLETED)
    for s in [s for s in run.parked if s.parked[0].done()]:
        run.parked.remove(s)
        fut, state1, pos = s.parked      # state1: (parked states, row)
        s.parked = None
        reason = take_answer(run, s, fut.result())
        if reason:
            record_result(run, s, reason)
            continue
        s.resume = (state1, pos)
        run.ready.append(s)
