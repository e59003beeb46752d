"""The agent loop on the engine: injection, teacher-forced equivalence, limits, failures, masks.

The model's "decisions" are scripted honestly: `ScriptedBackend` runs the real tiny model (its state
goes through prefill / step / extend / rewind exactly as in production) but returns logits that force
the token at each position from a script, so a test can make the model emit a good call, a broken
call, or many calls. The real logits are recorded so the state after an injection can be compared
with a fresh full prefill.
"""

import threading
import time

import pytest
import torch

from model.config import BitMambaConfig
from model.lm import BitMambaLM
from rollout.agent.loop import Agent, AgentConfig, ToolMessageFormat, agent_metrics, batch_fields
from rollout.backends import make_backend
from rollout.tokenizer import build_tiny_tokenizer
from rollout.agent.calculator import Calculator
from rollout.agent.tools import tool
from rollout.types import GenRequest, SamplingParams


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer(384)


@pytest.fixture(scope="module", params=["tiny", "tiny-hybrid"])
def model(request, tok):
    torch.manual_seed(0)
    cfg = BitMambaConfig.preset(request.param, vocab_size=len(tok), quant=dict(activation="none"))
    return BitMambaLM(cfg).eval()


class ScriptedBackend:
    """Wraps a real backend (TorchBackend or FastBackend) and returns logits that force
    `scripts[P][k]` as completion token k of a prompt of length P (the position comes from the row's
    real state, so rewinds and extends must be right for the script to line up); EOS past the script.
    `real` records (rows' state pos, real logits) after every extend and step; `n_extend` counts extends."""

    def __init__(self, inner, scripts: dict[int, list[int]], eos: int):
        self.inner, self.model = inner, inner.model
        self.scripts, self.eos, self.real, self.n_extend = scripts, eos, [], 0
        self.prompt_len_of_row: dict[int, int] = {}

    def __getattr__(self, name):          # allocate, refresh_weights, state, ...
        return getattr(self.inner, name)

    def _force(self, pos, plen):
        out = torch.full((len(pos), self.model.config.vocab_size), -40.0)
        for r, (p, P) in enumerate(zip(pos.tolist(), plen)):
            script = self.scripts.get(P, [])     # idle rows (blank state) get EOS
            k = p - P
            out[r, script[k] if 0 <= k < len(script) else self.eos] = 40.0
        return out

    def _plen(self, rows):
        return [self.prompt_len_of_row.get(int(r), 0) for r in rows]

    def prefill(self, ids):
        lg, st = self.inner.prefill(ids)
        return self._force(st.pos, [int(st.pos[0])])[0], st

    def prefill_many(self, prompts):
        lg, st = self.inner.prefill_many(prompts)
        return self._force(st.pos, st.pos.tolist()), st

    def load_rows(self, state1, rows):
        self.inner.load_rows(state1, rows)
        # which script a row follows: the longest prompt length <= its position (tests with two scripts
        # make the shorter episode end before the longer prompt's length, so this is unambiguous)
        for r in torch.as_tensor(rows).tolist():
            p = int(self.inner.state.pos[r])
            self.prompt_len_of_row[r] = max([P for P in self.scripts if P <= p] or [0])

    def extend(self, rows, ids):
        real = self.inner.extend(rows, ids)
        self.n_extend += 1
        rows_t = torch.as_tensor(rows)
        self.real.append((self.inner.state.pos[rows_t].clone(), real.clone()))
        return self._force(self.inner.state.pos[rows_t], self._plen(rows_t.tolist()))

    def step(self, tokens):
        real = self.inner.step(tokens)
        n = len(tokens)
        self.real.append((self.inner.state.pos[:n].clone(), real.clone()))
        return self._force(self.inner.state.pos[:n], self._plen(range(n)))


def enc(tok, s):
    return tok.encode(s, add_special_tokens=False)


def prompt_ids(tok, q):
    return enc(tok, f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n")


def call_ids(tok, name, args_json):
    return enc(tok, f'<tool_call>{{"name": "{name}", "arguments": {args_json}}}</tool_call>')


def run(model, tok, scripts, tools, cfg=None, reqs=None, max_new=300, slots=2, sync_every=8, kind="torch",
        force_max=64):
    be = ScriptedBackend(make_backend(model, kind), scripts, tok.eos_token_id)
    agent = Agent(be, tok, tools, cfg or AgentConfig(), slots=slots, sync_every=sync_every, force_max=force_max)
    try:
        params = SamplingParams(max_new_tokens=max_new, temperature=1.0, seed=3, eos_token_id=tok.eos_token_id)
        return agent.generate(reqs or [GenRequest(list(p), params) for p in scripts_prompts(scripts)]), be, agent
    finally:
        agent.close()


_PROMPTS: dict[int, list[int]] = {}


def scripts_prompts(scripts):
    return [_PROMPTS[P] for P in scripts]


def script_for(tok, prompt, *parts):
    _PROMPTS[len(prompt)] = prompt
    return {len(prompt): [t for p in parts for t in p]}


def test_injected_tokens_are_the_tool_output_tokenization(model, tok):
    p = prompt_ids(tok, "Compute 123456 * 789.")
    fmt = ToolMessageFormat(tok)
    result = str(123456 * 789)
    call = call_ids(tok, "calculator", '{"expression": "123456 * 789"}')
    answer = enc(tok, f"The result is {result}.<|im_end|>")
    (tr,), _, _ = run(model, tok, script_for(tok, p, call, fmt.ids(result), answer), [Calculator()])
    c = tr.tool_calls[0]
    assert c.status == "ok" and c.name == "calculator" and c.arguments == {"expression": "123456 * 789"}
    inj = tr.token_ids[c.token_start:c.token_end]
    assert inj == fmt.ids(result)                                            # exactly the tool message's tokens
    assert tok.decode(inj, skip_special_tokens=False) == (
        f"<|im_end|>\n<|im_start|>tool\n<tool_response>{result}</tool_response><|im_end|>\n<|im_start|>assistant\n")
    assert tr.token_ids == call + inj + answer
    assert tr.sampled_mask == [1] * len(call) + [0] * len(inj) + [1] * len(answer)
    assert all(lp == 0.0 for lp, m in zip(tr.logprobs, tr.sampled_mask) if m == 0)
    assert all(lp < 0.0 or lp == pytest.approx(0.0, abs=1e-3) for lp in tr.logprobs)
    assert tr.finish_reason == "stop" and tr.limit is None
    assert [m["role"] for m in tr.messages] == ["assistant", "tool", "assistant"]
    assert tr.messages[1]["content"] == f"<tool_response>{result}</tool_response>"
    assert tr.final_text == f"The result is {result}."
    f = tr.reward_fields()
    assert f["tool_calls"] == [{"name": "calculator", "arguments": {"expression": "123456 * 789"},
                                "result": f"<tool_response>{result}</tool_response>", "status": "ok",
                                "truncated": False}]


def assert_extend_matches_prefill(model, be, prompt, tr):
    """For every injected tool message: the real logits once the engine has fed it (forced decode steps
    or one extend) == a fresh forward. The last time a row reached that position is the one after the
    injection (steps past the stop reach lower positions, then are rewound)."""
    for c in tr.tool_calls:
        full = prompt + tr.token_ids[:c.token_end]
        with torch.no_grad():
            ref = model(torch.tensor([full])).logits[0, -1].float()
        got = [lg[r] for pos, lg in be.real for r in range(len(pos)) if int(pos[r]) == len(full)]
        assert got, "no step or extend ended at the end of the tool message"
        assert torch.allclose(got[-1], ref, atol=1e-4, rtol=0), float((got[-1] - ref).abs().max())
    assert tr.tool_calls


@pytest.mark.parametrize("force_max", [64, 0])
@pytest.mark.parametrize("kind", ["torch", "fast"])
def test_state_after_injection_equals_a_full_prefill(model, tok, kind, force_max):
    """Teacher-forced equivalence: the real logits after feeding the tool message (forced decode steps,
    force_max 64; one `extend`, force_max 0) equal the logits of a fresh forward over prompt +
    everything so far (within 1e-4, fp32)."""
    p = prompt_ids(tok, "Compute 2 ** 40 and then 3 ** 30.")
    fmt = ToolMessageFormat(tok)
    c1 = call_ids(tok, "calculator", '{"expression": "2 ** 40"}')
    c2 = enc(tok, "ok, next: ") + call_ids(tok, "calculator", '{"expression": "3 ** 30"}')
    script = script_for(tok, p, c1, fmt.ids(str(2 ** 40)), c2, fmt.ids(str(3 ** 30)), enc(tok, "done<|im_end|>"))
    # sync_every 8: the calls end mid-window, so the engine rewinds to its snapshot and replays
    if kind == "fast":
        pytest.importorskip("rollout.backends.triton_backend")
    (tr,), be, _ = run(model, tok, script, [Calculator()], sync_every=8, kind=kind, force_max=force_max)
    assert type(be.inner).__name__ == {"torch": "TorchBackend", "fast": "FastBackend"}[kind]
    assert be.n_extend == (0 if force_max else 2)      # which way the tool messages went in
    assert [c.status for c in tr.tool_calls] == ["ok", "ok"]
    assert_extend_matches_prefill(model, be, p, tr)


def test_broken_call_becomes_an_error_message_and_the_episode_continues(model, tok):
    p = prompt_ids(tok, "What is 7 * 6?")
    fmt = ToolMessageFormat(tok)
    broken = enc(tok, '<tool_call>{"name": "calculator", "arguments": {"expression": "7*6"</tool_call>')
    err = "error: tool call is not valid JSON (Expecting ',' delimiter at char 56): " \
          '{"name": "calculator", "arguments": {"expression": "7*6"'
    fixed = call_ids(tok, "calculator", '{"expression": "7*6"}')
    script = script_for(tok, p, broken, fmt.ids(err), fixed, fmt.ids("42"), enc(tok, "42<|im_end|>"))
    (tr,), be, _ = run(model, tok, script, [Calculator()], sync_every=3)
    assert [c.status for c in tr.tool_calls] == ["malformed", "ok"]
    assert_extend_matches_prefill(model, be, p, tr)      # also on the synchronous (immediate) injection path
    bad = tr.tool_calls[0]
    assert tr.token_ids[bad.token_start:bad.token_end] == fmt.ids(err)      # the model is told what was wrong
    assert tr.counts == {"calls": 2, "malformed": 1, "tool_errors": 0, "timeouts": 0, "truncated": 0}
    assert tr.final_text == "42" and tr.finish_reason == "stop"
    m = agent_metrics([tr])
    assert m["agent/tool_use_rate"] == 1.0 and m["agent/malformed_per_call"] == 0.5


def test_raising_hanging_and_huge_tools_yield_error_timeout_and_truncated_text(model, tok):
    release = threading.Event()

    @tool
    def boom(x: int):
        "raises"
        raise RuntimeError(f"tool crashed on {x}")

    @tool
    def stuck():
        "hangs"
        release.wait(60)
        return "late"

    @tool
    def flood():
        "1 MB"
        return "y" * (1 << 20)

    cfg = AgentConfig(tool_timeout_s=0.3, max_result_chars=64)
    fmt = ToolMessageFormat(tok)
    p = prompt_ids(tok, "Use the tools.")
    texts = ["error: RuntimeError: tool crashed on 1", "error: tool stuck timed out after 0.3 s",
             "y" * 64 + f"\n[truncated {(1 << 20) - 64} characters]"]
    parts = []
    for (name, args), t in zip([("boom", '{"x": 1}'), ("stuck", "{}"), ("flood", "{}")], texts):
        parts += [call_ids(tok, name, args), fmt.ids(t)]
    script = script_for(tok, p, *parts, enc(tok, "end<|im_end|>"))
    try:
        t0 = time.perf_counter()
        (tr,), _, _ = run(model, tok, script, [boom, stuck, flood], cfg=cfg, max_new=400)
        # the stuck tool would hold the episode 60 s: finishing well before proves the 0.3 s timeout
        # was honoured (decoding itself takes 2-25 s on a loaded 2-core machine)
        assert time.perf_counter() - t0 < 50
    finally:
        release.set()
    assert [c.status for c in tr.tool_calls] == ["error", "timeout", "ok"]
    assert tr.tool_calls[2].truncated
    for c, t in zip(tr.tool_calls, texts):
        assert tr.token_ids[c.token_start:c.token_end] == fmt.ids(t)
    assert tr.counts == {"calls": 3, "malformed": 0, "tool_errors": 1, "timeouts": 1, "truncated": 1}
    assert tr.final_text == "end"


def test_max_tool_calls_ends_the_episode(model, tok):
    p = prompt_ids(tok, "Loop.")
    fmt = ToolMessageFormat(tok)
    c = call_ids(tok, "calculator", '{"expression": "1+1"}')
    script = script_for(tok, p, c, fmt.ids("2"), c, fmt.ids("2"), enc(tok, "x<|im_end|>"))
    (tr,), _, _ = run(model, tok, script, [Calculator()], cfg=AgentConfig(max_tool_calls=1))
    assert tr.limit == "max_tool_calls" and tr.finish_reason == "stop"
    assert len(tr.tool_calls) == 1 and tr.token_ids == c + fmt.ids("2") + c     # stopped at the 2nd call


def test_token_budget_cuts_an_injection_and_finishes_length(model, tok):
    p = prompt_ids(tok, "Budget.")
    fmt = ToolMessageFormat(tok)
    c = call_ids(tok, "calculator", '{"expression": "10 ** 30"}')
    budget = len(c) + 5
    (tr,), _, _ = run(model, tok, script_for(tok, p, c, fmt.ids(str(10 ** 30))), [Calculator()], max_new=300,
                      cfg=AgentConfig(max_total_tokens=budget))
    assert tr.finish_reason == "length" and len(tr.token_ids) == budget
    assert tr.sampled_mask == [1] * len(c) + [0] * 5
    assert tr.token_ids[len(c):] == fmt.ids(str(10 ** 30))[:5]


def test_other_sequences_keep_decoding_while_a_tool_runs(model, tok):
    done_at = []

    @tool
    def slow():
        "sleeps"
        time.sleep(0.8)
        done_at.append(time.perf_counter())
        return "ok"

    fmt = ToolMessageFormat(tok)
    p1 = prompt_ids(tok, "Please use the slow tool, then say fine. " * 4)
    p2 = prompt_ids(tok, "Just talk.")
    filler = enc(tok, "The quick brown fox jumps over the lazy dog. " * 2)
    assert len(p2) + len(filler) + 1 < len(p1)
    scripts = {**script_for(tok, p1, call_ids(tok, "slow", "{}"), fmt.ids("ok"), enc(tok, "fine<|im_end|>")),
               **script_for(tok, p2, filler, enc(tok, "<|im_end|>"))}
    params = SamplingParams(max_new_tokens=200, temperature=1.0, seed=1, eos_token_id=tok.eos_token_id)
    t0 = time.perf_counter()
    (a, b), _, _ = run(model, tok, scripts, [slow], reqs=[GenRequest(p1, params, "a"), GenRequest(p2, params, "b")],
                       slots=1, sync_every=4)
    assert a.result.request_id == "a" and a.tool_calls[0].status == "ok" and a.final_text == "fine"
    assert b.token_ids == filler + enc(tok, "<|im_end|>") and not b.tool_calls
    # with ONE slot, b was decoded while a's tool was running (a was parked off-slot)
    assert t0 + b.result.ttft_s + b.result.decode_s < done_at[0]


def test_batch_fields_match_the_learner_collate_and_mask_injected_tokens(model, tok):
    from rl.grpo import algo
    from rl.grpo.learner import TrainBatch, collate

    p = prompt_ids(tok, "Compute 99 * 99.")
    fmt = ToolMessageFormat(tok)
    c = call_ids(tok, "calculator", '{"expression": "99 * 99"}')
    (tr,), _, _ = run(model, tok, script_for(tok, p, c, fmt.ids("9801"), enc(tok, "9801<|im_end|>")), [Calculator()])
    trajs = [tr, tr]
    f = batch_fields(trajs, valid=[True, False])
    assert f["loss_mask"][0] == [float(m) for m in tr.sampled_mask] and set(f["loss_mask"][1]) == {0.0}
    batch = TrainBatch(**f, advantages=[1.0, -1.0])
    mb = collate(batch, [0, 1])
    P, C = len(p), len(tr.token_ids)
    row = mb.mask[0, P - 1:P - 1 + C]
    assert row.tolist() == [float(m) for m in tr.sampled_mask]
    assert mb.mask[0].sum() == sum(tr.sampled_mask) and mb.mask[1].sum() == 0
    # masked targets are exactly the sampled tokens
    sampled = [t for t, m in zip(tr.token_ids, tr.sampled_mask) if m]
    assert mb.targets[0][mb.mask[0] > 0].tolist() == sampled
    # the loss has no gradient through injected positions and stays finite (0.0 rollout log-probs there)
    logp = torch.randn(mb.mask.shape, requires_grad=True)
    loss, m = algo.policy_loss(logp, logp.detach(), mb.advantages, mb.mask, algo.LossConfig(),
                               rollout_logp=mb.rollout_logp)
    loss.backward()
    assert torch.isfinite(loss)
    assert (logp.grad[mb.mask == 0] == 0).all() and (logp.grad[0][mb.mask[0] > 0] != 0).all()
