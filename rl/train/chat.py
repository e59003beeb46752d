"""ChatML template with reasoning and tool calls; token ids plus the assistant-token mask for SFT.

Rendered form (one block per message):

    <|im_start|>system\\n{content}<|im_end|>\\n
    <|im_start|>user\\n{content}<|im_end|>\\n
    <|im_start|>assistant\\n<think>\\n{reasoning}\\n</think>\\n\\n{content}<tool_call>\\n{json}\\n</tool_call><|im_end|>\\n
    <|im_start|>tool\\n{content}<|im_end|>\\n

- Messages: `{"role": "system"|"user"|"assistant"|"tool", "content": str}`; assistant messages may
  carry `reasoning` (also read from `reasoning_content` / `thinking`) and `tool_calls`
  (`[{"name": ..., "arguments": {...}}]`, or OpenAI's `{"function": {"name", "arguments"}}` form).
- Reasoning switched off (`reasoning=False`, per sample): the reasoning text is dropped and an empty
  `<think>\\n\\n</think>\\n\\n` block is emitted instead (the Qwen3 convention), so a generation prompt that
  ends with the empty block (`add_generation_prompt=True, reasoning=False`) asks for no reasoning.
  Assistant messages without reasoning get no think block when reasoning is on.
- Loss mask: only assistant tokens after `<|im_start|>assistant\\n`, up to and including `<|im_end|>`
  (the model learns to stop), are True. System, user, tool and all headers are False.
- Special strings (`<|im_start|>`, `<|im_end|>`, `<think>`, ...) map to single tokens when the
  tokenizer has them; otherwise they are encoded as text, with a one-time warning.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from typing import Any

from model.errors import DataError
from rollout.chatml import IM_END, IM_START, THINK_END, THINK_START, TOOL_CALL_END, TOOL_CALL_START

CHAT_SPECIAL_TOKENS = [IM_START, IM_END, THINK_START, THINK_END, TOOL_CALL_START, TOOL_CALL_END]
ROLES = ("system", "user", "assistant", "tool")
_warned: set[str] = set()


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` without special tokens, for HF tokenizers and raw `tokenizers.Tokenizer`."""
    try:
        out = tokenizer.encode(text, add_special_tokens=False)
    except TypeError:
        out = tokenizer.encode(text)
    return list(out.ids) if hasattr(out, "ids") else list(out)


def token_id(tokenizer: Any, token: str) -> int | None:
    """Id of a (special) token, or None if the vocabulary lacks it."""
    for attr in ("token_to_id", "convert_tokens_to_ids"):
        fn = getattr(tokenizer, attr, None)
        if fn is not None:
            i = fn(token)
            unk = getattr(tokenizer, "unk_token_id", None)
            if i is not None and (i != unk or token == getattr(tokenizer, "unk_token", None)):
                return int(i)
    return None


@dataclass
class ChatEncoding:
    input_ids: list[int]        # [T]
    assistant_mask: list[bool]  # [T], True on tokens that get loss
    text: str                   # the rendered conversation


def _tool_call_json(call: Any, where: str) -> str:
    if isinstance(call, dict) and "function" in call and isinstance(call["function"], dict):
        call = call["function"]
    if not isinstance(call, dict) or "name" not in call:
        raise DataError(f"{where}: a tool call needs a 'name' (got {call!r})")
    args = call.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            pass
    return json.dumps({"name": call["name"], "arguments": args}, ensure_ascii=False)


def _segments(messages: list[dict], reasoning: bool, add_generation_prompt: bool) -> list[tuple[str, bool]]:
    """(text, is_assistant) pieces of the rendered conversation; special strings are separate pieces."""
    if not isinstance(messages, list) or not messages:
        raise DataError("a conversation must be a non-empty list of messages")
    segs: list[tuple[str, bool]] = []
    for i, m in enumerate(messages):
        where = f"message {i}"
        if not isinstance(m, dict):
            raise DataError(f"{where}: expected a mapping, got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise DataError(f"{where}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        content = m.get("content") or ""
        if not isinstance(content, str):
            raise DataError(f"{where}: content must be a string, got {type(content).__name__}")
        segs += [(IM_START, False), (f"{role}\n", False)]
        if role != "assistant":
            segs += [(content, False), (IM_END, False), ("\n", False)]
            continue
        thought = m.get("reasoning") or m.get("reasoning_content") or m.get("thinking")
        if thought is not None and not isinstance(thought, str):
            raise DataError(f"{where}: reasoning must be a string")
        if thought and reasoning:
            segs += [(THINK_START, True), (f"\n{thought.strip()}\n", True), (THINK_END, True), ("\n\n", True)]
        elif not reasoning:
            segs += [(THINK_START, True), ("\n\n", True), (THINK_END, True), ("\n\n", True)]
        if content:
            segs.append((content, True))
        calls = m.get("tool_calls") or []
        if not isinstance(calls, list):
            raise DataError(f"{where}: tool_calls must be a list")
        for c in calls:
            segs += [(TOOL_CALL_START, True), (f"\n{_tool_call_json(c, where)}\n", True), (TOOL_CALL_END, True)]
        segs += [(IM_END, True), ("\n", False)]
    if add_generation_prompt:
        segs += [(IM_START, False), ("assistant\n", False)]
        if not reasoning:
            segs += [(THINK_START, False), ("\n\n", False), (THINK_END, False), ("\n\n", False)]
    return [(t, a) for t, a in segs if t]


def render_chat(messages: list[dict], reasoning: bool = True, add_generation_prompt: bool = False) -> str:
    """The conversation as ChatML text."""
    return "".join(t for t, _ in _segments(messages, reasoning, add_generation_prompt))


def encode_chat(messages: list[dict], tokenizer: Any, reasoning: bool = True,
                add_generation_prompt: bool = False) -> ChatEncoding:
    """Token ids and assistant mask. Each piece is encoded on its own, so the mask is exact."""
    ids: list[int] = []
    mask: list[bool] = []
    for text, is_asst in _segments(messages, reasoning, add_generation_prompt):
        piece: list[int]
        if text in CHAT_SPECIAL_TOKENS:
            tid = token_id(tokenizer, text)
            if tid is None:
                if text not in _warned:
                    _warned.add(text)
                    warnings.warn(f"tokenizer has no {text} token; encoding it as text", stacklevel=2)
                piece = encode_text(tokenizer, text)
            else:
                piece = [tid]
        else:
            piece = encode_text(tokenizer, text)
        ids += piece
        mask += [is_asst] * len(piece)
    return ChatEncoding(ids, mask, render_chat(messages, reasoning, add_generation_prompt))
