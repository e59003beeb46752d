"""Built-in ``math``: extract the final answer from a completion and judge it against the reference.

Extraction: `rewards.builtin.math_extract` (``boxed``, ``answer_tag``, ``hash``, ``latex``,
``last_number``, in the configured order). Judging (`judge`), first decisive step wins:
  1. our rules (`math_rules.veto`): a non-ASCII digit, different words, letters differing only in
     case, a different name on the left of ``=``, open vs closed interval ends -> not equal;
  2. our parser (`mathparse`, safe and fast): when both answers parse as one expression, the
     verdict is exact for rationals (``3 == 3.0 == 6/2``, ``1000000 != 1000001.0``,
     ``16386.20 != 16386.21``); a decimal matches a non-terminating or irrational value within
     `rel_tol` (``0.333333333 == 1/3``, ``3.141593 == \\pi``); with variables, rational functions
     are compared exactly at three rational points (``1.0000000001x^{13} != x^{13}``), others at
     sample points and by an exact sympy check; equal ordered tuples are equal;
  3. Math-Verify (`math_verify_backend`), under a CPU limit, for what our parser does not read or
     cannot settle: sets and unordered lists, intervals, relations, matrices, identities
     (``\\sec^2 y == \\tan^2 y + 1``), equations;
  4. otherwise the answers are compared as normalized text (case folded for words: ``Monday``).
``50%`` matches 50 and 0.5 with ``percent="either"`` (default), only 0.5 with ``"fraction"``, only
50 with ``"strip"``. Only the last `max_completion_chars` of a completion are read.
"""

from __future__ import annotations

import functools
import random
import re
import zlib
from dataclasses import dataclass
from fractions import Fraction

from rewards.builtin import math_rules
from rewards.builtin import math_verify_backend as mv
from rewards.builtin import mathparse as mp
from rewards.builtin.math_extract import METHODS, blocks, extract_answer, extract_with_method, gold_answer

__all__ = ["METHODS", "MathReward", "blocks", "Verdict", "extract_answer", "gold_answer", "is_equiv", "judge"]
VERIFIERS = ("math_verify", "builtin")
SYMPY_CPU_S = 0.3        # our exact symbolic check
VERIFIER_CPU_S = 0.6     # one Math-Verify call


@dataclass(frozen=True)
class Verdict:
    equal: bool
    reason: str          # one line: which step decided and why


def _string_key(s: str) -> str:
    s = re.sub(r"\s+", "", mp.normalize(s))
    s = re.sub(r"[A-Za-z]{2,}", lambda m: m.group(0).lower(), s)   # words fold case, variables do not
    m = re.fullmatch(r"\(([A-Za-z])\)", s)
    return m.group(1) if m else s


def _close(a: complex, b: complex, rel_tol: float, abs_tol: float) -> bool:
    return abs(a - b) <= max(rel_tol * max(abs(a), abs(b)), abs_tol)


def _strip_pct(node):
    return node[1] if node[0] == "pct" else node


def _parse(s: str):
    tree = mp.parse(mp.normalize(s))
    mp.check_size(tree)
    return tree


def _terminates(q) -> bool:
    """Whether a rational has a finite decimal expansion (denominator 2^a 5^b)."""
    d = q.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    return d == 1


def _equal_scalars(a, b, rel_tol, abs_tol, decimal: bool) -> bool | None:
    """Two parsed expressions without tuples. `decimal`: a side was written with a decimal point,
    so a non-terminating or irrational value may match it within `rel_tol`."""
    syms = mp.symbols(a) | mp.symbols(b)
    if not syms:
        ea, eb = mp.exact(a), mp.exact(b)
        if ea is not None and eb is not None:
            if ea == eb or not decimal or (_terminates(ea) and _terminates(eb)):
                return ea == eb
        try:
            return _close(mp.numeric(a), mp.numeric(b), rel_tol, abs_tol)
        except (mp.ParseError, OverflowError, ZeroDivisionError, ValueError):
            return False
    return _equal_symbolic(a, b, syms, decimal)


def _has_roots(node) -> bool:
    if node[0] == "root" or (node[0] == "pow" and (mp.exact(node[2]) is None or mp.exact(node[2]).denominator != 1)):
        return True
    return any(isinstance(c, tuple) and _has_roots(c) for c in node[1:])


def _equal_symbolic(a, b, syms, decimal: bool) -> bool | None:
    """With variables: numeric check at a few points first (cheap), then an exact sympy check.
    None (undecided) when roots' branches may explain a numeric difference, or when a decimal
    literal is involved and the exact check cannot run (``1.0000000001x^{13}`` is not ``x^{13}``)."""
    exact = _exact_identity(a, b, syms)
    if exact is not None:
        return exact
    points = (0.5377, 1.8339, -2.2588, 0.8622)
    try:
        for shift in range(3):
            env = {s: complex(points[(k + shift) % 4] + 0.31 * k) for k, s in enumerate(sorted(syms))}
            if not _close(mp.numeric(a, env), mp.numeric(b, env), 1e-9, 1e-12):
                return None if _has_roots(a) or _has_roots(b) else False
    except (mp.ParseError, OverflowError, ZeroDivisionError, ValueError):
        return False
    if _term_bound(a) + _term_bound(b) > 2000:
        # numerically equal at 3 points; expanding would be too expensive to confirm
        return None if decimal else True
    try:
        import sympy

        with mv.cpu_limit(SYMPY_CPU_S):
            diff = sympy.expand(mp.to_sympy(a) - mp.to_sympy(b))
            if diff == 0:
                return True
            return sympy.simplify(diff) == 0 if sympy.count_ops(diff) <= 40 else True
    except mv.VerifierTimeout:
        return None if decimal else True   # numerically equal at 3 points; the exact check ran out of time
    except mp.ParseError:
        return None if decimal else True   # numerically equal at 3 points and not convertible
    except (TypeError, ValueError, ZeroDivisionError, RecursionError):
        return False


def _substitute(node, env: dict):
    if node[0] == "sym":
        return ("num", env[node[1]])
    return (node[0],) + tuple(_substitute(c, env) if isinstance(c, tuple) else c for c in node[1:])


def _exact_identity(a, b, syms) -> bool | None:
    """Rational functions compared exactly at three rational points drawn from a seed of both
    texts (Schwartz-Zippel: different rational functions of bounded degree agree at such points
    with negligible probability). None when a side is not rational there (roots, pi, too large)."""
    rng = random.Random(zlib.crc32(repr((a, b)).encode()))
    for _ in range(3):
        env = {s: Fraction(rng.randrange(10**6, 10**7), rng.randrange(10**3, 10**4)) for s in syms}
        va, vb = mp.exact(_substitute(a, env)), mp.exact(_substitute(b, env))
        if va is None or vb is None:
            return None
        if va != vb:
            return False
    return True


def _term_bound(node) -> float:
    """Upper bound on the number of terms after expansion, to keep sympy.expand cheap."""
    kind = node[0]
    if kind == "add":
        return _term_bound(node[1]) + _term_bound(node[2])
    if kind in ("mul", "div"):
        return _term_bound(node[1]) * _term_bound(node[2])
    if kind in ("neg", "pct", "root"):
        return _term_bound(node[1])    # a root's argument is expanded in full: (X^48)^(1/8)
    if kind == "pow":
        e = mp.exact(node[2])
        base = _term_bound(node[1])
        if e is None:
            return base
        return float(base) ** min(abs(e.numerator), 64)
    return 1.0


def _builtin(pred: str, gold: str, rel_tol, abs_tol, percent) -> tuple[bool | None, str]:
    """Our parser's verdict; None when it cannot settle the question (unread, or unequal tuples)."""
    try:
        a, b = _parse(pred), _parse(gold)
    except (mp.ParseError, RecursionError, OverflowError, ValueError, ZeroDivisionError) as e:
        return None, f"our parser cannot read it ({str(e)[:60]})"
    decimal = "." in pred or "." in gold
    if percent == "strip":
        a, b = _strip_pct(a), _strip_pct(b)
    candidates = [(a, b)]
    if percent == "either" and (a[0] == "pct" or b[0] == "pct"):
        candidates.append((_strip_pct(a), _strip_pct(b)))
    if _decimal_comma(pred, gold):
        return True, "equal values (decimal comma)"
    tuples = a[0] == "tuple" or b[0] == "tuple"
    undecided = False
    for x, y in candidates:
        if tuples:
            if x[0] == y[0] == "tuple" and len(x) == len(y) and all(
                    i[0] != "tuple" and j[0] != "tuple" and _equal_scalars(i, j, rel_tol, abs_tol, decimal)
                    for i, j in zip(x[1:], y[1:])):
                return True, "equal element by element"
            continue
        same = _equal_scalars(x, y, rel_tol, abs_tol, decimal)
        if same:
            return True, "equal values" if not (mp.symbols(x) | mp.symbols(y)) else "equal expressions"
        undecided |= same is None
    if tuples:
        return None, "lists differ in order or length"
    if undecided:
        return None, "cannot settle it exactly (roots or decimals in an expression)"
    return False, "different values" if not (mp.symbols(a) | mp.symbols(b)) else "different expressions"


def _decimal_comma(pred: str, gold: str) -> bool:
    """``1,22`` for ``1.22`` (a decimal comma: never groups of three, which read as thousands)."""
    for x, y in ((pred, gold), (gold, pred)):
        x, y = x.strip().strip("$"), y.strip().strip("$")
        if re.fullmatch(r"-?[0-9]+,[0-9]+", x) and not re.fullmatch(r"-?[1-9][0-9]{0,2},[0-9]{3}", x) \
                and re.fullmatch(r"-?[0-9]+\.[0-9]+", y):
            return x.replace(",", ".") == y
    return False


@functools.lru_cache(maxsize=4096)   # GRPO groups often repeat an answer: decide it once
def judge(pred: str, gold: str, rel_tol: float = 1e-6, abs_tol: float = 1e-9, percent: str = "either",
          verifier: str = "math_verify") -> Verdict:
    """Whether two final answers are mathematically equal, and which step decided (module docstring)."""
    if percent not in ("either", "fraction", "strip"):
        raise ValueError(f"percent must be 'either', 'fraction' or 'strip', got {percent!r}")
    if verifier not in VERIFIERS:
        raise ValueError(f"verifier must be one of {VERIFIERS}, got {verifier!r}")
    if len(pred) > mp.MAX_CHARS or len(gold) > mp.MAX_CHARS:
        same = _string_key(pred[:10_000]) == _string_key(gold[:10_000])
        return Verdict(same, f"longer than {mp.MAX_CHARS} characters: compared as text")
    why = math_rules.veto(pred, gold)
    if why:
        return Verdict(False, f"rule: {why}")
    ours, why = _builtin(pred, gold, rel_tol, abs_tol, percent)
    if ours is not None:
        return Verdict(ours, f"parser: {why}")
    if verifier == "math_verify":
        verdict, note = mv.equal(pred, gold, VERIFIER_CPU_S)
        if verdict is not None:
            return Verdict(verdict, note)
        why = f"{why}; {note}"
    same = _string_key(pred) == _string_key(gold)
    return Verdict(same, f"{why}; as text: {'same' if same else 'different'}")


def is_equiv(pred: str, gold: str, rel_tol: float = 1e-6, abs_tol: float = 1e-9,
             percent: str = "either", verifier: str = "math_verify") -> bool:
    """Whether two final answers are mathematically equal (see `judge`)."""
    return judge(pred, gold, rel_tol, abs_tol, percent, verifier).equal


class MathReward:
    """``fn(prompt, completion, **fields)``: `correct` if the extracted answer equals the row's
    `answer_field`, `wrong` if not, `no_answer` if nothing could be extracted."""

    def __init__(self, extract: list[str] | tuple[str, ...] | str = METHODS, answer_field: str = "answer",
                 rel_tol: float = 1e-6, abs_tol: float = 1e-9, percent: str = "either",
                 correct: float = 1.0, wrong: float = 0.0, no_answer: float = 0.0,
                 max_completion_chars: int = 10_000, verifier: str = "math_verify"):
        order = (extract,) if isinstance(extract, str) else tuple(extract)
        bad = [m for m in order if m not in METHODS]
        if bad or not order:
            raise ValueError(f"extract: unknown methods {bad} (choose from {', '.join(METHODS)})")
        if percent not in ("either", "fraction", "strip"):
            raise ValueError(f"percent must be 'either', 'fraction' or 'strip', got {percent!r}")
        if verifier not in VERIFIERS:
            raise ValueError(f"verifier must be one of {', '.join(VERIFIERS)}, got {verifier!r}")
        self.order = order
        self.answer_field = answer_field
        self.rel_tol, self.abs_tol, self.percent = rel_tol, abs_tol, percent
        self.correct, self.wrong, self.no_answer = correct, wrong, no_answer
        self.max_chars = max_completion_chars
        self.verifier = verifier
        import sympy  # noqa: F401  (symbolic answers need it: import at load, not in the first timed call)

        if verifier == "math_verify":
            mv.load()

    def _gold(self, fields) -> str:
        if self.answer_field not in fields or fields[self.answer_field] is None:
            raise KeyError(f"the data row has no field {self.answer_field!r} (the reference answer); "
                           f"fields: {sorted(fields)}")
        return gold_answer(fields[self.answer_field])

    def explain(self, completion: str, **fields) -> dict:
        """Per case: the extracted answer, the method that found it, the reference, the verdict and why."""
        gold = self._gold(fields)
        pred, method = extract_with_method(completion, self.order, self.max_chars)
        if pred is None:
            return {"answer": None, "method": None, "reference": gold, "equal": False,
                    "reason": f"no answer found (methods tried: {', '.join(self.order)})"}
        v = judge(pred, gold, self.rel_tol, self.abs_tol, self.percent, self.verifier)
        return {"answer": pred, "method": method, "reference": gold, "equal": v.equal, "reason": v.reason}

    def __call__(self, prompt: str, completion: str, **fields) -> float:
        gold = self._gold(fields)
        pred = extract_answer(completion, self.order, self.max_chars)
        if pred is None:
            return self.no_answer
        ok = judge(pred, gold, self.rel_tol, self.abs_tol, self.percent, self.verifier).equal
        return self.correct if ok else self.wrong
