"""Built-in ``math``: extract the final answer from a completion and compare it with the reference.

Extraction methods (tried in the configured order, the first that finds something wins):
  boxed        the last ``\\boxed{...}`` (nested braces allowed) or ``\\fbox{...}``
  answer_tag   the last ``<answer>...</answer>`` (a ``\\boxed{}`` inside it wins)
  hash         the text after the last ``####`` on its line (GSM8K style)
  last_number  the last number in the text (``-1,234.5``, ``3/4``)
Equivalence (`is_equiv`): both sides are parsed by the safe parser of `mathparse` and compared
exactly when rational (3 == 3.0 == 6/2, 0.5 == \\frac{1}{2}, 1,000 == 1000, 1000000 != 1000001),
with a relative tolerance `rel_tol` when a side is written as a decimal (0.333333333 == 1/3) or the
value is irrational (2\\sqrt{2} == \\sqrt{8}), and with sympy for expressions with
variables (x+1 == 1+x). ``50%`` matches 50 and 0.5 with ``percent="either"`` (default), only 0.5
with ``"fraction"``, only 50 with ``"strip"``. Unparseable answers are compared as normalized strings.
Only the last `max_completion_chars` of a completion are read; answers over 200 characters are
compared as strings only.
"""

from __future__ import annotations

import functools
import re

from rewards.builtin import mathparse as mp

METHODS = ("boxed", "answer_tag", "hash", "last_number")
_BOXED = re.compile(r"\\(?:boxed|fbox)")
_HASH = re.compile(r"####[ \t]*([^\n]*)")
_NUMBER = re.compile(r"-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:\s*/\s*\d+)?")


def _matching_braces(text: str) -> dict[int, int]:
    """Position of each '{' -> position of its '}' (unmatched ones absent); one pass, O(n)."""
    stack: list[int] = []
    match: dict[int, int] = {}
    for j, c in enumerate(text):
        if c == "{":
            stack.append(j)
        elif c == "}" and stack:
            match[stack.pop()] = j
    return match


def _boxed(text: str) -> str | None:
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    match = _matching_braces(text) if "{" in text else {}
    for start in reversed(starts):
        i = start
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            if i in match:
                return text[i + 1:match[i]]
            continue   # unbalanced: try an earlier one
        m = re.match(r"[^\s$]+", text[i:i + 200])   # \boxed 5
        if m:
            return m.group(0)
    return None


def blocks(text: str, open_tag: str, close_tag: str) -> list[str]:
    """Contents of every ``open_tag ... close_tag`` (non-nested, first close wins), in linear time
    (a regex ``(.*?)`` rescans to the end for every unclosed tag)."""
    out, pos = [], 0
    while True:
        a = text.find(open_tag, pos)
        if a < 0:
            return out
        b = text.find(close_tag, a + len(open_tag))
        if b < 0:
            return out
        out.append(text[a + len(open_tag):b])
        pos = b + len(close_tag)


def _answer_tag(text: str) -> str | None:
    found = blocks(text, "<answer>", "</answer>")
    if not found:
        return None
    inner = found[-1]
    return _boxed(inner) or inner.strip()


def _hash(text: str) -> str | None:
    found = _HASH.findall(text)
    return found[-1].strip() if found and found[-1].strip() else None


def _last_number(text: str) -> str | None:
    found = _NUMBER.findall(text)
    return found[-1].rstrip(",") if found else None


_EXTRACTORS = {"boxed": _boxed, "answer_tag": _answer_tag, "hash": _hash, "last_number": _last_number}


def extract_answer(text: str, order=METHODS, max_chars: int = 10_000) -> str | None:
    """The final answer in `text` by the first method in `order` that finds one (None if none)."""
    text = text[-max_chars:]
    for method in order:
        ans = _EXTRACTORS[method](text)
        if ans is not None and ans.strip():
            return ans.strip()
    return None


def gold_answer(gold) -> str:
    """The reference answer: a number, or a string that may hold ``#### x`` or ``\\boxed{x}``."""
    if isinstance(gold, (int, float)) and not isinstance(gold, bool):
        return repr(gold)
    gold = str(gold)
    return extract_answer(gold, ("boxed", "hash")) or gold.strip()


def _string_key(s: str) -> str:
    s = re.sub(r"\s+", "", mp.normalize(s)).lower()
    m = re.fullmatch(r"\(([a-z])\)", s)
    return m.group(1) if m else s


def _close(a: complex, b: complex, rel_tol: float, abs_tol: float) -> bool:
    return abs(a - b) <= max(rel_tol * max(abs(a), abs(b)), abs_tol)


def _strip_pct(node):
    return node[1] if node[0] == "pct" else node


def _parse(s: str):
    tree = mp.parse(mp.normalize(s))
    mp.check_size(tree)
    return tree


def _equal_nodes(a, b, rel_tol, abs_tol, approx=False) -> bool:
    """`approx`: a side was written with a decimal point, so rationals compare with tolerance
    too (0.333333333 == 1/3); integers and fractions otherwise compare exactly (1000000 != 1000001)."""
    if a[0] == "tuple" or b[0] == "tuple":
        if a[0] != b[0] or len(a) != len(b):
            return False
        return all(_equal_nodes(x, y, rel_tol, abs_tol, approx) for x, y in zip(a[1:], b[1:]))
    syms = mp.symbols(a) | mp.symbols(b)
    if not syms:
        ea, eb = mp.exact(a), mp.exact(b)
        if ea is not None and eb is not None and (ea == eb or not approx):
            return ea == eb
        try:
            return _close(mp.numeric(a), mp.numeric(b), rel_tol, abs_tol)
        except (mp.ParseError, OverflowError, ZeroDivisionError, ValueError):
            return False
    # variables: numeric check at a few points first (cheap), then an exact sympy check
    points = (0.5377, 1.8339, -2.2588, 0.8622)
    try:
        for shift in range(3):
            env = {s: complex(points[(k + shift) % 4] + 0.31 * k) for k, s in enumerate(sorted(syms))}
            va, vb = mp.numeric(a, env), mp.numeric(b, env)
            if not _close(va, vb, 1e-9, 1e-12):
                return False
    except (mp.ParseError, OverflowError, ZeroDivisionError, ValueError):
        return False
    if _term_bound(a) + _term_bound(b) > 2000:
        return True   # numerically equal at 3 points; expanding would be too expensive to confirm
    try:
        import sympy

        diff = sympy.expand(mp.to_sympy(a) - mp.to_sympy(b))
        if diff == 0:
            return True
        return sympy.simplify(diff) == 0 if sympy.count_ops(diff) <= 40 else True
    except mp.ParseError:
        return True   # numerically equal at 3 points and not convertible: accept
    except (TypeError, ValueError, ZeroDivisionError, RecursionError):
        return False


def _term_bound(node) -> float:
    """Upper bound on the number of terms after expansion, to keep sympy.expand cheap."""
    kind = node[0]
    if kind in ("add",):
        return _term_bound(node[1]) + _term_bound(node[2])
    if kind in ("mul", "div"):
        return _term_bound(node[1]) * _term_bound(node[2])
    if kind in ("neg", "pct"):
        return _term_bound(node[1])
    if kind == "pow":
        e = mp.exact(node[2])
        base = _term_bound(node[1])
        if e is None or e.denominator != 1:
            return base
        return float(base) ** min(abs(e.numerator), 64)
    return 1.0


@functools.lru_cache(maxsize=4096)   # GRPO groups often repeat an answer: decide it once
def is_equiv(pred: str, gold: str, rel_tol: float = 1e-6, abs_tol: float = 1e-9,
             percent: str = "either") -> bool:
    """Whether two final answers are mathematically equal (see the module docstring)."""
    if percent not in ("either", "fraction", "strip"):
        raise ValueError(f"percent must be 'either', 'fraction' or 'strip', got {percent!r}")
    if len(pred) > mp.MAX_CHARS or len(gold) > mp.MAX_CHARS:
        return _string_key(pred[:10_000]) == _string_key(gold[:10_000])
    try:
        a, b = _parse(pred), _parse(gold)
    except (mp.ParseError, RecursionError, OverflowError, ValueError, ZeroDivisionError):
        return _string_key(pred) == _string_key(gold)
    approx = "." in pred or "." in gold
    if percent == "strip":
        a, b = _strip_pct(a), _strip_pct(b)
    if _equal_nodes(a, b, rel_tol, abs_tol, approx):
        return True
    if percent == "either" and (a[0] == "pct" or b[0] == "pct"):
        return _equal_nodes(_strip_pct(a), _strip_pct(b), rel_tol, abs_tol, approx)
    return False


class MathReward:
    """``fn(prompt, completion, **fields)``: `correct` if the extracted answer equals the row's
    `answer_field`, `wrong` if not, `no_answer` if nothing could be extracted."""

    def __init__(self, extract: list[str] | tuple[str, ...] | str = METHODS, answer_field: str = "answer",
                 rel_tol: float = 1e-6, abs_tol: float = 1e-9, percent: str = "either",
                 correct: float = 1.0, wrong: float = 0.0, no_answer: float = 0.0,
                 max_completion_chars: int = 10_000):
        order = (extract,) if isinstance(extract, str) else tuple(extract)
        bad = [m for m in order if m not in METHODS]
        if bad or not order:
            raise ValueError(f"extract: unknown methods {bad} (choose from {', '.join(METHODS)})")
        if percent not in ("either", "fraction", "strip"):
            raise ValueError(f"percent must be 'either', 'fraction' or 'strip', got {percent!r}")
        self.order = order
        self.answer_field = answer_field
        self.rel_tol, self.abs_tol, self.percent = rel_tol, abs_tol, percent
        self.correct, self.wrong, self.no_answer = correct, wrong, no_answer
        self.max_chars = max_completion_chars
        import sympy  # noqa: F401  (symbolic answers need it: import at load, not in the first timed call)

    def __call__(self, prompt: str, completion: str, **fields) -> float:
        if self.answer_field not in fields or fields[self.answer_field] is None:
            raise KeyError(f"the data row has no field {self.answer_field!r} (the reference answer); "
                           f"fields: {sorted(fields)}")
        pred = extract_answer(completion, self.order, self.max_chars)
        if pred is None:
            return self.no_answer
        gold = gold_answer(fields[self.answer_field])
        ok = is_equiv(pred, gold, self.rel_tol, self.abs_tol, self.percent)
        return self.correct if ok else self.wrong

