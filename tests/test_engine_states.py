"""The phases of `Engine.generate`, each alone on a `RunState`: queueing, admission, retirement, the decode
window and its token scan, pause / park / defer / rejoin, forced feeding. A tiny model on CPU."""

from concurrent.futures import Future

import pytest
import torch

from model.config import BitMambaConfig
from model.lm import BitMambaLM
from model.state import MambaState
from rollout.backends import TorchBackend
from rollout.engine import Engine
from rollout.pauses import (PauseView, collect_parked, feed_all, forced_steps, park_all, pause, rejoin,
                            resolve_waiting)
from rollout.sampling import sample_seed
from rollout.slots import admit, blank_idle, queue_samples, retire
from rollout.types import GenRequest, SamplingParams

V = 128
GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return BitMambaLM(BitMambaConfig.preset("tiny", vocab_size=V, quant=dict(activation="none"))).eval()


class CountingBackend(TorchBackend):
    def __init__(self, model):
        super().__init__(model)
        self.calls = []

    def prefill(self, ids):
        self.calls.append(("prefill", ids.tolist()))
        return super().prefill(ids)

    def prefill_many(self, prompts):
        self.calls.append(("prefill_many", [list(p) for p in prompts]))
        return super().prefill_many(prompts)

    def extend(self, rows, ids):
        self.calls.append(("extend", rows.tolist(), ids.tolist()))
        return super().extend(rows, ids)


def _run(model, requests, slots=3, **kw):
    eng = Engine(CountingBackend(model), slots=slots, **kw)
    with torch.no_grad():
        return eng, eng._start(requests, None, 0.0)


def _reqs(n=1, params=GREEDY, k=3):
    return [GenRequest([5 + r, 6, 7, 8 + r], SamplingParams(**{**params.__dict__, "n": n}), f"r{r}") for r in range(k)]


def _mamba_row(state, row):
    """A row's recurrent state: position and every Mamba layer's conv and SSM state."""
    return [state.pos[row]] + [t[row] for layer in state.layers if isinstance(layer, MambaState)
                               for t in (layer.conv, layer.ssm)]


def _hook(answer):
    return lambda view: answer


def test_queue_samples_orders_by_request_then_sample_and_counts_each_prompt():
    a, b = GenRequest([1, 2], SamplingParams(n=2)), GenRequest([3], None)
    queue, remaining = queue_samples([a, b, a], SamplingParams(n=3))
    assert [(s.req is a, s.index, s.order) for s in queue] == [
        (True, 0, 0), (True, 1, 1), (False, 0, 2), (False, 1, 3), (False, 2, 4), (True, 0, 5), (True, 1, 6)]
    assert remaining == {(1, 2): 4, (3,): 3}      # a prompt given twice is prefilled once for all 4


@torch.no_grad()
def test_admit_fills_free_slots_in_request_order_with_one_prefill_per_distinct_prompt(model):
    eng, run = _run(model, _reqs(n=2, k=2), slots=3)
    admit(run)
    assert [(s.req.request_id, s.index) for s in run.slot] == [("r0", 0), ("r0", 1), ("r1", 0)]
    assert [(s.req.request_id, s.index) for s in run.queue] == [("r1", 1)]
    assert eng.backend.calls == [("prefill_many", [[5, 6, 7, 8], [6, 6, 7, 9]])]
    assert run.stats.n_prefills == 2 and run.stats.prefill_batches == 1 and run.stats.prompt_tokens == 8
    assert list(run.prefilled) == [(6, 6, 7, 9)] and run.prefilled[(6, 6, 7, 9)].remaining == 1
    ref = model(torch.tensor([[6, 6, 7, 9]])).logits[0, -1].float()
    assert torch.allclose(run.logits[2], ref, atol=1e-4) and torch.equal(run.logits[0], run.logits[1])
    assert run.hash_keys.tolist() == [sample_seed(0, 0), sample_seed(0, 1), sample_seed(0, 0)]
    retire(run, 1, "eos")
    admit(run)                                   # the freed slot takes the last sample from the kept prefill
    assert (run.slot[1].req.request_id, run.slot[1].index) == ("r1", 1) and not run.prefilled
    assert len(eng.backend.calls) == 1


@torch.no_grad()
def test_admit_gives_resumed_samples_the_first_free_slots(model):
    eng, run = _run(model, _reqs(k=2), slots=1)
    admit(run)
    s = run.slot[0]
    retire(run, 0, "length")
    s.resume = ((run.blank, 0), 0)
    run.ready.append(s)
    admit(run)
    assert run.slot[0] is s and s.resume is None and len(run.queue) == 1
    assert run.to_feed == [(0, s, run.blank, 0, 0)]     # its saved row is fed by feed_all, not prefilled


@torch.no_grad()
def test_retire_frees_the_slot_and_records_the_finish_reason(model):
    _, run = _run(model, _reqs(k=2), slots=2)
    run.decode = lambda ids: " ".join(map(str, ids))
    admit(run)
    s = run.slot[1]
    s.tokens, s.mask = [9, 10, 2], [1, 1, 1]
    retire(run, 1, "eos")
    assert run.slot[1] is None and run.slot[0] is not None and run.results[0] is None
    r = run.results[1]
    assert (r.request_id, r.finish_reason, r.token_ids, r.text) == ("r1", "eos", [9, 10, 2], "9 10")
    assert r.prompt_ids == [6, 6, 7, 9] and run.stats.new_tokens == 3


@torch.no_grad()
def test_blank_idle_zeroes_only_the_free_slots(model):
    _, run = _run(model, _reqs(k=1), slots=2)
    admit(run)
    live = run.backend.state
    for layer in live.layers:                  # dirty both rows
        if isinstance(layer, MambaState):
            layer.ssm.fill_(1.0)
    blank_idle(run)
    assert all(float(t.abs().max()) == 0 for t in _mamba_row(live, 1)[1:])
    assert all(float(t.abs().min()) == 1 for t in _mamba_row(live, 0)[2::2])


@torch.no_grad()
def test_decode_window_caps_steps_at_the_smallest_budget_and_the_scan_retires_at_length(model):
    p = SamplingParams(max_new_tokens=3, temperature=0.0)
    eng, run = _run(model, [GenRequest([5, 6, 7], p, "a"), GenRequest([8, 9], GREEDY, "b")], slots=2, sync_every=8)
    admit(run)
    active = run.active()
    k, toks, lps, mlps = eng._decode_window(run, active)
    assert k == 3 and run.stats.decode_steps == 3 and len(toks[0]) == 3
    assert lps[0] == [0.0] * 3                  # greedy: the sampling distribution is a point mass
    eng._sync(run, active, k, toks, lps, mlps)
    assert run.slot[0] is None and run.results[0].finish_reason == "length" and run.results[0].token_ids == toks[0]
    assert run.slot[1].tokens == toks[1]


@torch.no_grad()
def test_the_token_scan_stops_at_the_first_stop_and_drops_the_rest_of_the_window(model):
    p = SamplingParams(max_new_tokens=20, temperature=0.0, stop_token_ids=[40], stop_sequences=[[50, 51]])
    for take in ("_take_window", "_take_tokens"):
        eng, run = _run(model, [GenRequest([5, 6], p, "a")], slots=1)
        admit(run)
        toks = [30, 31, 40, 32]
        getattr(eng, take)(run, run.slot[0], 0, toks, [0.5] * 4, [0.25] * 4, 0, 4)
        r = run.results[0]
        assert (r.token_ids, r.finish_reason, r.logprobs, r.sampled_mask) == ([30, 31, 40], "stop", [0.5] * 3, [1] * 3)
    eng, run = _run(model, [GenRequest([5, 6], p, "a")], slots=1)
    admit(run)
    eng._take_tokens(run, run.slot[0], 0, [33, 50, 51, 34], [0.0] * 4, [0.0] * 4, 1, 4)   # lo=1: step 0 skipped
    assert run.results[0].token_ids == [50, 51]
    for take in ("_take_window", "_take_tokens"):      # a window longer than the budget left: cut at length
        eng, run = _run(model, [GenRequest([5, 6], p, "a")], slots=1)
        admit(run)
        run.slot[0].tokens = list(range(60, 78))
        getattr(eng, take)(run, run.slot[0], 0, [30, 31, 32, 33], [0.0] * 4, [0.0] * 4, 0, 4)
        assert run.results[0].token_ids[18:] == [30, 31] and run.results[0].finish_reason == "length"


@torch.no_grad()
def test_pause_injects_a_list_answer_and_queues_the_rewind(model):
    views = []
    _, run = _run(model, _reqs(k=1), slots=1, on_stop=lambda v: views.append(v) or [70, 71])
    admit(run)
    s = run.slot[0]
    s.tokens, s.mask, s.logprobs, s.model_logprobs = [30, 40], [1, 1], [0.0, 0.0], [0.0, 0.0]
    assert pause(run, 0, s, 40) is True
    assert isinstance(views[0], PauseView) and views[0].token_ids == [30, 40] and views[0].stop == 40
    assert s.tokens == [30, 40, 70, 71] and s.mask == [1, 1, 0, 0] and s.n_pauses == 1 and s.stop_floor == 4
    assert run.to_feed == [(0, s, run.snap, 0, 0)] and run.stats.pauses == 1
    run.on_stop = _hook(None)
    assert pause(run, 0, s, 40) is False and run.stats.pauses == 1


def _paused(model, defer, n_requests=2, slots=1, answer=None):
    """A run whose slot-0 sample paused on a Future (pending unless `answer`) at this sync."""
    fut = Future()
    if answer is not None:
        fut.set_result(answer)
    _, run = _run(model, _reqs(k=n_requests), slots=slots, on_stop=_hook(fut), defer=defer, park_wait_s=0)
    admit(run)
    run.snap.take()
    s = run.slot[0]
    s.tokens, s.mask, s.logprobs, s.model_logprobs = [40], [1], [0.0], [0.0]
    assert pause(run, 0, s, 40) and run.to_park == [(s, 0)]
    return run, s, fut


@torch.no_grad()
def test_park_all_parks_a_pending_sample_when_others_wait_for_its_slot(model):
    run, s, fut = _paused(model, defer=0)
    park_all(run)
    assert run.slot[0] is None and run.parked == [s] and run.stats.parked == 1 and not run.waiting
    src, row = s.parked[1]
    assert src.batch_size == 1 and row == 0 and not run.to_park


@torch.no_grad()
def test_park_all_holds_the_slot_for_defer_windows_then_resolve_waiting_parks(model):
    run, s, fut = _paused(model, defer=2)
    park_all(run)
    assert run.slot[0] is s and run.waiting == [(s, 0, 2)] and not run.parked
    resolve_waiting(run)
    assert run.waiting == [(s, 0, 1)]
    resolve_waiting(run)                         # windows used up while the queue waits: parked
    assert run.slot[0] is None and run.parked == [s] and not run.waiting


@torch.no_grad()
def test_a_pending_sample_keeps_its_slot_while_nobody_waits(model):
    run, s, fut = _paused(model, defer=0, n_requests=1)
    park_all(run)
    resolve_waiting(run)
    resolve_waiting(run)
    assert run.slot[0] is s and run.waiting == [(s, 0, 0)] and run.stats.parked == 0
    fut.set_result([70])
    resolve_waiting(run)
    assert not run.waiting and s.tokens == [40, 70] and run.stats.deferred == 1
    assert [e[:2] for e in run.to_feed] == [(0, s)]


@torch.no_grad()
def test_park_all_resumes_an_answered_future_in_its_slot(model):
    run, s, _ = _paused(model, defer=0, answer=[70, 71])
    park_all(run)
    assert run.slot[0] is s and s.parked is None and s.tokens == [40, 70, 71]
    assert run.to_feed == [(0, s, run.snap, 0, 0)] and run.stats.parked == 0


@torch.no_grad()
def test_a_parked_sample_resumes_in_another_slot_from_its_saved_row(model):
    run, s, fut = _paused(model, defer=0, n_requests=3, slots=2)
    saved = [t.clone() for t in _mamba_row(run.snap.live, 0)]
    run.backend.state.pos[0] += 5              # the slot decodes on past the snapshot
    park_all(run)
    assert run.parked == [s] and run.slot[0] is None
    admit(run)                                 # its slot takes the queued sample meanwhile
    assert run.slot[0].req.request_id == "r2"
    fut.set_result([70])
    collect_parked(run, block=False)
    assert list(run.ready) == [s] and s.resume is not None and not run.parked
    retire(run, 1, "length")
    admit(run)
    assert run.slot[1] is s and not run.ready
    feed_all(run)
    got = _mamba_row(run.backend.state, 1)
    assert all(torch.equal(a, b) for a, b in zip(got, saved))
    assert run.force_len[1] == 2 and s.n_force == 2    # replay of the stop token + the injection, forced
    assert run.hash_keys[1] == sample_seed(0, 0)


@torch.no_grad()
def test_collect_parked_finishes_a_sample_whose_hook_declines(model):
    run, s, fut = _paused(model, defer=0)
    park_all(run)
    fut.set_result(None)
    collect_parked(run, block=True)
    assert not run.parked and not run.ready and run.results[0].finish_reason == "stop"


@torch.no_grad()
def test_feed_all_forces_short_replays_and_extends_long_ones(model):
    for force_max, extends in ((8, 0), (1, 1)):
        eng, run = _run(model, _reqs(k=1), slots=1, on_stop=_hook([70, 71]), force_max=force_max)
        admit(run)
        run.snap.take()
        s = run.slot[0]
        s.tokens, s.mask, s.logprobs, s.model_logprobs = [40], [1], [0.0], [0.0]
        pause(run, 0, s, 40)
        feed_all(run)
        assert len([c for c in eng.backend.calls if c[0] == "extend"]) == extends and not run.to_feed
        if extends:
            assert run.force_len[0] == 0 and s.n_force == 0 and run.hash_count[0] == 3
        else:
            assert run.force_buf[0, :3].tolist() == [40, 70, 71] and s.n_force == 3
            assert run.stats.forced_tokens == 3


@torch.no_grad()
def test_forced_steps_give_each_rows_tokens_then_stop_forcing(model):
    _, run = _run(model, _reqs(k=1), slots=2, force_max=4)
    run.force_buf[0] = torch.tensor([11, 12, 13, 14])
    run.force_len[:] = torch.tensor([3, 0])
    mask, tok = forced_steps(run, slice(None), 2)
    assert mask.tolist() == [[True, True], [False, False]] and tok[0].tolist() == [11, 12]
    mask, tok = forced_steps(run, slice(None), 2)
    assert mask.tolist() == [[True, False], [False, False]] and tok[0, 0] == 13
    assert run.force_at.tolist() == [3, 0]


@torch.no_grad()
def test_rejoin_resumes_answered_joinable_samples_mid_window(model):
    for temperature, joins in ((0.0, True), (0.8, False)):    # generator noise (CPU default) resumes at a sync
        p = SamplingParams(max_new_tokens=12, temperature=temperature)
        fut = Future()
        _, run = _run(model, [GenRequest([5, 6, 7], p, "a")], slots=1, on_stop=_hook(fut), defer=2, park_wait_s=0)
        admit(run)
        run.snap.take()
        s = run.slot[0]
        s.tokens, s.mask, s.logprobs, s.model_logprobs = [40], [1], [0.0], [0.0]
        pause(run, 0, s, 40)
        park_all(run)
        assert run.waiting and rejoin(run, 2) is None          # not answered yet
        fut.set_result([70])
        fed = rejoin(run, 2)
        assert (fed is not None) == joins and bool(run.waiting) != joins
        if joins:
            assert fed.tolist() == [0] and s.n_force == 2 + 2 and run.stats.rejoined == 1
            assert s.fed_at_sync == 0           # its rewind point: the row it was fed from
