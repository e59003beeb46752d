"""Engine stop conditions, finish reasons, text, and the pause/inject hook (the tool-use seam)."""

import pytest
import torch

from model.config import BitMambaConfig
from model.lm import BitMambaLM
from rollout.backends import TorchBackend, make_backend
from rollout.engine import Engine
from rollout.reference import naive_generate
from rollout.tokenizer import build_tiny_tokenizer
from rollout.types import GenRequest, SamplingParams

GREEDY = dict(temperature=0.0)


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer(384)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = BitMambaConfig.preset("tiny-hybrid", vocab_size=len(tok), quant=dict(activation="none"))
    return BitMambaLM(cfg).eval()


@pytest.fixture(scope="module")
def prompt(tok):
    return tok.encode("Question: What is 12 + 35?", add_special_tokens=False)


@pytest.fixture(scope="module")
def greedy_ref(model, prompt):
    """40 greedy tokens from the naive reference (no stops)."""
    return naive_generate(model, prompt, SamplingParams(max_new_tokens=40, **GREEDY)).token_ids


def _first_new(seq, start):
    """Index >= start of a token that does not occur earlier in seq."""
    for i in range(start, len(seq)):
        if seq[i] not in seq[:i]:
            return i
    pytest.skip("no fresh token in the greedy reference")


_ANSWER_AT_STEP: list = []     # (future, ids) answered by the next decode step (a tool that finishes mid-window)


_ANSWER_AT_LOAD: list = []     # (future, ids) answered by the next load_rows (during the sync that paused it)


class _StepAnswers(TorchBackend):
    def load_rows(self, state1, rows):
        while _ANSWER_AT_LOAD:
            fut, ids = _ANSWER_AT_LOAD.pop()
            fut.set_result(ids)
        return super().load_rows(state1, rows)

    def step(self, tokens):
        for entry in list(_ANSWER_AT_STEP):
            entry[2] -= 1
            if entry[2] == 0:
                _ANSWER_AT_STEP.remove(entry)
                entry[0].set_result(entry[1])
        return super().step(tokens)


def _engine(model, tok=None, **kw):
    return Engine(_StepAnswers(model), tokenizer=tok, **kw)


def test_eos_stop_token_and_length_finish_reasons(model, tok, prompt, greedy_ref):
    i = _first_new(greedy_ref, 3)
    j = _first_new(greedy_ref, i + 2)
    reqs = [GenRequest(prompt, SamplingParams(max_new_tokens=40, eos_token_id=greedy_ref[i], **GREEDY), "eos"),
            GenRequest(prompt, SamplingParams(max_new_tokens=40, stop_token_ids=[greedy_ref[j], 999999],
                                              **GREEDY), "stop"),
            GenRequest(prompt, SamplingParams(max_new_tokens=6, **GREEDY), "len")]
    res = _engine(model, tok, slots=2, sync_every=8).generate(reqs)
    eos, stop, length = res
    assert eos.finish_reason == "eos" and eos.token_ids == greedy_ref[:i + 1]   # tokens past EOS discarded
    assert eos.text == tok.decode(greedy_ref[:i], skip_special_tokens=False)   # EOS not in the text
    assert len(eos.logprobs) == len(eos.model_logprobs) == len(eos.sampled_mask) == i + 1
    assert stop.finish_reason == "stop" and stop.token_ids == greedy_ref[:j + 1]
    assert stop.text == tok.decode(greedy_ref[:j + 1], skip_special_tokens=False)
    assert length.finish_reason == "length" and length.token_ids == greedy_ref[:6]


def test_stop_sequence_matches_across_sync_windows(model, prompt, greedy_ref):
    i = _first_new(greedy_ref, 5)
    seq = greedy_ref[i - 2:i + 1]            # ends with a fresh token: first full match ends at i
    for sync_every in (1, 2, 8):             # the sequence straddles window boundaries differently
        res = _engine(model, slots=1, sync_every=sync_every).generate(
            [GenRequest(prompt, SamplingParams(max_new_tokens=40, stop_sequences=[[7, 7, 7], seq], **GREEDY))])
        assert res[0].finish_reason == "stop" and res[0].token_ids == greedy_ref[:i + 1], sync_every


def test_stop_string_cuts_at_the_completing_token(model, tok, prompt, greedy_ref):
    text = tok.decode(greedy_ref, skip_special_tokens=False)
    s = text[len(text) // 2: len(text) // 2 + 3]
    k = next(n for n in range(1, 41) if s in tok.decode(greedy_ref[:n], skip_special_tokens=False))
    res = _engine(model, tok, slots=2, sync_every=8).generate(
        [GenRequest(prompt, SamplingParams(max_new_tokens=40, stop_strings=["\x00never", s], **GREEDY))])
    assert res[0].finish_reason == "stop"
    assert res[0].token_ids == greedy_ref[:k]
    assert res[0].text.endswith(s) or s in res[0].text


def test_length_window_is_capped_so_no_steps_are_wasted(model, prompt):
    eng = _engine(model, slots=1, sync_every=8)
    eng.generate([GenRequest(prompt, SamplingParams(max_new_tokens=5, **GREEDY))])
    assert eng.last_stats.decode_steps == 5


@pytest.mark.parametrize("kind", ["torch", "fast"])
def test_pause_hook_injects_tokens_and_resumes_like_a_full_prefill(model, tok, prompt, greedy_ref, kind):
    if kind == "fast":
        pytest.importorskip("rollout.backends.triton_backend")
    i = _first_new(greedy_ref, 4)
    stop_tok = greedy_ref[i]
    inject = tok.encode("<tool_response>47</tool_response>", add_special_tokens=False)
    calls = []

    def on_stop(view):
        calls.append((view.sample_index, list(view.token_ids), view.stop, view.n_pauses))
        assert view.text == tok.decode(view.token_ids, skip_special_tokens=False)   # decoded on access
        return inject if view.n_pauses == 0 else None

    params = SamplingParams(max_new_tokens=30, stop_token_ids=[stop_tok], **GREEDY)
    other = GenRequest(prompt[:5], SamplingParams(max_new_tokens=25, **GREEDY), "other")
    eng = Engine(make_backend(model, kind), tokenizer=tok, slots=2, sync_every=8, on_stop=on_stop)
    res = eng.generate([GenRequest(prompt, params, "tool"), other])
    r = res[0]
    head = greedy_ref[:i + 1] + inject
    assert calls[0] == (0, greedy_ref[:i + 1], stop_tok, 0)
    assert r.token_ids[:len(head)] == head
    assert r.sampled_mask == [1] * (i + 1) + [0] * len(inject) + [1] * (len(r.token_ids) - len(head))
    assert r.logprobs[i + 1:len(head)] == [0.0] * len(inject)
    # after the injection the sample continues exactly as a fresh run over the whole text would
    cont = naive_generate(model, prompt + head, SamplingParams(max_new_tokens=30 - len(head),
                                                               stop_token_ids=[stop_tok], **GREEDY))
    assert r.token_ids[len(head):] == cont.token_ids
    got = r.model_logprobs[len(head):]
    assert max(abs(a - b) for a, b in zip(got, cont.model_logprobs)) < 1e-4
    assert r.finish_reason == cont.finish_reason
    if cont.finish_reason == "stop":
        assert len(calls) == 2 and calls[1][3] == 1
    # the other slot decoded on undisturbed
    assert res[1].token_ids == naive_generate(model, prompt[:5], other.params).token_ids


def test_pause_hook_returning_none_finishes_with_stop(model, prompt, greedy_ref):
    i = _first_new(greedy_ref, 2)
    res = _engine(model, slots=1, on_stop=lambda v: None).generate(
        [GenRequest(prompt, SamplingParams(max_new_tokens=30, stop_token_ids=[greedy_ref[i]], **GREEDY))])
    assert res[0].finish_reason == "stop" and res[0].token_ids == greedy_ref[:i + 1]


def test_text_and_timing_fields(model, tok, prompt):
    eng = _engine(model, tok, slots=4)
    res = eng.generate([GenRequest(prompt, SamplingParams(max_new_tokens=8, temperature=1.0, n=3, seed=1),
                                   request_id="q", group_id=7, meta={"answer": "47"})])
    assert [(r.request_id, r.sample_index, r.group_id, r.meta["answer"]) for r in res] == \
        [("q", i, 7, "47") for i in range(3)]
    for r in res:
        assert r.text == tok.decode(r.token_ids, skip_special_tokens=False)
        assert r.prompt_ids == prompt
        assert 0 < r.prefill_s <= r.ttft_s and r.decode_s > 0
    assert eng.last_stats.n_prefills == 1 and eng.last_stats.prompt_tokens == len(prompt)


def test_async_hook_parks_the_sample_and_frees_its_slot(model, tok, prompt, greedy_ref):
    import threading
    import time
    from concurrent.futures import Future

    i = _first_new(greedy_ref, 3)
    inject = tok.encode("<tool_response>ok</tool_response>", add_special_tokens=False)
    done_at = []

    def on_stop(view):
        if view.n_pauses:
            return None
        fut = Future()

        def tool():
            time.sleep(0.3)
            done_at.append(time.perf_counter())
            fut.set_result(inject)
        threading.Thread(target=tool).start()
        return fut

    params = SamplingParams(max_new_tokens=24, stop_token_ids=[greedy_ref[i]], **GREEDY)
    other = GenRequest(prompt[:4], SamplingParams(max_new_tokens=6, **GREEDY), "other")
    t_start = time.perf_counter()
    a, b = _engine(model, tok, slots=1, sync_every=4, on_stop=on_stop).generate(
        [GenRequest(prompt, params, "tool"), other])
    assert t_start + b.ttft_s < done_at[0]          # "other" used the only slot while the tool ran
    assert b.token_ids == naive_generate(model, prompt[:4], other.params).token_ids
    head = greedy_ref[:i + 1] + inject
    assert a.token_ids[:len(head)] == head
    assert a.sampled_mask[i + 1:len(head)] == [0] * len(inject)
    cont = naive_generate(model, prompt + head, SamplingParams(max_new_tokens=24 - len(head),
                                                               stop_token_ids=[greedy_ref[i]], **GREEDY))
    assert a.token_ids[len(head):] == cont.token_ids and a.finish_reason == cont.finish_reason


def _async_tool_hook(inject: list[int], delay: float, pauses: int = 2):
    """A pause hook like the agent's: a Future answered with `inject`, `pauses` times per sample, then
    finish. delay 0: answered before the hook returns (the sample keeps its slot); else from a timer
    thread after `delay` s (the sample is parked off-slot and resumes later)."""
    import threading
    from concurrent.futures import Future

    def on_stop(view):
        if view.n_pauses >= pauses:
            return None
        fut = Future()
        if delay in ("step", "step10"):          # answered by the 1st / 10th decode step after the pause
            _ANSWER_AT_STEP.append([fut, inject, 1 if delay == "step" else 10])
        elif delay == "load":                    # after the sync's checks, before the next window's step 0
            _ANSWER_AT_LOAD.append((fut, inject))
        elif delay:
            threading.Timer(delay, fut.set_result, args=(inject,)).start()
        else:
            fut.set_result(inject)
        return fut
    return on_stop


def _defer(delay):
    """Seconds of delay exercise parking (defer 0: park at once, not timing-dependent); the rest the default."""
    return 0 if isinstance(delay, float) and delay else 2


def _check_parking(engine, delay):
    """delay 0: answered in the sync (no deferral, no parking); "step": answered during the next window
    (deferred: kept the slot, none parked); seconds: answered much later (parked)."""
    st = engine.last_stats
    assert st.pauses > 0
    if delay in ("step", "step10"):      # step10: in the second window (sync_every 8): defer=2 still waits
        assert st.deferred > 0 and st.parked == 0, (st.pauses, st.deferred, st.parked)
        assert st.rejoined > 0           # greedy / hash noise: resumed at the step after the answer, mid-window
    elif delay:
        assert st.parked > 0, (delay, st.pauses, st.parked)
    else:
        assert st.parked == 0 and st.deferred == 0, (st.pauses, st.deferred, st.parked)


@pytest.mark.parametrize("force_max, delay", [(64, 0.05), (0, 0.05), (64, 0.0), (64, "step"), (0, "step"),
                                                (64, "step10")])
def test_many_samples_parking_in_the_same_windows_match_one_slot_and_the_reference(model, tok, force_max, delay):
    """Several samples stop and park in the same sync windows (their states are selected from the
    snapshot together, and resumed rows are loaded and fed together): every sample equals its own
    one-slot run, and each stretch after an injection equals the naive reference from prompt + all
    tokens so far (forced decode steps, force_max 64; one extend, force_max 0)."""
    inject = tok.encode("<tool_response>ok</tool_response>", add_special_tokens=False)
    on_stop = _async_tool_hook(inject, delay)
    stops = list(range(40, 384, 2))              # half the vocabulary: every sample stops early and often

    params = SamplingParams(max_new_tokens=30, stop_token_ids=stops, **GREEDY)
    reqs = [GenRequest(tok.encode(f"Question {k}: what is {k} + {2 * k}?", add_special_tokens=False), params,
                       f"r{k}") for k in range(6)]
    eng = _engine(model, tok, slots=4, sync_every=8, on_stop=on_stop, force_max=force_max, defer=_defer(delay))
    many = eng.generate(reqs)
    _check_parking(eng, delay)
    assert sum(r.sampled_mask.count(0) for r in many) >= 6 * len(inject)     # at least one injection each
    for r, req in zip(many, reqs):
        one = _engine(model, tok, slots=1, sync_every=8, on_stop=on_stop, force_max=force_max,
                      defer=_defer(delay)).generate([req])[0]
        assert r.token_ids == one.token_ids and r.sampled_mask == one.sampled_mask
        # after the last injection: the naive reference from everything before it
        end = max(i for i, m in enumerate(r.sampled_mask) if m == 0) + 1
        rest = naive_generate(model, req.prompt_ids + r.token_ids[:end],
                              SamplingParams(max_new_tokens=30 - end, stop_token_ids=stops, **GREEDY))
        assert r.token_ids[end:] == rest.token_ids


@pytest.mark.parametrize("noise, delay", [("generator", 0.02), ("hash", 0.02), ("hash", 0.0), ("hash", "step")])
def test_sampled_pausing_rollouts_replay_exactly_whatever_the_slot_count(model, tok, noise, delay):
    """Temperature, top-k and a repetition penalty with pauses every few tokens: the forced steps of
    the replay and the injection draw noise like any step, so 5 slots and 1 slot give the same
    samples (per-sample seeds), for both noise sources."""
    inject = tok.encode("<tool_response>ok</tool_response>", add_special_tokens=False)
    on_stop = _async_tool_hook(inject, delay)

    p = SamplingParams(max_new_tokens=40, temperature=0.9, top_k=50, repetition_penalty=1.3, seed=5, n=3,
                       stop_token_ids=list(range(40, 384, 3)))
    reqs = [GenRequest(tok.encode(f"Q{k}: {k}+{k}?", add_special_tokens=False), p, f"r{k}") for k in range(4)]
    eng = _engine(model, tok, slots=5, on_stop=on_stop, noise=noise, defer=_defer(delay))
    a = eng.generate(reqs)
    _check_parking(eng, delay)
    b = _engine(model, tok, slots=1, on_stop=on_stop, noise=noise, defer=_defer(delay)).generate(reqs)
    assert sum(r.sampled_mask.count(0) for r in a) >= 12 * len(inject)       # pauses in (nearly) every sample
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [x for r in a for x in r.logprobs] == pytest.approx([x for r in b for x in r.logprobs], abs=1e-5)


@pytest.mark.parametrize("force_max, delay", [(64, "step"), (0, "step"), (64, "load"), (0, "load")])
def test_samples_resumed_mid_window_pause_again_in_that_window_and_every_stretch_matches_the_reference(
        model, tok, force_max, delay):
    """Answers arrive one decode step after the pause ("step"), or after the sync's checks but before the
    next window's first step ("load"), so samples resume inside a window; with a one-token injection and
    16-step windows they often stop again before that window ends, which rewinds to the rewind point set
    at the resume. Every stretch between injections equals the naive reference from prompt + all tokens
    before it, and 3 slots give the same samples as 1."""
    inject = tok.encode("<tool_response>", add_special_tokens=False)[:1]
    on_stop = _async_tool_hook(inject, delay, pauses=6)
    stops = list(range(40, 384, 2))
    params = SamplingParams(max_new_tokens=48, stop_token_ids=stops, **GREEDY)
    reqs = [GenRequest(tok.encode(f"Q{k}: {k} * {k + 3}?", add_special_tokens=False), params, f"r{k}")
            for k in range(5)]
    eng = _engine(model, tok, slots=3, sync_every=16, on_stop=on_stop, force_max=force_max)
    many = eng.generate(reqs)
    st = eng.last_stats
    assert st.rejoined >= 10 and st.parked == 0, (st.pauses, st.rejoined, st.parked)
    one = _engine(model, tok, slots=1, sync_every=16, on_stop=on_stop, force_max=force_max).generate(reqs)
    assert [r.token_ids for r in many] == [r.token_ids for r in one]
    for r, req in zip(many, reqs):
        starts = [0] + [e for e in range(1, len(r.sampled_mask)) if r.sampled_mask[e] and not r.sampled_mask[e - 1]]
        assert len(starts) >= 3
        for a in starts:
            b = next((e for e in range(a, len(r.sampled_mask)) if not r.sampled_mask[e]), len(r.sampled_mask))
            ref = naive_generate(model, req.prompt_ids + r.token_ids[:a],
                                 SamplingParams(max_new_tokens=48 - a, stop_token_ids=stops, **GREEDY))
            assert r.token_ids[a:b] == ref.token_ids[:b - a], (r.request_id, a)


def test_a_slow_tool_keeps_its_slot_when_no_sample_waits_for_one(model, tok):
    """Parking frees a slot for queued work; with none queued (every sample already in a slot) a sample
    whose tool takes several windows keeps its slot even with defer=0, and resumes mid-window."""
    inject = tok.encode("<tool_response>ok</tool_response>", add_special_tokens=False)
    on_stop = _async_tool_hook(inject, "step10", pauses=1)     # answered 10 steps (2.5 windows) later
    params = SamplingParams(max_new_tokens=24, stop_token_ids=list(range(40, 384, 2)), **GREEDY)
    reqs = [GenRequest(tok.encode(f"Q{k}: {k} - 1?", add_special_tokens=False), params, f"r{k}") for k in range(2)]
    eng = _engine(model, tok, slots=2, sync_every=4, on_stop=on_stop, defer=0)
    out = eng.generate(reqs)
    st = eng.last_stats
    assert st.pauses == 2 and st.parked == 0 and st.rejoined == 2, (st.pauses, st.parked, st.rejoined)
    for r, req in zip(out, reqs):
        end = max(i for i, m in enumerate(r.sampled_mask) if m == 0) + 1
        ref = naive_generate(model, req.prompt_ids + r.token_ids[:end],
                             SamplingParams(max_new_tokens=24 - end, stop_token_ids=params.stop_token_ids, **GREEDY))
        assert r.token_ids[end:] == ref.token_ids
    busy = _engine(model, tok, slots=1, sync_every=4, on_stop=on_stop, defer=0)
    busy.generate(reqs)
    assert busy.last_stats.parked >= 1      # the other sample waited for the only slot: the first one parked


def test_a_slot_held_for_many_windows_keeps_attention_positions_in_bounds(model, tok):
    """tiny-hybrid has attention layers: a sample holding its slot while its tool takes 300 decode steps
    (far past max_len) must not write KV entries past max_len, and resumes exactly."""
    from concurrent.futures import Future

    inject = tok.encode("<tool_response>ok</tool_response>", add_special_tokens=False)
    stops = list(range(40, 384, 2))

    def on_stop(view):
        if view.n_pauses:
            return None
        fut = Future()
        _ANSWER_AT_STEP.append([fut, inject, 300])
        return fut

    params = SamplingParams(max_new_tokens=24, stop_token_ids=stops, **GREEDY)
    prompt = tok.encode("Q: 7 * 8?", add_special_tokens=False)
    eng = _engine(model, tok, slots=1, sync_every=8, on_stop=on_stop, max_len=len(prompt) + 25)
    r = eng.generate([GenRequest(prompt, params, "r")])[0]
    assert eng.last_stats.decode_steps > 300 and eng.last_stats.parked == 0
    end = max(i for i, m in enumerate(r.sampled_mask) if m == 0) + 1
    ref = naive_generate(model, prompt + r.token_ids[:end],
                         SamplingParams(max_new_tokens=24 - end, stop_token_ids=stops, **GREEDY))
    assert r.token_ids[end:] == ref.token_ids
