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

The call's shared state is one `rollout.slots.RunState`; the phases are functions over it: admission and
retirement in `rollout.slots`, pause / defer / park / rejoin and forced feeding in `rollout.pauses`, the
decode window and the sync's token scan here (`Engine._decode_window`, `Engine._take_tokens`).

Pausing (multi-turn tool use): `on_stop(view) -> list[int] | Future | None` is called when a
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
from collections.abc import Sequence

import torch
from torch import Tensor

from model.errors import BitMambaError
from rollout.pauses import (PauseView, StopHook, collect_parked, feed_all, forced_steps, park_all, pause,
                            rejoin, resolve_waiting)
from rollout.sampling import SamplingTensors, sample
from rollout.slots import RunState, Sample, admit, blank_idle, queue_samples, retire
from rollout.tokenizer import FastCodec
from rollout.types import GenRequest, GenResult, GenStats, SamplingParams

__all__ = ["Engine", "PauseView", "StopHook"]

log = logging.getLogger(__name__)


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
        run = self._start(requests, params, t0)
        while self._refill(run):
            active = run.active()
            if run.on_stop is not None:
                self._snapshot(run, active)
            k, toks, lps, mlps = self._decode_window(run, active)
            self._sync(run, active, k, toks, lps, mlps)
        stats = run.stats
        stats.wall_s = time.perf_counter() - t0
        self.last_stats = stats
        log.info("generate: %d samples, %d prefills, %d new tokens, %d steps x %d slots, %.2fs, %.1f tok/s",
                 stats.n_samples, stats.n_prefills, stats.new_tokens, stats.decode_steps, run.slots,
                 stats.wall_s, stats.tokens_per_s)
        return run.results  # type: ignore[return-value]

    def _start(self, requests: list[GenRequest], params: SamplingParams | None, t0: float) -> RunState:
        """The run state of a call: every request's samples queued, the backend's slots allocated."""
        queue, remaining_by_key = queue_samples(requests, params)
        need = max(len(s.key) + s.params.max_new_tokens for s in queue) + 1
        # never shrink: a backend keeps per-(slots, max_len) buffers and CUDA graphs, so a stable size
        # across calls avoids re-allocation and re-capture (pass max_len= to fix it up front)
        max_len = self.max_len or max(self._auto_max_len, -(-need // 256) * 256)
        self._auto_max_len = max_len if not self.max_len else 0
        if max_len < need:
            raise BitMambaError(f"Engine max_len {max_len} < longest prompt + max_new_tokens + 1 = {need}")
        be, dev = self.backend, self.device
        be.allocate(self.slots, max_len)
        return RunState.allocate(
            be, dev, self.slots, max_len, queue, remaining_by_key, len(requests),
            window=self.sync_every, use_hash=self.noise_kind(dev) == "hash",
            batched_prefill=self.batch_prefill and hasattr(be, "prefill_many"), on_stop=self.on_stop,
            force_max=self.force_max, defer=self.defer, park_wait_s=self.park_wait_s,
            decode=self._decode if self.tokenizer is not None else None, t0=t0)

    @staticmethod
    def _refill(run: RunState) -> bool:
        """Between windows: parked samples whose tool answered come back, free slots take samples (resumed
        first), rewound rows are fed, idle slots reset. -> False when no sample is left anywhere."""
        while True:
            if run.parked:
                collect_parked(run, block=False)
            admit(run)
            feed_all(run)
            blank_idle(run)
            if run.active():
                return True
            if not run.parked:
                return False
            collect_parked(run, block=True)    # every sample left waits for its tool

    @staticmethod
    def _snapshot(run: RunState, active: list[int]) -> None:
        """Every slot's recurrent state at this sync (a pause rewinds to it), and each active sample's position."""
        ts = time.perf_counter()
        run.snap.take()
        run.stats.snapshot_s += time.perf_counter() - ts
        for i in active:
            run.slot[i].fed_at_sync = len(run.slot[i].tokens) - run.slot[i].n_force

    # ------------------------------------------------------------------ decode window
    @staticmethod
    def _decode_window(run: RunState, active: list[int]) -> tuple[int, list, list, list]:
        """k decode steps for all slots at once (k <= sync_every, capped by the smallest remaining budget of
        the `active` slots' samples), with samples whose tool answers rejoining mid-window. -> k and the
        window's tokens, sampling log-probs and model log-probs on the host ([S][k] lists)."""
        slot, stats, S = run.slot, run.stats, run.slots
        st = SamplingTensors.from_params([x.params if x else None for x in slot], run.device)
        gens = [x.gen if x else None for x in slot]    # the window's generators (a rejoin does not swap them)
        drawing = any(g is not None for g in gens)
        hk = dict(keys=run.hash_keys, counters=run.hash_count) if run.use_hash and drawing else {}
        k = min([run.window] + [slot[i].n_force + slot[i].params.max_new_tokens - len(slot[i].tokens)
                                for i in active if slot[i].parked is None])
        td = time.perf_counter()
        force = None    # (mask, token) [S, k] each: the forced token of every (slot, step) of this window
        if any(slot[i].n_force for i in active):   # computed in a few launches up front
            force = forced_steps(run, slice(None), k)
        run.in_window = True
        for j in range(k):
            fed = rejoin(run, j) if run.waiting else None
            if fed is not None:      # their forced tokens from step j on (the rows were not forcing)
                if force is None:
                    force = (torch.zeros(S, k, dtype=torch.bool, device=run.device),
                             torch.zeros(S, k, dtype=torch.long, device=run.device))
                force[0][fed, j:], force[1][fed, j:] = forced_steps(run, fed, k - j)
            Engine._step(run, j, st, gens, hk, force)
        run.in_window = False
        stats.decode_steps += k
        stats.idle_slot_steps += (S - len(active)) * k
        toks, lps, mlps = (b[:, :k].tolist() for b in (run.buf_tok, run.buf_lp, run.buf_mlp))
        stats.decode_s += time.perf_counter() - td
        return k, toks, lps, mlps

    @staticmethod
    def _step(run: RunState, j: int, st: SamplingTensors, gens: list, hk: dict,
              force: tuple[Tensor, Tensor] | None) -> None:
        """Decode step j of the window: sample every slot on device (hk: the hash-noise keys and counters, or
        none; forced rows take their forced token), write the token and its log-probs into column j, and
        step the backend."""
        out = sample(run.logits, st, gens, seen=run.seen, **hk)      # temperature-only rows: one fused kernel
        tok = out.tokens
        if force is not None:            # rows replaying / injecting take the forced token instead
            tok = torch.where(force[0][:, j], force[1][:, j], tok)
        run.hash_count += 1
        run.buf_tok[:, j] = tok
        run.buf_lp[:, j] = out.logprobs
        run.buf_mlp[:, j] = out.model_logprobs
        if run.seen is not None:
            run.seen.scatter_(1, tok[:, None], True)
        run.logits = run.backend.step(tok)
        run.logits_owned = False

    # ------------------------------------------------------------------ sync
    def _sync(self, run: RunState, active: list[int], k: int, toks: list, lps: list, mlps: list) -> None:
        """After a window: each slot's sample takes its tokens up to its first stop (pausing or retiring
        there); then held samples resolve, this sync's paused samples stay or leave, rewound rows are fed."""
        for i in active:
            s = run.slot[i]
            if s.parked is not None:     # waiting for its tool (resolve_waiting): this window is discarded
                continue
            skip = min(k, s.n_force)     # forced steps: their tokens are in s.tokens already
            s.n_force -= skip
            if not (s.params.stop_sequences or s.params.stop_strings):
                self._take_window(run, s, i, toks[i], lps[i], mlps[i], skip, k)
            else:
                self._take_tokens(run, s, i, toks[i], lps[i], mlps[i], skip, k)
        resolve_waiting(run)
        park_all(run)
        feed_all(run)

    @staticmethod
    def _stopped(run: RunState, i: int, s: Sample, reason: str, what) -> None:
        """s (in slot i) completed a stop condition: a "stop" with budget left asks the hook (`pause`);
        otherwise, or when the hook declines, s retires with `reason`."""
        if not (reason == "stop" and run.on_stop is not None and len(s.tokens) < s.params.max_new_tokens
                and pause(run, i, s, what)):
            retire(run, i, reason)

    def _take_tokens(self, run: RunState, s: Sample, i: int, toks: list[int], lps: list[float],
                     mlps: list[float], lo: int, k: int) -> None:
        """Window steps lo..k-1 of slot i's sample, token by token up to its first stop (any kind) or length."""
        for j in range(lo, k):
            s.tokens.append(toks[j])
            s.logprobs.append(lps[j])
            s.model_logprobs.append(mlps[j])
            s.mask.append(1)
            m = self._stop_match(s, run.max_stop_chars)
            if m is not None:
                self._stopped(run, i, s, *m)
                return                # finished, or the rest of this window was rewound
            if len(s.tokens) >= s.params.max_new_tokens:
                retire(run, i, "length")
                return

    def _stop_match(self, s: Sample, max_stop_chars: int):
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

    def _take_window(self, run: RunState, s: Sample, i: int, toks: list[int], lps: list[float],
                     mlps: list[float], lo: int, k: int) -> None:
        """Window steps lo..k-1 of a sample whose only stops are tokens (EOS, stop_token_ids): the per-token
        loop of `_take_tokens`, as list slices up to the first stop or the length limit."""
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
            self._stopped(run, i, s, "eos" if t == p.eos_token_id else "stop", t)
        elif len(s.tokens) >= p.max_new_tokens:
            retire(run, i, "length")
