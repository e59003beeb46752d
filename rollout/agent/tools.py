"""Tools a model can call during a rollout: the interface, built-ins, and loading them from YAML.

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

YAML (like reward functions; relative paths are resolved against the config file's directory):

    tools:
      - calculator                                  # a built-in name
      - {spec: python, kwargs: {timeout_s: 5, memory_mb: 256}}
      - {spec: my_tools.py:search}                  # file.py:object
      - {spec: mypkg.tools:Lookup, kwargs: {...}}   # module:object (a class/factory gets the kwargs)

`load_tool` checks everything at load (file, object, interface, schema) and raises `ConfigError`
naming the spec. `ToolSet` holds the loaded tools by name and runs one call with the episode's
guards: unknown tool / bad arguments / raising tool / timeout / non-text / oversized result all
become an error text for the model and a status for the counters, never an exception.

Built-ins: `calculator` (exact arithmetic on big integers and decimals, parsed by a small
recursive-descent parser, no eval, bounded operand/result sizes) and `python` (runs code in a
bubblewrap jail, `rollout.agent.sandbox`, with timeout, memory, process and output limits and no network; or on
a remote sandbox service).
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import importlib
import importlib.util
import inspect
import json
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Protocol, runtime_checkable

from model.errors import ConfigError
from rollout.agent.jail import require_jail
from rollout.agent.remote_sandbox import RemoteSandboxConfig, run_remote
from rollout.agent.sandbox import SANDBOX_MODES, SandboxConfig, run_python, warn_host_mode


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


# ------------------------------------------------------------------------------------------------
# Built-in: calculator


class CalcError(ValueError):
    """An expression the calculator refuses (syntax, division by zero, size limits)."""


class Calculator:
    """Exact arithmetic: + - * / // % ** and parentheses over integers and decimals.

    No eval: a tokenizer and a recursive-descent parser over exact `Fraction`s. Limits (all
    errors, never hangs): expression length, digits of any operand or intermediate result, the
    exponent of `**`. A non-integer result is shown as a decimal with up to `decimals` digits.
    """

    name = "calculator"
    description = "Evaluate an arithmetic expression exactly (+ - * / // % ** and parentheses)."
    parameters = {"type": "object", "properties": {"expression": {"type": "string"}},
                  "required": ["expression"]}

    def __init__(self, max_chars: int = 1000, max_digits: int = 1000, max_exponent: int = 10_000,
                 decimals: int = 12, inline: bool = True):
        self.max_chars, self.max_digits, self.max_exponent, self.decimals = \
            max_chars, max_digits, max_exponent, decimals
        self.inline = inline   # bounded by its limits: runs on the caller's thread (see `Tool`); False: a tool thread

    def __call__(self, expression: str) -> str:
        return format_number(self.evaluate(expression), self.decimals)

    def evaluate(self, expression: str) -> Fraction:
        if not isinstance(expression, str):
            raise CalcError(f"expression must be a string, got {type(expression).__name__}")
        if len(expression) > self.max_chars:
            raise CalcError(f"expression longer than {self.max_chars} characters")
        toks = _calc_tokens(expression)
        p = _Parser(toks, self)
        v = p.expr()
        if p.i != len(toks):
            raise CalcError(f"unexpected {toks[p.i][1]!r} at position {toks[p.i][2]}")
        return v

    def check(self, v: Fraction) -> Fraction:
        if max(_digits(v.numerator), _digits(v.denominator)) > self.max_digits:
            raise CalcError(f"number with more than {self.max_digits} digits")
        return v


def _digits(n: int) -> int:
    # bit_length bound, exact enough for a limit and O(1) (str() of a huge int is quadratic)
    return (abs(n).bit_length() * 30103) // 100000 + 1


def _calc_tokens(s: str) -> list[tuple[str, str, int]]:
    out: list[tuple[str, str, int]] = []
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c.isspace():
            i += 1
        elif c.isdigit() or (c == "." and i + 1 < n and s[i + 1].isdigit()):
            j = i
            while j < n and (s[j].isdigit() or s[j] in "._"):
                j += 1
            text = s[i:j].replace("_", "")
            if text.count(".") > 1:
                raise CalcError(f"bad number {s[i:j]!r} at position {i}")
            out.append(("num", text, i))
            i = j
        elif s.startswith("**", i) or s.startswith("//", i):
            out.append(("op", s[i:i + 2], i))
            i += 2
        elif c in "+-*/%()^×÷":
            out.append(("op", {"^": "**", "×": "*", "÷": "/"}.get(c, c), i))
            i += 1
        else:
            raise CalcError(f"unexpected character {c!r} at position {i}")
    return out


class _Parser:
    """expr := term (('+'|'-') term)*; term := unary (('*'|'/'|'//'|'%') unary)*;
    unary := ('+'|'-') unary | power; power := atom ('**' unary)?; atom := num | '(' expr ')'."""

    def __init__(self, toks, calc: Calculator):
        self.toks, self.i, self.calc, self.depth = toks, 0, calc, 0

    def peek(self) -> str | None:
        return self.toks[self.i][1] if self.i < len(self.toks) else None

    def take(self) -> tuple[str, str, int]:
        if self.i >= len(self.toks):
            raise CalcError("unexpected end of expression")
        t = self.toks[self.i]
        self.i += 1
        return t

    def expr(self) -> Fraction:
        v = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()[1]
            r = self.term()
            v = self.calc.check(v + r if op == "+" else v - r)
        return v

    def term(self) -> Fraction:
        v = self.unary()
        while self.peek() in ("*", "/", "//", "%"):
            op = self.take()[1]
            r = self.unary()
            if op != "*" and r == 0:
                raise CalcError("division by zero")
            if op == "*":
                v = v * r
            elif op == "/":
                v = v / r
            elif op == "//":
                v = Fraction(v // r)
            else:
                v = v - r * (v // r)
            v = self.calc.check(v)
        return v

    def unary(self) -> Fraction:
        if self.peek() in ("+", "-"):
            op = self.take()[1]
            v = self.unary()
            return -v if op == "-" else v
        return self.power()

    def power(self) -> Fraction:
        base = self.atom()
        if self.peek() == "**":
            self.take()
            exp = self.unary()
            if exp.denominator != 1:
                raise CalcError("only integer exponents are supported")
            e = exp.numerator
            if abs(e) > self.calc.max_exponent:
                raise CalcError(f"exponent larger than {self.calc.max_exponent}")
            if base == 0 and e < 0:
                raise CalcError("division by zero")
            # size check before computing: digits(base**e) ~ e * digits(base)
            if abs(e) * max(_digits(base.numerator), _digits(base.denominator)) > 2 * self.calc.max_digits + 2:
                raise CalcError(f"result with more than {self.calc.max_digits} digits")
            return self.calc.check(base ** e)
        return base

    def atom(self) -> Fraction:
        kind, text, pos = self.take()
        if kind == "num":
            if len(text.replace(".", "")) > self.calc.max_digits:
                raise CalcError(f"number with more than {self.calc.max_digits} digits at position {pos}")
            return Fraction(text)
        if text == "(":
            self.depth += 1
            if self.depth > 100:
                raise CalcError("parentheses nested deeper than 100")
            v = self.expr()
            if self.take()[1] != ")":
                raise CalcError(f"missing ')' for '(' at position {pos}")
            self.depth -= 1
            return v
        raise CalcError(f"unexpected {text!r} at position {pos}")


def format_number(v: Fraction, decimals: int = 12) -> str:
    """Integers exactly; other values as a decimal rounded to `decimals` places (trailing zeros cut)."""
    if v.denominator == 1:
        return str(v.numerator)
    sign = "-" if v < 0 else ""
    q = round(abs(v) * 10 ** decimals)
    s = str(q).rjust(decimals + 1, "0")
    whole, frac = s[:-decimals], s[-decimals:].rstrip("0")
    return f"{sign}{whole}.{frac}" if frac else f"{sign}{whole}"


# ------------------------------------------------------------------------------------------------
# Built-in: python


class PythonTool:
    """Run a Python script the model wrote; the tool's text is its stdout/stderr (or the error/limit message).

    `sandbox`: `jail` (default; bubblewrap, `rollout.agent.jail`: the tool refuses to start, naming the missing
    piece, where the jail cannot be set up), `host` (a plain process that can read what the trainer's user
    can; warned once per process) or `remote` (a SandboxFusion-style service at `url`,
    `rollout.agent.remote_sandbox`). The threat model of each mode is in docs/tools.md."""

    name = "python"
    description = "Run a Python 3 script and return what it prints (no network, limited time and memory)."
    parameters = {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}

    def __init__(self, timeout_s: float = 5.0, memory_mb: int = 256, max_output_chars: int = 4000,
                 network: str = "auto", sandbox: str = "jail", max_processes: int = 32, tmpfs_mb: int = 64,
                 url: str | None = None):
        self.config: SandboxConfig | RemoteSandboxConfig
        if sandbox == "remote":
            local = {"network": (network, "auto"), "max_processes": (max_processes, 32), "tmpfs_mb": (tmpfs_mb, 64)}
            bad = sorted(k for k, (v, default) in local.items() if v != default)
            if bad:
                raise ConfigError(f"python tool: {bad} apply to `sandbox: jail | host`, not `remote`")
            self.config = RemoteSandboxConfig(url or "", timeout_s=timeout_s, memory_mb=memory_mb,
                                              max_output_chars=max_output_chars)
            return
        if url is not None:
            raise ConfigError(f"python tool: `url` is for `sandbox: remote`, got sandbox {sandbox!r}")
        if sandbox not in SANDBOX_MODES:
            raise ConfigError(f"python tool sandbox: jail | host | remote, got {sandbox!r}")
        self.config = SandboxConfig(timeout_s=timeout_s, memory_mb=memory_mb, max_output_chars=max_output_chars,
                                    network=network, sandbox=sandbox, max_processes=max_processes,
                                    tmpfs_mb=tmpfs_mb)
        if sandbox == "jail":
            require_jail(self.config.python)     # refuse to start without a working jail
        else:
            warn_host_mode()

    def __call__(self, code: str) -> str:
        if isinstance(self.config, RemoteSandboxConfig):
            return run_remote(code, self.config).text()
        return run_python(code, self.config).text()


BUILTIN_TOOLS: dict[str, Callable[..., Any]] = {"calculator": Calculator, "python": PythonTool}


# ------------------------------------------------------------------------------------------------
# Loading


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


def _import_file(path: str, spec: str):
    if not os.path.isfile(path):
        raise ConfigError(f"tool spec {spec!r}: file not found: {path}")
    mod_name = "_tool_user_" + hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:12]
    module = sys.modules.get(mod_name)
    if module is None:
        ispec = importlib.util.spec_from_file_location(mod_name, path)
        if ispec is None or ispec.loader is None:
            raise ConfigError(f"tool spec {spec!r}: cannot import {path}")
        module = importlib.util.module_from_spec(ispec)
        sys.modules[mod_name] = module
        try:
            ispec.loader.exec_module(module)
        except Exception as e:   # user code: any import-time failure is a spec error
            del sys.modules[mod_name]
            raise ConfigError(f"tool spec {spec!r}: importing {path} failed: {type(e).__name__}: {e}") from e
    return module


def _check_interface(obj: Any, spec: str) -> None:
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


def load_tool(spec: str | Tool | Callable, *, name: str | None = None, base_dir: str | None = None,
              **kwargs: Any) -> Tool:
    """A tool from a built-in name, `path/file.py:obj` or `pkg.mod:obj` (or a ready object).

    obj may be a tool instance (kwargs must be empty), a class or factory returning one (called
    with kwargs), or a plain function (wrapped as `FunctionTool`, kwargs: name/description/parameters).
    Raises `ConfigError` naming the spec for a missing file/module/object or a wrong interface.
    """
    label = spec if isinstance(spec, str) else repr(spec)
    if isinstance(spec, str):
        s = spec.strip()
        if ":" not in s:
            if s not in BUILTIN_TOOLS:
                raise ConfigError(f"unknown built-in tool {s!r} (built-ins: {', '.join(sorted(BUILTIN_TOOLS))}; "
                                  "user tools are path/to/file.py:object or package.module:object)")
            obj: Any = BUILTIN_TOOLS[s]
        else:
            target, _, attr = s.rpartition(":")
            if not target or not attr.isidentifier():
                raise ConfigError(f"tool spec {s!r}: expected NAME, path/to/file.py:object or package.module:object")
            if target.endswith(".py") or "/" in target or os.sep in target:
                path = target if os.path.isabs(target) else os.path.join(base_dir or os.getcwd(), target)
                module = _import_file(os.path.abspath(path), s)
            else:
                try:
                    module = importlib.import_module(target)
                except ImportError as e:
                    raise ConfigError(f"tool spec {s!r}: cannot import module {target!r}: {e}") from e
            if not hasattr(module, attr):
                raise ConfigError(f"tool spec {s!r}: {target} has no object {attr!r}")
            obj = getattr(module, attr)
    else:
        obj = spec
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
    _check_interface(obj, label)
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


# ------------------------------------------------------------------------------------------------
# Running one call with guards


def _is_async(t: Any) -> bool:
    return any(inspect.iscoroutinefunction(f) for f in (t, getattr(t, "__call__", None), getattr(t, "fn", None))
               if f is not None)


@dataclass
class ToolOutcome:
    """The result of one call as the model will see it, and why.

    status: ok | unknown_tool | bad_arguments | error (raised) | timeout | bad_result (not text);
    truncated: the text was cut to max_result_chars.
    """

    text: str
    status: str
    truncated: bool = False
    seconds: float = 0.0


class ToolSet:
    """Loaded tools by name, and a guarded, asynchronous `submit(name, arguments) -> Future[ToolOutcome]`.

    Sync tools run on a thread pool (`workers` threads), async ones on one event-loop thread. The
    future always resolves by `timeout_s` after submission: a tool still running then is reported
    as a timeout (an async one is cancelled; a sync thread cannot be killed and keeps its pool
    thread until it returns; the python built-in kills its own process at its timeout).
    """

    def __init__(self, tools: list[Tool] | Mapping[str, Tool], timeout_s: float = 10.0,
                 max_result_chars: int = 2000, workers: int = 8, validate_arguments: bool = True):
        items = list(tools.values()) if isinstance(tools, Mapping) else list(tools)
        self.tools: dict[str, Tool] = {}
        for t in items:
            _check_interface(t, getattr(t, "name", repr(t)))
            if t.name in self.tools:
                raise ConfigError(f"duplicate tool name {t.name!r}")
            self.tools[t.name] = t
        self.timeout_s = timeout_s
        self.max_result_chars = max_result_chars
        self.validate_arguments = validate_arguments
        self._pool = _DaemonPool(workers)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._validators: dict[str, Any] = {}

    def schemas(self) -> list[dict]:
        """OpenAI-style declarations of every tool (for prompts and the `tool_call` reward's `tools`)."""
        return [tool_schema(t) for t in self.tools.values()]

    def close(self) -> None:
        self._pool.shutdown()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- helpers
    def _event_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="tool-async", daemon=True).start()
                self._loop = loop
            return self._loop

    def _check_arguments(self, t: Tool, args: dict) -> str | None:
        if not self.validate_arguments:
            return None
        try:
            import jsonschema
        except ImportError:
            req = [k for k in t.parameters.get("required", []) if k not in args]
            return f"missing required arguments {req}" if req else None
        v = self._validators.get(t.name)
        if v is None:
            v = jsonschema.validators.validator_for(t.parameters)(t.parameters)
            self._validators[t.name] = v
        err = jsonschema.exceptions.best_match(v.iter_errors(args))
        return None if err is None else err.message[:300]

    def _finish_text(self, value: Any) -> ToolOutcome:
        if isinstance(value, (dict, list)):
            value = json.dumps(value, ensure_ascii=False)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            return ToolOutcome(f"error: the tool returned {type(value).__name__}, not text", "bad_result")
        if len(value) > self.max_result_chars:
            cut = len(value) - self.max_result_chars
            return ToolOutcome(value[:self.max_result_chars] + f"\n[truncated {cut} characters]", "ok", True)
        return ToolOutcome(value, "ok")

    # -- the call
    def call(self, name: str, arguments: dict) -> ToolOutcome:
        """Blocking form of `submit` (same guards and timeout)."""
        return self.submit(name, arguments).result()

    def submit(self, name: str | None, arguments: dict) -> Future:
        """Start a call; -> Future[ToolOutcome], resolved at the latest `timeout_s` after this call."""
        out: Future = Future()
        t0 = time.perf_counter()

        def resolve(o: ToolOutcome) -> None:
            o.seconds = time.perf_counter() - t0
            with self._lock:
                if not out.done():
                    out.set_result(o)

        t = self.tools.get(name) if name is not None else None
        if t is None:
            resolve(ToolOutcome(f"error: unknown tool {name!r} (available: {', '.join(self.tools)})",
                                "unknown_tool"))
            return out
        bad = self._check_arguments(t, arguments)
        if bad is not None:
            resolve(ToolOutcome(f"error: invalid arguments for {name}: {bad}", "bad_arguments"))
            return out

        def on_error(e: BaseException) -> ToolOutcome:
            return ToolOutcome(f"error: {type(e).__name__}: {str(e)[:500]}", "error")

        def run_sync():
            try:
                resolve(self._finish_text(t(**arguments)))
            except BaseException as e:   # the tool's own failure is text for the model
                resolve(on_error(e))

        is_async = _is_async(t)
        if getattr(t, "inline", False) is True and not is_async:   # cheap and bounded: right here
            run_sync()
            return out
        _DEADLINES.add(t0 + self.timeout_s, out, lambda: resolve(
            ToolOutcome(f"error: tool {name} timed out after {self.timeout_s:g} s", "timeout")))
        if is_async:
            async def run_async():
                return await asyncio.wait_for(t(**arguments), self.timeout_s)

            cf = asyncio.run_coroutine_threadsafe(run_async(), self._event_loop())

            def done_async(f):
                try:
                    resolve(self._finish_text(f.result()))
                except (asyncio.TimeoutError, TimeoutError):
                    resolve(ToolOutcome(f"error: tool {name} timed out after {self.timeout_s:g} s", "timeout"))
                except BaseException as e:   # the tool's own failure is text for the model
                    resolve(on_error(e))
            cf.add_done_callback(done_async)
            return out

        if not self._pool.submit(run_sync):
            resolve(ToolOutcome("error: the tool set is closed", "error"))
        return out


class _Deadlines:
    """One daemon thread firing the timeouts of all pending calls (a `threading.Timer` per call cost a
    thread start, ~1 ms of the decode thread's time, per tool call). `add(when, fut, fire)` calls
    `fire()` at `when` (perf_counter seconds) unless `fut` is done by then."""

    def __init__(self):
        self._heap: list[tuple[float, int, Future, Callable[[], None]]] = []
        self._cv = threading.Condition()
        self._seq = 0
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    def add(self, when: float, fut: Future, fire: Callable[[], None]) -> None:
        if self._pid != os.getpid():     # a forked child: the parent's thread did not come along
            self.__init__()
        with self._cv:
            self._seq += 1
            heapq.heappush(self._heap, (when, self._seq, fut, fire))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="tool-deadlines", daemon=True)
                self._thread.start()
            if self._heap[0][1] == self._seq:    # the new one is the earliest: re-arm the wait
                self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._heap and self._heap[0][2].done():     # answered in time: drop
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cv.wait()
                    continue
                delay = self._heap[0][0] - time.perf_counter()
                if delay > 0:
                    self._cv.wait(min(delay, 1.0))   # wakes for an earlier deadline, or re-checks done ones
                    continue
                _, _, fut, fire = heapq.heappop(self._heap)
            if not fut.done():
                fire()


_DEADLINES = _Deadlines()


class _DaemonPool:
    """A fixed set of daemon threads over a queue: a tool that never returns holds one thread but
    cannot block interpreter exit (ThreadPoolExecutor joins its threads at exit). A thread is started
    only when no started one is idle (a thread start blocks the caller for ~1 ms)."""

    def __init__(self, workers: int):
        self.workers = workers
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._closed = False
        self._lock = threading.Lock()

    def _run(self) -> None:
        while True:
            fn = self._q.get()
            with self._lock:
                self._idle -= 1
            if fn is None:
                return
            fn()
            with self._lock:
                self._idle += 1

    def submit(self, fn: Callable[[], None]) -> bool:
        with self._lock:
            if self._closed:
                return False
            if self._idle <= self._q.qsize() and len(self._threads) < self.workers:
                t = threading.Thread(target=self._run, name=f"tool-{len(self._threads)}", daemon=True)
                self._idle += 1
                t.start()
                self._threads.append(t)
        self._q.put(fn)
        return True

    def shutdown(self) -> None:
        with self._lock:
            self._closed = True
            for _ in self._threads:
                self._q.put(None)
