"""Parsing ChatML-style tool calls out of generated text, whole or incrementally.

    <tool_call>{"name": "calculator", "arguments": {"expression": "2 + 2"}}</tool_call>

`parse_call_body(body)` turns the text between the tags into a `ToolCall` (never raises: a malformed
call is a `ToolCall` with `error` set, so the agent can tell the model what was wrong).
`ToolCallStream` is the incremental form: `feed(text_chunk)` returns the calls completed by that
chunk, with tags split across chunks handled and an unclosed call bounded by `max_call_chars`.
`last_call(segment)` is what the agent uses at a pause: the call closed at the end of the segment
the model sampled since its last tool result.

Accepted JSON shapes: `{"name": str, "arguments": {...}}` (arguments may also be a JSON-encoded
string, as OpenAI emits) and the OpenAI wrapper `{"function": {"name", "arguments"}}`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from rollout.chatml import TOOL_CALL_END, TOOL_CALL_START



@dataclass
class ToolCall:
    """One parsed call. `error` is None for a well-formed call, else a message for the model."""

    name: str | None
    arguments: dict[str, Any] = field(default_factory=dict)
    raw: str = ""                  # the text between the tags
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "arguments": self.arguments}


def _short(s: str, n: int = 120) -> str:
    return s if len(s) <= n else s[:n] + "..."


def parse_call_body(body: str) -> ToolCall:
    """The text between `<tool_call>` and `</tool_call>` -> a `ToolCall` (error set when malformed)."""
    raw = body
    body = body.strip()
    if not body:
        return ToolCall(None, raw=raw, error="empty tool call (expected a JSON object with 'name' and 'arguments')")
    try:
        obj = json.loads(body)
    except ValueError as e:
        return ToolCall(None, raw=raw, error=f"tool call is not valid JSON ({e.msg} at char {e.pos}): {_short(body)}")
    if isinstance(obj, dict) and isinstance(obj.get("function"), dict):
        obj = obj["function"]
    if not isinstance(obj, dict):
        return ToolCall(None, raw=raw, error=f"tool call must be a JSON object, got {type(obj).__name__}")
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return ToolCall(None, raw=raw, error="tool call has no 'name' string")
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            return ToolCall(name, raw=raw, error=f"tool call 'arguments' is a string that is not JSON: {_short(args)}")
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return ToolCall(name, raw=raw, error=f"tool call 'arguments' must be a JSON object, got {type(args).__name__}")
    return ToolCall(name, args, raw=raw)


def find_calls(text: str) -> list[ToolCall]:
    """Every `<tool_call>...</tool_call>` block of a finished text, in order (unclosed ones ignored)."""
    out: list[ToolCall] = []
    pos = 0
    while True:
        i = text.find(TOOL_CALL_START, pos)
        if i < 0:
            return out
        j = text.find(TOOL_CALL_END, i + len(TOOL_CALL_START))
        if j < 0:
            return out
        out.append(parse_call_body(text[i + len(TOOL_CALL_START):j]))
        pos = j + len(TOOL_CALL_END)


def last_call(segment: str) -> ToolCall:
    """The call closed by the last `</tool_call>` of `segment` (text sampled since the last tool result).

    A closing tag without an opening one (or with only whitespace text) is a malformed call.
    """
    j = segment.rfind(TOOL_CALL_END)
    if j < 0:
        return ToolCall(None, raw=segment, error=f"no {TOOL_CALL_END} in the generated text")
    i = segment.rfind(TOOL_CALL_START, 0, j)
    if i < 0:
        return ToolCall(None, raw=segment[:j], error=f"{TOOL_CALL_END} without a preceding {TOOL_CALL_START}")
    return parse_call_body(segment[i + len(TOOL_CALL_START):j])


class ToolCallStream:
    """Incremental parser: feed generated text in chunks, get each call as soon as its end tag arrives.

    max_call_chars bounds the body of an open call; past it the call is reported as malformed (the
    buffer never grows without bound on a model that opens a call and never closes it).
    """

    def __init__(self, max_call_chars: int = 16_384):
        self.max_call_chars = max_call_chars
        self._buf = ""          # text not yet matched (outside: a possible partial start tag)
        self._inside = False
        self.n_chars = 0

    @property
    def open(self) -> bool:
        """True while a call has started and not ended (at the end of generation: an unclosed call)."""
        return self._inside

    def feed(self, chunk: str) -> list[ToolCall]:
        self.n_chars += len(chunk)
        self._buf += chunk
        out: list[ToolCall] = []
        while True:
            if not self._inside:
                i = self._buf.find(TOOL_CALL_START)
                if i < 0:
                    # keep only a tail that could be the beginning of a start tag
                    keep = len(TOOL_CALL_START) - 1
                    self._buf = self._buf[-keep:] if keep else ""
                    return out
                self._buf = self._buf[i + len(TOOL_CALL_START):]
                self._inside = True
            j = self._buf.find(TOOL_CALL_END)
            if j < 0:
                if len(self._buf) > self.max_call_chars + len(TOOL_CALL_END):
                    out.append(ToolCall(None, raw=self._buf[:200],
                                        error=f"tool call longer than {self.max_call_chars} characters"))
                    self._buf, self._inside = "", False
                return out
            out.append(parse_call_body(self._buf[:j]))
            self._buf = self._buf[j + len(TOOL_CALL_END):]
            self._inside = False
