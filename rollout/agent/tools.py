"""The tool interface: what a model can call during a rollout, `@tool` for plain functions, its schema.

A tool is any object with
    name: str                       # what the model writes in {"name": ...}
    description: str                # for the system prompt / the `tools` reward field
    parameters: dict                # JSON Schema of the arguments object
    __call__(**arguments) -> str    # or an `async def` returning str
Write one as a class, or decorate a function:

    @tool(parameters={"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]})
    def search(q: str) -> str:
        "Search the local corpus."
        return ...

`check_tool` checks the interface and the schema. The rest of the agent's tool code:
`rollout.agent.calculator` and `rollout.agent.python_tool` (the built-ins), `rollout.agent.loader`
(`load_tool(s)` from YAML specs) and `rollout.agent.runner` (`ToolSet`: guarded, asynchronous calls).

This module is the public entry point for tool objects in `module:object` specs: besides `tool`, it
exports the built-in classes `Calculator` and `PythonTool`, so `rollout.agent.tools:Calculator`
(the path `rl.grpo.config.MOVED_MODULES` points old `rollout.tools:...` specs to) loads them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

from model.errors import ConfigError
from rollout.agent.calculator import Calculator
from rollout.agent.python_tool import PythonTool

__all__ = ["Calculator", "FunctionTool", "PythonTool", "Tool", "check_tool", "tool", "tool_schema"]


@runtime_checkable
class Tool(Protocol):
    """name, description, JSON-schema `parameters` and a call returning text (sync or async).

    Optional `inline = True`: the tool is cheap and bounded (pure computation that cannot block or run
    long, like the calculator), so `ToolSet` runs it on the calling thread, without a timeout. This
    spares the rollout's decode thread a thread hop and the GIL contention of a tool thread (~0.5 ms
    per call with the GPU idle)."""

    name: str
    description: str
    parameters: dict

    def __call__(self, **arguments: Any) -> Any: ...


class FunctionTool:
    """A plain (sync or async) function as a `Tool`."""

    def __init__(self, fn: Callable, name: str | None = None, description: str | None = None,
                 parameters: dict | None = None):
        self.fn = fn
        self.name = name or fn.__name__
        self.description = description if description is not None else (inspect.getdoc(fn) or "").strip()
        self.parameters = parameters if parameters is not None else _schema_from_signature(fn)

    def __call__(self, **arguments: Any) -> Any:
        return self.fn(**arguments)

    def __repr__(self) -> str:
        return f"FunctionTool({self.name!r})"


def tool(fn: Callable | None = None, *, name: str | None = None, description: str | None = None,
         parameters: dict | None = None):
    """Decorator: `@tool` or `@tool(name=..., parameters=...)` turns a function into a `FunctionTool`."""
    def wrap(f: Callable) -> FunctionTool:
        return FunctionTool(f, name, description, parameters)
    return wrap(fn) if fn is not None else wrap


_PY_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}


def _schema_from_signature(fn: Callable) -> dict:
    props: dict[str, dict] = {}
    required = []
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        t = _PY_TYPES.get(p.annotation) if not isinstance(p.annotation, str) else \
            {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}.get(p.annotation)
        props[p.name] = {"type": t} if t else {}
        if p.default is p.empty:
            required.append(p.name)
    return {"type": "object", "properties": props, "required": required}


def tool_schema(t: Tool) -> dict:
    """OpenAI-style declaration `{"type": "function", "function": {name, description, parameters}}`
    (the form the `tool_call` reward's `tools` field and chat templates take)."""
    return {"type": "function", "function": {"name": t.name, "description": t.description,
                                             "parameters": t.parameters}}


def check_tool(obj: Any, spec: str) -> None:
    """Raise `ConfigError` naming `spec` unless `obj` has the `Tool` interface and a valid schema."""
    missing = [a for a in ("name", "description", "parameters") if not hasattr(obj, a)]
    if missing or not callable(obj):
        what = f"has no {', '.join(missing)}" if missing else "is not callable"
        raise ConfigError(f"tool spec {spec!r}: {type(obj).__name__} {what}; a tool needs name, description, "
                          "parameters (JSON Schema) and __call__(**arguments) -> str (or decorate a function "
                          "with rollout.agent.tools.tool)")
    if not isinstance(obj.name, str) or not obj.name.isidentifier():
        raise ConfigError(f"tool spec {spec!r}: name must be an identifier string, got {obj.name!r}")
    if not isinstance(obj.parameters, Mapping) or obj.parameters.get("type", "object") != "object":
        raise ConfigError(f"tool spec {spec!r}: parameters must be a JSON Schema of type 'object'")
    try:
        import jsonschema
        jsonschema.validators.validator_for(obj.parameters).check_schema(obj.parameters)
    except ImportError:
        pass
    except Exception as e:   # jsonschema.SchemaError
        raise ConfigError(f"tool spec {spec!r}: parameters is not a valid JSON Schema: {e}") from None
