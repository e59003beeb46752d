"""Multi-turn tool use on top of the rollout engine: the agent loop and its trajectories.

    tools = ToolSet([Calculator()], timeout_s=5)
    agent = Agent(make_backend(model), tok, tools, AgentConfig(max_tool_calls=4), slots=16)
    trajs = agent.generate([GenRequest(prompt_ids, SamplingParams(n=8, max_new_tokens=256))])
    fields = batch_fields(trajs)        # prompt_ids / completion_ids / rollout_logprobs / loss_mask

How one episode runs (everything below happens inside one `Engine.generate` call):
1. The engine samples the assistant turn. Two stop conditions are registered: the end of a tool
   call (`</tool_call>`: one special token when the tokenizer has it, else the stop string) and
   the end of the turn (`<|im_end|>`).
2. On `</tool_call>` the engine calls the agent's pause hook on the decode thread. The hook parses
   the call out of the text sampled since the last tool result (`rollout.agent.toolcall.last_call`):
   - malformed (not JSON, no name, ...): an error tool message is injected at once (counted);
   - well formed: the call goes to `ToolSet.submit` (thread pool / event loop, off the decode
     thread) and the hook returns a Future. The engine parks the sequence off-slot with a copy of
     its recurrent state; its slot decodes other sequences meanwhile.
   - over `max_tool_calls`: the episode ends (finish "stop", `limit` = "max_tool_calls").
3. When the tool answers (its text, an error, a timeout note, or a truncated text), the tool
   message `<|im_end|>\\n<|im_start|>tool\\n<tool_response>{result}</tool_response><|im_end|>\\n
   <|im_start|>assistant\\n` is tokenized and the engine continues the parked state over those
   tokens with `backend.extend` (no re-prefill of the history), then sampling resumes.
4. `<|im_end|>` (or EOS, or the token budget) ends the episode.

Limits per episode: `max_tool_calls`; the total completion budget (sampled + injected tokens) is
`SamplingParams.max_new_tokens`, capped by `max_total_tokens` (an injection that does not fit is cut
and the episode finishes "length"); `tool_timeout_s` per call (ToolSet); `max_result_chars` per result.

Trajectory conventions: `token_ids` = the whole completion (sampled and injected); `sampled_mask`
1 = sampled by the policy (trained), 0 = injected (tool messages; never trained, never in a
log-prob ratio); `logprobs` = the rollout's `logprobs` (under the distribution it sampled from:
temperature and filters applied; the behaviour policy of the RL importance weight) for
sampled tokens and 0.0 for injected ones (0.0 rather than NaN so that masked arithmetic such as
`exp(old - rollout) * mask` stays finite; always read them with the mask).

Tool results never inject format tokens: special-token strings inside a result (e.g. a script that
prints "<|im_end|>") are broken with a zero-width space before tokenizing (`neutralize`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

from model.errors import ConfigError
from rollout.engine import Engine, PauseView
from rollout.tokenizer import FastCodec
from rollout.agent.toolcall import ToolCall, last_call
from rollout.agent.runner import ToolOutcome, ToolSet
from rollout.chatml import IM_END, IM_START
from rollout.chatml import TOOL_CALL_END as CALL_END, TOOL_CALL_START as CALL_START
from rollout.chatml import TOOL_RESPONSE_END as RESP_END, TOOL_RESPONSE_START as RESP_START
from rollout.types import GenRequest, GenResult, SamplingParams

log = logging.getLogger(__name__)

ZWSP = "\u200b"


@dataclass
class AgentConfig:
    """Per-episode limits and the tool message format."""

    max_tool_calls: int = 4             # calls per episode; the next one ends the episode
    max_total_tokens: int | None = None  # cap on sampled + injected tokens (None: the request's max_new_tokens)
    tool_timeout_s: float = 10.0        # per call (a late tool's message says it timed out)
    max_result_chars: int = 2000        # a longer result is cut, with a note
    tool_workers: int = 8               # threads for synchronous tools
    tool_role: str = "tool"             # role of the injected message
    wrap_response: bool = True          # <tool_response>...</tool_response> around the result

    def __post_init__(self):
        if self.max_tool_calls < 0:
            raise ConfigError(f"agent.max_tool_calls: must be >= 0, got {self.max_tool_calls}")
        if self.tool_timeout_s <= 0:
            raise ConfigError(f"agent.tool_timeout_s: must be > 0, got {self.tool_timeout_s}")
        if self.max_total_tokens is not None and self.max_total_tokens < 1:
            raise ConfigError(f"agent.max_total_tokens: must be >= 1, got {self.max_total_tokens}")
        if self.max_result_chars < 1 or self.tool_workers < 1:
            raise ConfigError("agent.max_result_chars and agent.tool_workers must be >= 1")


@dataclass
class ToolCallRecord:
    """One call of an episode, as the reward sees it (`Trajectory.tool_calls`)."""

    name: str | None
    arguments: dict
    raw: str                     # the text between the tags, as sampled
    status: str                  # ok | malformed | unknown_tool | bad_arguments | error | timeout | bad_result
    result: str = ""             # the text injected as the tool message's content
    truncated: bool = False
    seconds: float = 0.0
    token_start: int = -1        # index in the completion of the first injected token
    token_end: int = -1          # one past the last injected token

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "arguments": self.arguments, "result": self.result, "status": self.status,
                "truncated": self.truncated}


@dataclass
class Trajectory:
    """One episode: the completion with its masks, the conversation and the calls. Per token [C]."""

    prompt_ids: list[int]          # [P]
    token_ids: list[int]           # [C] sampled and injected
    sampled_mask: list[int]        # [C] 1 sampled, 0 injected
    logprobs: list[float]          # [C] rollout model log-probs; 0.0 where injected
    text: str                      # decoded completion (special tokens kept)
    messages: list[dict]           # prompt messages (GenRequest.meta["messages"]) + assistant/tool turns
    tool_calls: list[ToolCallRecord]
    finish_reason: str             # eos | stop | length
    limit: str | None              # "max_tool_calls" when that limit ended the episode
    counts: dict[str, int]         # calls, malformed, tool_errors, timeouts, truncated
    result: GenResult              # the engine's result (ids, timing, group/meta)

    @property
    def final_text(self) -> str:
        """The last assistant message (where the answer is)."""
        for m in reversed(self.messages):
            if m["role"] == "assistant":
                return m["content"]
        return ""

    def reward_fields(self) -> dict[str, Any]:
        """Row fields for reward functions: `messages` and `tool_calls` (dicts), `final_text`."""
        return {"messages": self.messages, "tool_calls": [c.as_dict() for c in self.tool_calls],
                "final_text": self.final_text}


@dataclass
class _Episode:
    seg_start: int = 0                          # completion index where the current sampled segment starts
    calls: list[ToolCallRecord] = field(default_factory=list)
    limit: str | None = None


def neutralize(text: str, specials: Sequence[str]) -> str:
    """Break special-token strings inside tool output so they tokenize as text (a zero-width space
    after their first character)."""
    for s in specials:
        if s and s in text:
            text = text.replace(s, s[0] + ZWSP + s[1:])
    return text


class ToolMessageFormat:
    """Builds the injected token ids for one tool result, with special tokens as single ids.

    ids(result) == prefix + tokens(wrapped result) + suffix, where prefix/suffix are the ChatML frame
    `<|im_end|>\\n<|im_start|>{role}\\n` / `<|im_end|>\\n<|im_start|>assistant\\n`.
    """

    def __init__(self, tokenizer, role: str = "tool", wrap_response: bool = True):
        self.tok = tokenizer
        self.role = role
        self.wrap = wrap_response
        self.specials = [s for s in getattr(tokenizer, "all_special_tokens", [])]
        for s in (IM_START, IM_END, CALL_START, CALL_END, RESP_START, RESP_END):
            if s not in self.specials:
                self.specials.append(s)
        self.prefix = self._piece([IM_END, "\n", IM_START, f"{role}\n"])
        self.suffix = self._piece([IM_END, "\n", IM_START, "assistant\n"])
        self.resp_start = self._piece([RESP_START]) if wrap_response else []
        self.resp_end = self._piece([RESP_END]) if wrap_response else []
        self._lock = threading.Lock()
        self.codec = FastCodec(tokenizer)

    def _special(self, s: str) -> int | None:
        i = self.tok.convert_tokens_to_ids(s)
        return None if i is None or i == self.tok.unk_token_id else int(i)

    def _piece(self, parts: list[str]) -> list[int]:
        out: list[int] = []
        for p in parts:
            sid = self._special(p) if p.startswith("<") else None
            out += [sid] if sid is not None else self.tok.encode(p, add_special_tokens=False)
        return out

    def content(self, result: str) -> str:
        """The tool message's content as text (what `messages` records)."""
        body = neutralize(result, self.specials)
        return f"{RESP_START}{body}{RESP_END}" if self.wrap else body

    def text(self, result: str) -> str:
        return f"{IM_END}\n{IM_START}{self.role}\n{self.content(result)}{IM_END}\n{IM_START}assistant\n"

    def ids(self, result: str) -> list[int]:
        with self._lock:   # tool threads encode concurrently; the decode thread only decodes
            body = self.codec.encode(neutralize(result, self.specials))
        return self.prefix + self.resp_start + body + self.resp_end + self.suffix


class Agent:
    """The agent loop: an `Engine` whose pause hook runs tools (see the module doc).

    backend: a `DecodeBackend` with `state` and `extend`; tokenizer: HF tokenizer (ChatML
    specials recommended); tools: a `ToolSet` (or a list of tools, wrapped with the config's limits).
    """

    def __init__(self, backend, tokenizer, tools: ToolSet | list, config: AgentConfig | None = None,
                 slots: int = 8, sync_every: int = 8, max_len: int | None = None, noise: str = "auto",
                 force_max: int = 64, park_wait_s: float = 0.002, defer: int = 2):
        self.config = config or AgentConfig()
        c = self.config
        self.tools = tools if isinstance(tools, ToolSet) else ToolSet(
            tools, timeout_s=c.tool_timeout_s, max_result_chars=c.max_result_chars, workers=c.tool_workers)
        self.tok = tokenizer
        self.fmt = ToolMessageFormat(tokenizer, c.tool_role, c.wrap_response)
        self.call_end_id = self.fmt._special(CALL_END)
        self.turn_end_id = self.fmt._special(IM_END)
        self.engine = Engine(backend, tokenizer, slots=slots, sync_every=sync_every, max_len=max_len,
                             on_stop=self._on_stop, noise=noise, force_max=force_max,
                             park_wait_s=park_wait_s, defer=defer)
        self._episodes: dict[tuple[int, int], _Episode] = {}

    def close(self) -> None:
        self.tools.close()

    # ------------------------------------------------------------------ stops
    def stop_params(self, params: SamplingParams) -> SamplingParams:
        """`params` plus the agent's stop conditions (tool-call end, turn end)."""
        stop_ids = list(params.stop_token_ids)
        stop_strings = list(params.stop_strings)
        if self.call_end_id is not None:
            stop_ids.append(self.call_end_id)
        else:
            stop_strings.append(CALL_END)
        if self.turn_end_id is not None:
            stop_ids.append(self.turn_end_id)
        else:
            stop_strings.append(IM_END)
        budget = params.max_new_tokens
        if self.config.max_total_tokens is not None:
            budget = min(budget, self.config.max_total_tokens)
        return replace(params, stop_token_ids=stop_ids, stop_strings=stop_strings, max_new_tokens=budget)

    def _is_call_end(self, stop) -> bool:
        return stop == CALL_END or (self.call_end_id is not None and stop == self.call_end_id)

    def _on_stop(self, view: PauseView):
        """The engine's pause hook (decode thread): None ends the episode; ids or a Future resume it."""
        if not self._is_call_end(view.stop):
            return None                                      # end of turn / user stop: finish
        ep = self._episodes[(view.request.request_id, view.sample_index)]
        if len(ep.calls) >= self.config.max_tool_calls:
            ep.limit = "max_tool_calls"
            return None
        segment = self.fmt.codec.decode(view.token_ids[ep.seg_start:])
        call: ToolCall = last_call(segment)
        rec = ToolCallRecord(call.name, call.arguments, call.raw, "malformed")
        rec.token_start = len(view.token_ids)
        ep.calls.append(rec)
        if not call.ok:
            return self._inject(ep, rec, ToolOutcome(f"error: {call.error}", "malformed"))
        out: Future = Future()

        def done(f: Future) -> None:
            try:
                ids = self._inject(ep, rec, f.result())
            except Exception as e:   # never leave the engine waiting on a future that cannot resolve
                log.error("agent: building the tool message failed (%s: %s); ending the episode",
                          type(e).__name__, e)
                ids = None
            out.set_result(ids)
        self.tools.submit(call.name, call.arguments).add_done_callback(done)
        return out

    def _inject(self, ep: _Episode, rec: ToolCallRecord, o: ToolOutcome) -> list[int]:
        rec.status, rec.truncated, rec.seconds = o.status, o.truncated, o.seconds
        rec.result = self.fmt.content(o.text)
        ids = self.fmt.ids(o.text)
        rec.token_end = rec.token_start + len(ids)
        ep.seg_start = rec.token_end
        return ids

    # ------------------------------------------------------------------ run
    def generate(self, requests: Sequence[GenRequest], params: SamplingParams | None = None) -> list[Trajectory]:
        """Every sample of every request as a `Trajectory`, ordered like `Engine.generate`."""
        reqs = []
        for i, r in enumerate(requests):
            p = r.params or params
            if p is None:
                raise ConfigError(f"request {r.request_id!r}: no SamplingParams")
            reqs.append(GenRequest(r.prompt_ids, self.stop_params(p), request_id=i, group_id=r.group_id,
                                   meta=r.meta))
        self._episodes = {(i, k): _Episode() for i, r in enumerate(reqs) for k in range(r.params.n)}
        try:
            results = self.engine.generate(reqs)
        finally:
            episodes, self._episodes = self._episodes, {}
        out = []
        for res in results:
            ep = episodes[(res.request_id, res.sample_index)]
            res.request_id = requests[res.request_id].request_id
            out.append(self._trajectory(res, ep))
        return out

    def _full_text(self, res: GenResult) -> str:
        """The completion decoded with its special tokens; the engine decoded it already (without the EOS)."""
        if res.text is None:
            return self.fmt.codec.decode(res.token_ids)
        if res.finish_reason == "eos":
            return res.text + self.fmt.codec.decode(res.token_ids[-1:])
        return res.text

    def _trajectory(self, res: GenResult, ep: _Episode) -> Trajectory:
        ids, mask = res.token_ids, res.sampled_mask or [1] * len(res.token_ids)
        calls = [c for c in ep.calls if c.token_end >= 0 and c.token_start < len(ids)]
        messages: list[dict] = [dict(m) for m in (res.meta or {}).get("messages", [])]
        pos = 0
        for c in calls:
            seg = self.fmt.codec.decode(ids[pos:c.token_start])
            messages.append({"role": "assistant", "content": seg,
                             "tool_calls": [{"name": c.name, "arguments": c.arguments}] if c.name else []})
            messages.append({"role": self.config.tool_role, "content": c.result, "status": c.status})
            pos = c.token_end
        tail = ids[pos:] if pos <= len(ids) else []
        final = self.fmt.codec.decode(tail)
        for end in (IM_END, self.tok.eos_token or ""):
            if end and final.endswith(end):
                final = final[:-len(end)]
        messages.append({"role": "assistant", "content": final, "tool_calls": []})
        counts = {"calls": len(ep.calls),
                  "malformed": sum(c.status == "malformed" for c in ep.calls),
                  "tool_errors": sum(c.status in ("error", "unknown_tool", "bad_arguments", "bad_result")
                                     for c in ep.calls),
                  "timeouts": sum(c.status == "timeout" for c in ep.calls),
                  "truncated": sum(c.truncated for c in ep.calls)}
        return Trajectory(prompt_ids=list(res.prompt_ids), token_ids=list(ids), sampled_mask=list(mask),
                          logprobs=[lp if m else 0.0 for lp, m in zip(res.logprobs, mask)],
                          text=self._full_text(res), messages=messages,
                          tool_calls=ep.calls, finish_reason=res.finish_reason, limit=ep.limit,
                          counts=counts, result=res)


def batch_fields(trajs: Sequence[Trajectory], mask_truncated: bool = False,
                 valid: Sequence[bool] | None = None) -> dict[str, list]:
    """The learner's per-sample fields (`rl.grpo.learner.TrainBatch` minus advantages), as plain lists.

    prompt_ids [N][P_i], completion_ids [N][C_i], rollout_logprobs [N][C_i] (0.0 on injected tokens),
    loss_mask [N][C_i]: 1.0 on sampled tokens, 0.0 on injected ones; a whole row is 0 when
    `valid[i]` is False or (`mask_truncated`) the episode ended at the length limit.
    """
    out: dict[str, list] = {"prompt_ids": [], "completion_ids": [], "rollout_logprobs": [], "loss_mask": []}
    for i, t in enumerate(trajs):
        keep = (valid is None or bool(valid[i])) and not (mask_truncated and t.finish_reason == "length")
        out["prompt_ids"].append(list(t.prompt_ids))
        out["completion_ids"].append(list(t.token_ids))
        out["rollout_logprobs"].append(list(t.logprobs))
        out["loss_mask"].append([float(m) if keep else 0.0 for m in t.sampled_mask])
    return out


def agent_metrics(trajs: Sequence[Trajectory], prefix: str = "agent/") -> dict[str, float]:
    """Rates over a batch: tool-use rate (episodes with >= 1 well-formed call), calls per episode,
    malformed / error / timeout / truncated counts per call, injected token share."""
    n = max(len(trajs), 1)
    calls = sum(t.counts["calls"] for t in trajs)
    tok = sum(len(t.token_ids) for t in trajs)
    inj = sum(len(t.sampled_mask) - sum(t.sampled_mask) for t in trajs)
    m = {"tool_use_rate": sum(any(c.status != "malformed" for c in t.tool_calls) for t in trajs) / n,
         "calls_per_episode": calls / n,
         "injected_token_frac": inj / max(tok, 1),
         "limit_hit_rate": sum(t.limit is not None for t in trajs) / n}
    for k in ("malformed", "tool_errors", "timeouts", "truncated"):
        m[f"{k}_per_call"] = sum(t.counts[k] for t in trajs) / max(calls, 1)
    return {prefix + k: float(v) for k, v in m.items()}
