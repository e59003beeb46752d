"""Loading tools from YAML specs: built-in names, `path/to/file.py:object` and `package.module:object`.

YAML (like reward functions; relative paths are resolved against the config file's directory):

    tools:
      - calculator                                  # a built-in name
      - {spec: python, kwargs: {timeout_s: 5, memory_mb: 256}}
      - {spec: my_tools.py:search}                  # file.py:object
      - {spec: mypkg.tools:Lookup, kwargs: {...}}   # module:object (a class/factory gets the kwargs)

The spec grammar and the import of user files are `rewards.spec`'s, shared with reward specs.
`load_tool` checks everything at load (file, object, interface, schema) and raises `ConfigError`
naming the spec.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from model.errors import ConfigError
from rewards.spec import SpecLoader
from rollout.agent.calculator import Calculator
from rollout.agent.python_tool import PythonTool
from rollout.agent.tools import FunctionTool, Tool, check_tool

BUILTIN_TOOLS: dict[str, Callable[..., Any]] = {"calculator": Calculator, "python": PythonTool}

_SPECS = SpecLoader(label="tool spec", noun="object", error=ConfigError)


@dataclass
class ToolSpec:
    """One entry of a YAML `tools:` list: `"calculator"` or `{spec, kwargs, name}`."""

    spec: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    name: str | None = None

    _KEYS = ("spec", "kwargs", "name")

    @classmethod
    def from_config(cls, obj: Any, where: str = "tools") -> ToolSpec:
        if isinstance(obj, ToolSpec):
            return obj
        if isinstance(obj, str):
            return cls(obj)
        if not isinstance(obj, Mapping):
            raise ConfigError(f"{where}: expected a spec string or a mapping, got {type(obj).__name__}")
        unknown = [k for k in obj if k not in cls._KEYS]
        if unknown:
            raise ConfigError(f"{where}: unknown keys {unknown} (allowed: {', '.join(cls._KEYS)})")
        if not isinstance(obj.get("spec"), str):
            raise ConfigError(f"{where}: missing string key 'spec'")
        kw = obj.get("kwargs") or {}
        if not isinstance(kw, Mapping):
            raise ConfigError(f"{where}.kwargs: expected a mapping, got {type(kw).__name__}")
        name = obj.get("name")
        if name is not None and not isinstance(name, str):
            raise ConfigError(f"{where}.name: expected a string, got {name!r}")
        return cls(obj["spec"], dict(kw), name)


def _resolve(spec: str, base_dir: str | None) -> Any:
    """The object a spec string names: a built-in tool class, or the file's / module's object."""
    us = _SPECS.parse(spec, base_dir)
    if us.kind == "builtin":
        if us.target not in BUILTIN_TOOLS:
            raise ConfigError(f"unknown built-in tool {us.target!r} (built-ins: {', '.join(sorted(BUILTIN_TOOLS))}; "
                              "user tools are path/to/file.py:object or package.module:object)")
        return BUILTIN_TOOLS[us.target]
    return _SPECS.load(us)


def load_tool(spec: str | Tool | Callable, *, name: str | None = None, base_dir: str | None = None,
              **kwargs: Any) -> Tool:
    """A tool from a built-in name, `path/file.py:obj` or `pkg.mod:obj` (or a ready object).

    obj may be a tool instance (kwargs must be empty), a class or factory returning one (called
    with kwargs), or a plain function (wrapped as `FunctionTool`, kwargs: name/description/parameters).
    Raises `ConfigError` naming the spec for a missing file/module/object or a wrong interface.
    """
    label = spec if isinstance(spec, str) else repr(spec)
    obj: Any = _resolve(spec, base_dir) if isinstance(spec, str) else spec
    if inspect.isclass(obj) or (callable(obj) and not hasattr(obj, "parameters") and kwargs
                                and not inspect.isfunction(obj)):
        try:
            obj = obj(**kwargs)
        except TypeError as e:
            raise ConfigError(f"tool spec {label!r}: cannot construct with options {sorted(kwargs)}: {e}") from None
        kwargs = {}
    elif inspect.isfunction(obj) or inspect.ismethod(obj):
        try:
            obj = FunctionTool(obj, **kwargs)
        except TypeError as e:
            raise ConfigError(f"tool spec {label!r}: options {sorted(kwargs)}: {e}") from None
        kwargs = {}
    if kwargs:
        raise ConfigError(f"tool spec {label!r}: options {sorted(kwargs)} given, but the object is an "
                          "instance (only classes and factories take options)")
    check_tool(obj, label)
    if name is not None:
        if not name.isidentifier():
            raise ConfigError(f"tool spec {label!r}: name must be an identifier, got {name!r}")
        try:
            obj.name = name
        except AttributeError:
            raise ConfigError(f"tool spec {label!r}: cannot rename to {name!r}") from None
    return obj


def load_tools(obj: Any, base_dir: str | None = None, where: str = "tools") -> list[Tool]:
    """A YAML `tools:` value (string, mapping, or a list of them) -> loaded tools (names unique)."""
    items = obj if isinstance(obj, (list, tuple)) else [obj]
    tools: list[Tool] = []
    for i, x in enumerate(items):
        if not isinstance(x, (str, Mapping, ToolSpec)):   # ready objects (from Python)
            tools.append(load_tool(x))
            continue
        s = ToolSpec.from_config(x, f"{where}[{i}]")
        tools.append(load_tool(s.spec, name=s.name, base_dir=base_dir, **s.kwargs))
    names = [t.name for t in tools]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{where}: duplicate tool names {dup} (give one a `name:`)")
    return tools

