"""Loading and calling reward functions.

A reward function is a plain callable, referenced by a spec string:

- a built-in name: ``math``, ``format``, ``json``, ``tool_call``, ``overlong``, ``length``
  (options are passed as keyword arguments / the ``kwargs`` mapping of a `RewardSpec`);
- ``path/to/file.py:function`` (relative paths are resolved against ``base_dir``, default the cwd);
- ``package.module:function`` (imported normally).

The grammar and the import of user files are `rewards.spec`'s (shared with tool specs).

Per-sample functions are called ``fn(prompt, completion, **fields)`` and return ``float | None``.
Batched functions (decorated with `batched`) are called ``fn(prompts, completions, **columns)``
with lists and return a list of the same length. ``async def`` works for both. ``None`` means
"exclude this sample from the update". Everything about the spec (file, function, signature,
options) is checked in `load_reward`, so a typo fails at config load, not at step 500.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rewards.errors import RewardSpecError
from rewards.spec import SpecLoader

# statuses of one (function, sample) call, in order of precedence when several functions disagree
STATUSES = ("crash", "timeout", "error", "invalid", "none", "ok")

_RESERVED = ("prompt", "completion", "prompts", "completions")


def batched(fn: Callable) -> Callable:
    """Mark a reward function as batched: ``fn(prompts, completions, **columns) -> list``.

    ``columns`` maps each dataset field to the list of its values (``None`` where a row lacks it).
    """
    fn.__reward_batched__ = True
    return fn


def _is_async(fn: Callable) -> bool:
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(fn, "__call__", None)
    return call is not None and inspect.iscoroutinefunction(call)


@dataclass
class _Signature:
    accepts_var_kw: bool
    names: frozenset[str]         # keyword-passable parameter names after (prompt, completion)
    required: frozenset[str]      # of those, the ones without a default


def _inspect_signature(fn: Callable, where: str) -> _Signature:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as e:
        raise RewardSpecError(f"{where}: cannot read the function's signature ({e})") from None
    params = list(sig.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    var_pos = any(p.kind == p.VAR_POSITIONAL for p in params)
    if len(positional) < 2 and not var_pos:
        got = ", ".join(p.name for p in params) or "no parameters"
        raise RewardSpecError(
            f"{where}: wrong signature ({got}); a reward function takes "
            "(prompt, completion, **fields) or, batched, (prompts, completions, **columns)")
    rest = positional[2:] + [p for p in params if p.kind == p.KEYWORD_ONLY]
    pos_only_extra = [p.name for p in positional[2:] if p.kind == p.POSITIONAL_ONLY and p.default is p.empty]
    if pos_only_extra:
        raise RewardSpecError(f"{where}: wrong signature: positional-only parameters {pos_only_extra} "
                              "cannot be filled from dataset fields")
    return _Signature(
        accepts_var_kw=any(p.kind == p.VAR_KEYWORD for p in params),
        names=frozenset(p.name for p in rest if p.kind != p.POSITIONAL_ONLY),
        required=frozenset(p.name for p in rest if p.default is p.empty and p.kind != p.POSITIONAL_ONLY),
    )


class RewardFn:
    """One loaded reward function with its bound options.

    `spec` is the string it was loaded from (None for a callable passed directly); workers rebuild
    the function from it rather than pickling code. Config options (`config`) are passed as keyword
    arguments on every call and take precedence over dataset fields of the same name (built-ins
    receive them once, at construction).
    """

    def __init__(self, fn: Callable, *, name: str, spec: str | None = None,
                 config: Mapping[str, Any] | None = None, base_dir: str | None = None,
                 bound_config: Mapping[str, Any] | None = None):
        self.fn = fn
        self.name = name
        self.spec = spec
        self.config = dict(config or {})          # as given by the user (for rebuilding)
        self.base_dir = base_dir
        self._bound = dict(bound_config or {})    # passed on every call
        self.batched = bool(getattr(fn, "__reward_batched__", False))
        self.is_async = _is_async(fn)
        self.signature = _inspect_signature(fn, name)
        unknown = [k for k in self._bound if k not in self.signature.names and not self.signature.accepts_var_kw]
        if unknown:
            raise RewardSpecError(f"{name}: options {unknown} are not parameters of the function "
                                  f"(it accepts {sorted(self.signature.names) or 'no options'})")

    def __repr__(self) -> str:
        kind = ("async " if self.is_async else "") + ("batched" if self.batched else "per-sample")
        return f"RewardFn({self.name!r}, {kind})"

    def __reduce__(self):
        if self.spec is not None:
            return (_rebuild, (self.spec, self.config, self.base_dir, self.name))
        return (_wrap_callable, (self.fn, self.name, self._bound))

    # -- calling ------------------------------------------------------------------------------
    def kwargs_for(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """Keyword arguments for one sample: the row's fields the function accepts, then options."""
        sig = self.signature
        if sig.accepts_var_kw:
            kw = {k: v for k, v in row.items() if k not in _RESERVED}
        else:
            kw = {k: row[k] for k in sig.names if k in row}
        kw.update(self._bound)
        return kw

    def columns_for(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, list]:
        keys: dict[str, None] = {}
        for r in rows:
            keys.update(dict.fromkeys(r))
        sig = self.signature
        names = [k for k in keys if k not in _RESERVED and (sig.accepts_var_kw or k in sig.names)]
        cols = {k: [r.get(k) for r in rows] for k in names}
        cols.update(self._bound)
        return cols

    def call_one(self, prompt: str, completion: str, row: Mapping[str, Any]) -> Any:
        """Call a per-sample function once (runs the coroutine if it is async); raw result."""
        out = self.fn(prompt, completion, **self.kwargs_for(row))
        if self.is_async:
            out = asyncio.run(_await(out))
        return out

    def __call__(self, prompts: Sequence[str], completions: Sequence[str],
                 fields: Sequence[Mapping[str, Any]] | None = None) -> list[float | None]:
        """Score a batch in this process, no isolation; raises on errors and invalid values."""
        fields = list(fields) if fields is not None else [{} for _ in prompts]
        _check_lengths(prompts, completions, fields)
        if self.batched:
            out = self.fn(list(prompts), list(completions), **self.columns_for(fields))
            if self.is_async:
                out = asyncio.run(_await(out))
            return [_strict(v, self.name) for v in check_batch(out, len(prompts), self.name)]
        return [_strict(self.call_one(p, c, f), self.name) for p, c, f in zip(prompts, completions, fields)]


async def _await(x):
    return await x


def _check_lengths(prompts, completions, fields) -> None:
    if not (len(prompts) == len(completions) == len(fields)):
        raise ValueError(f"prompts, completions and fields differ in length: "
                         f"{len(prompts)}, {len(completions)}, {len(fields)}")


class InvalidReward(Exception):
    """A reward function returned something that is not a finite number or None."""


def to_reward(value: Any) -> float | None:
    """Validate one returned value: a finite real number (bools and numpy scalars too) or None."""
    if value is None:
        return None
    if isinstance(value, numbers.Real) and not isinstance(value, complex):
        v = float(value)
        if not math.isfinite(v):
            raise InvalidReward(f"returned {v}")
        return v
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:   # numpy / torch 0-d
        return to_reward(value.item())
    raise InvalidReward(f"returned {type(value).__name__} {_short(repr(value))}, expected a float or None")


def check_batch(out: Any, n: int, name: str) -> list:
    if isinstance(out, (str, bytes)) or not hasattr(out, "__len__"):
        raise InvalidReward(f"batched function returned {type(out).__name__}, expected a list of {n}")
    if len(out) != n:
        raise InvalidReward(f"batched function returned {len(out)} values for a batch of {n}")
    return list(out)


def _strict(value: Any, name: str) -> float | None:
    try:
        return to_reward(value)
    except InvalidReward as e:
        raise InvalidReward(f"{name}: {e}") from None


def _short(s: str, n: int = 200) -> str:
    return s if len(s) <= n else s[:n] + "..."


# -- loading ------------------------------------------------------------------------------------
def _builtin_registry() -> dict[str, Callable[..., Callable]]:
    from rewards.builtin import BUILTINS

    return BUILTINS


_SPECS = SpecLoader(label="reward spec", noun="function", error=RewardSpecError)


def load_reward(spec: str | Callable, *, name: str | None = None, base_dir: str | None = None,
                **kwargs: Any) -> RewardFn:
    """Load a reward function from a spec string (or wrap a callable) and check its signature.

    ``kwargs`` are the function's options: constructor options of a built-in (unknown ones are an
    error), or keyword arguments bound to every call of a user function.
    Raises `RewardSpecError` naming the file / module / function / option at fault.
    """
    if callable(spec) and not isinstance(spec, str):
        fn_name = name or getattr(spec, "__name__", type(spec).__name__)
        return RewardFn(spec, name=fn_name, bound_config=kwargs)
    if not isinstance(spec, str) or not spec.strip():
        raise RewardSpecError(f"reward spec must be a non-empty string or a callable, got {spec!r}")
    us = _SPECS.parse(spec, base_dir)
    spec, target = us.text, us.target
    if us.kind == "builtin":
        registry = _builtin_registry()
        if target not in registry:
            raise RewardSpecError(f"unknown built-in reward {target!r} (built-ins: {', '.join(sorted(registry))}; "
                                  "user functions are path/to/file.py:function or package.module:function)")
        factory = registry[target]
        try:
            inspect.signature(factory).bind(**kwargs)
        except TypeError:
            opts = [p for p in inspect.signature(factory).parameters]
            bad = [k for k in kwargs if k not in opts]
            raise RewardSpecError(f"built-in reward {target!r}: unknown or missing options {bad or list(kwargs)} "
                                  f"(options: {', '.join(opts)})") from None
        try:
            fn = factory(**kwargs)
        except (TypeError, ValueError) as e:
            raise RewardSpecError(f"built-in reward {target!r}: {e}") from None
        return RewardFn(fn, name=name or target, spec=spec, config=kwargs)
    fn = _SPECS.load(us)
    func = us.attr
    if us.kind == "file":
        spec = f"{us.target}:{func}"     # absolute, so workers with another cwd load the same file
    if not callable(fn):
        raise RewardSpecError(f"reward spec {spec!r}: {func!r} is a {type(fn).__name__}, not a function")
    try:
        return RewardFn(fn, name=name or func, spec=spec, config=kwargs, bound_config=kwargs)
    except RewardSpecError as e:
        raise RewardSpecError(f"reward spec {spec!r}: {e}") from None


def _rebuild(spec: str, config: dict, base_dir: str | None, name: str) -> RewardFn:
    return load_reward(spec, name=name, base_dir=base_dir, **config)


def _wrap_callable(fn: Callable, name: str, bound: dict) -> RewardFn:
    return RewardFn(fn, name=name, bound_config=bound)


# -- specs from YAML ---------------------------------------------------------------------------
@dataclass
class RewardSpec:
    """One entry of a reward config (YAML ``rewards:`` list).

    spec: built-in name, ``file.py:function`` or ``module:function`` (or a callable, from Python)
    weight: multiplier in the weighted total
    kwargs: options (built-in options, or keyword arguments bound to a user function)
    timeout_s: per-call limit for this function (None: the pool's)
    fallback: reward used when this function fails (None here: the pool's fallback)
    name: label in logs and per-function scores (default: the function / built-in name)
    """

    spec: str | Callable
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)
    timeout_s: float | None = None
    fallback: float | None = None
    name: str | None = None

    _KEYS = ("spec", "weight", "kwargs", "timeout_s", "fallback", "name")

    @classmethod
    def from_config(cls, obj: Any, where: str = "rewards") -> RewardSpec:
        """From a YAML value: ``"math"`` or ``{spec: ..., weight: ..., kwargs: {...}, ...}``."""
        if isinstance(obj, RewardSpec):
            return obj
        if isinstance(obj, str) or callable(obj):
            return cls(spec=obj)
        if not isinstance(obj, Mapping):
            raise RewardSpecError(f"{where}: expected a spec string or a mapping, got {type(obj).__name__}")
        obj = dict(obj)
        if "config" in obj and "kwargs" not in obj:   # accepted alias
            obj["kwargs"] = obj.pop("config")
        unknown = [k for k in obj if k not in cls._KEYS]
        if unknown:
            raise RewardSpecError(f"{where}: unknown keys {unknown} (allowed: {', '.join(cls._KEYS)})")
        if "spec" not in obj:
            raise RewardSpecError(f"{where}: missing key 'spec'")
        kw = obj.get("kwargs") or {}
        if not isinstance(kw, Mapping):
            raise RewardSpecError(f"{where}.kwargs: expected a mapping, got {type(kw).__name__}")
        for key in ("weight", "timeout_s", "fallback"):
            v = obj.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise RewardSpecError(f"{where}.{key}: expected a number, got {v!r}")
        t = obj.get("timeout_s")
        if t is not None and t <= 0:
            raise RewardSpecError(f"{where}.timeout_s: must be > 0, got {t}")
        return cls(spec=obj["spec"], weight=float(obj.get("weight", 1.0)), kwargs=dict(kw),
                   timeout_s=t, fallback=obj.get("fallback"), name=obj.get("name"))

    def load(self, base_dir: str | None = None) -> RewardFn:
        if isinstance(self.spec, RewardFn):
            return self.spec
        return load_reward(self.spec, name=self.name, base_dir=base_dir, **self.kwargs)


def parse_reward_specs(obj: Any, where: str = "rewards") -> list[RewardSpec]:
    """A YAML ``rewards:`` value (a string, one mapping, or a list of them) -> list of `RewardSpec`."""
    if obj is None:
        raise RewardSpecError(f"{where}: no reward function given")
    items = obj if isinstance(obj, (list, tuple)) else [obj]
    if not items:
        raise RewardSpecError(f"{where}: empty list of reward functions")
    return [RewardSpec.from_config(x, f"{where}[{i}]") for i, x in enumerate(items)]


class CompositeReward:
    """Several reward functions with weights; total = sum(weight * score).

    A sample whose score is None in any function is excluded (total None). The per-function
    scores are kept for logging. Loading checks every function up front.
    """

    def __init__(self, specs: Any, base_dir: str | None = None):
        if isinstance(specs, CompositeReward):
            specs = specs.specs
        self.specs = [s if isinstance(s, RewardSpec) else RewardSpec.from_config(s)
                      for s in (specs if isinstance(specs, (list, tuple)) else [specs])]
        self.specs = [RewardSpec(spec=s.spec, weight=s.weight, kwargs=s.kwargs, timeout_s=s.timeout_s,
                                 fallback=s.fallback, name=s.name) for s in self.specs]
        if not self.specs:
            raise RewardSpecError("no reward function given")
        self.functions = [s.load(base_dir) for s in self.specs]
        seen: dict[str, int] = {}
        for f in self.functions:   # unique names for logs
            n = seen.get(f.name, 0)
            seen[f.name] = n + 1
            if n:
                f.name = f"{f.name}#{n + 1}"
        self.weights = [s.weight for s in self.specs]
        self.names = [f.name for f in self.functions]

    def __call__(self, prompts, completions, fields=None) -> tuple[list[float | None], dict[str, list]]:
        """Score in this process (no isolation, errors propagate): (totals, per-function scores)."""
        per = {f.name: f(prompts, completions, fields) for f in self.functions}
        return combine(per, dict(zip(self.names, self.weights))), per


def combine(per_function: Mapping[str, Sequence[float | None]], weights: Mapping[str, float]) -> list[float | None]:
    names = list(per_function)
    n = len(per_function[names[0]]) if names else 0
    out: list[float | None] = []
    for i in range(n):
        vals = [per_function[k][i] for k in names]
        out.append(None if any(v is None for v in vals) else sum(weights[k] * v for k, v in zip(names, vals)))
    return out
