"""Built-ins ``json`` (valid JSON, optionally valid against a JSON Schema) and ``tool_call``.

``json``: the completion (or the body of its last ```` ```json ```` fence when ``extract="auto"``)
must parse as JSON: `reward` if it does and, when a schema is given (option ``schema`` or the row
field named by ``schema_field``, default ``schema``; a dict or a JSON string), validates;
`schema_fail` if it parses but does not validate; 0 otherwise.

``tool_call``: every ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` block must name a
tool of the row's ``tools`` field (OpenAI style ``{"type": "function", "function": {"name",
"parameters"}}`` or plain ``{"name", "parameters"}``; a list or a JSON string) and its arguments
must validate against that tool's ``parameters`` schema. Score: the fraction of valid calls;
``no_call`` (default 0) when there is no call.
Inputs over `max_chars` score 0; JSON nested too deeply for the parser scores 0.
"""

from __future__ import annotations

import json
import re

from rewards.builtin.math_answer import blocks

_FENCE = re.compile(r"```(?:json)?\s*\n(.*?)```", re.DOTALL)


def _load_json(text: str):
    try:
        return True, json.loads(text)
    except (ValueError, RecursionError):
        return False, None


def _as_obj(v, what: str):
    if isinstance(v, str):
        ok, obj = _load_json(v)
        if not ok:
            raise ValueError(f"{what} is a string that is not valid JSON")
        return obj
    return v


def _validator(schema, what: str):
    import jsonschema

    schema = _as_obj(schema, what)
    if not isinstance(schema, (dict, bool)):
        raise ValueError(f"{what} must be a JSON Schema object, got {type(schema).__name__}")
    cls = jsonschema.validators.validator_for(schema)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as e:
        raise ValueError(f"{what} is not a valid JSON Schema: {e.message}") from None
    return cls(schema)


class JsonReward:
    def __init__(self, schema: dict | str | None = None, schema_field: str = "schema",
                 extract: str = "auto", reward: float = 1.0, schema_fail: float = 0.0,
                 max_chars: int = 100_000):
        if extract not in ("auto", "none"):
            raise ValueError(f"extract must be 'auto' or 'none', got {extract!r}")
        self.schema = _validator(schema, "schema option") if schema is not None else None
        self.schema_field, self.extract = schema_field, extract
        self.reward, self.schema_fail, self.max_chars = reward, schema_fail, max_chars

    def __call__(self, prompt: str, completion: str, **fields) -> float:
        if len(completion) > self.max_chars:
            return 0.0
        text = completion.strip()
        if self.extract == "auto":
            fences = _FENCE.findall(text)
            if fences:
                text = fences[-1].strip()
        ok, obj = _load_json(text)
        if not ok:
            return 0.0
        validator = self.schema
        if fields.get(self.schema_field) is not None:
            validator = _validator(fields[self.schema_field], f"row field {self.schema_field!r}")
        if validator is None:
            return self.reward
        try:
            valid = validator.is_valid(obj)
        except RecursionError:
            valid = False
        return self.reward if valid else self.schema_fail


def _tools(spec) -> dict[str, dict]:
    spec = _as_obj(spec, "row field 'tools'")
    if not isinstance(spec, list):
        raise ValueError(f"row field 'tools' must be a list of tools, got {type(spec).__name__}")
    out = {}
    for t in spec:
        fn = t.get("function", t) if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ValueError(f"row field 'tools': each tool needs a name, got {t!r}"[:300])
        out[fn["name"]] = fn.get("parameters") or {"type": "object"}
    return out


class ToolCallReward:
    def __init__(self, tools_field: str = "tools", no_call: float = 0.0, max_chars: int = 100_000):
        self.tools_field, self.no_call, self.max_chars = tools_field, no_call, max_chars

    def __call__(self, prompt: str, completion: str, **fields) -> float:
        if self.tools_field not in fields:
            raise KeyError(f"the data row has no field {self.tools_field!r} (the declared tools)")
        tools = _tools(fields[self.tools_field])
        if len(completion) > self.max_chars:
            return 0.0
        calls = blocks(completion, "<tool_call>", "</tool_call>")
        if not calls:
            return self.no_call
        validators: dict[str, object] = {}
        good = 0
        for body in calls:
            ok, call = _load_json(body.strip())
            if not ok or not isinstance(call, dict) or call.get("name") not in tools:
                continue
            args = call.get("arguments", {})
            if isinstance(args, str):
                ok, args = _load_json(args)
                if not ok:
                    continue
            if not isinstance(args, dict):
                continue
            name = call["name"]
            if name not in validators:
                validators[name] = _validator(tools[name], f"parameters of tool {name!r}")
            try:
                good += validators[name].is_valid(args)
            except RecursionError:
                pass
        return good / len(calls)
