"""The ``math`` reward's own rules: differences that make two answers unequal whatever a parser says.

Each rule looks at both answers as written and returns a reason when they differ in a way no
equivalence can excuse. They run before any parser, ours or Math-Verify, so a lenient normalisation
(dropping ``\\text{}``, folding case, reading a name off an equation) never turns a wrong answer
into a reward:
  digits        a non-ASCII digit (``３``, ``٤``): models must write 0-9
  words         the words (``\\text{}`` contents, bare words) differ, once units (``cm``, ``dollars``,
                ``degrees``...), joiners (``and``, ``or``) and scales (``million``: the parser reads
                ``5 million`` as 5*10^6) are set aside: ``\\text{not } 5 != 5``, ``12 \\text{ dozen} != 12``
  case          the letters differ only in case: ``\\sin a != \\sin A``, ``X != x``, ``(a) != (A)``
  name          both answers name what they give, differently: ``y = 5 != x = 5``
  brackets      both are intervals (or unions of them) with different open / closed ends: ``(0,1) != [0,1]``
"""

from __future__ import annotations

import re
from collections import Counter

# units and filler words a reference may carry or omit (from the prm800k and veRL normalisers)
UNITS = frozenset("""
    cm centimeter centimeters meter meters metre metres km kilometer kilometers mm millimeter millimeters
    m mi mile miles ft foot feet inch inches yard yards mph kmh kg g gm gram grams pound pounds lb lbs oz
    ounce ounces second seconds sec minute minutes min hour hours hr hrs day days week weeks month months
    year years degree degrees deg radian radians rad cent cents dollar dollars usd euro euros yuan
    unit units square sq cubic cu liter liters litre litres ml percent percentage pct points point ways
    students people apples meals edges integers digits multiples th st nd rd
""".split())
JOINERS = frozenset({"and", "or", "a", "an", "the", "is", "are"})
SCALES = frozenset({"thousand", "million", "billion", "trillion"})   # read as powers of ten by the parser
# LaTeX commands and function names that are math, not words
MATH_NAMES = frozenset("""
    sin cos tan sec csc cot arcsin arccos arctan sinh cosh tanh log ln lg exp sqrt frac dfrac tfrac cfrac
    max min gcd lcm mod bmod pmod det dim deg lim sum prod int infty infinity pi theta alpha beta gamma delta
    epsilon varepsilon lambda mu sigma phi varphi omega tau rho eta zeta xi psi chi kappa nu
    cup cap in notin subset subseteq setminus emptyset varnothing leq geq neq le ge ne lt gt approx sim
    cdot times div pm mp circ left right begin end pmatrix bmatrix matrix array vmatrix cases quad qquad
    boxed text textbf textit textnormal mathrm mathbf mathit mbox operatorname displaystyle overline
    vec hat bar dot ldots cdots dots mathbb binom dbinom tbinom choose equiv perp parallel angle triangle
    to rightarrow leftarrow implies iff forall exists neg land lor wedge vee prime
""".split())
_TEXT_CMD = re.compile(r"\\(?:text|textbf|textit|textnormal|textrm|mathrm|mathbf|mathit|mbox|operatorname)\s*\{([^{}]*)\}")
_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}")


def non_ascii_digit(s: str) -> bool:
    return any(c.isdigit() and not c.isascii() for c in s) or any(
        "\uff10" <= c <= "\uff19" for c in s)


def words(s: str) -> Counter:
    """Lower-cased words an answer says, units / joiners / math names left out."""
    found: list[str] = []
    if s.count("=") == 1:
        s = s.split("=")[1]            # the name on the left is checked by `_lhs_name`
    s = re.sub(r"_\{[^{}]*\}|_[A-Za-z0-9]", " ", s)   # subscripts are names: S_{MBCN}
    for m in _TEXT_CMD.finditer(s):
        found += re.findall(r"[A-Za-z]{2,}", m.group(1))
    rest = _TEXT_CMD.sub(" ", s)
    rest = re.sub(r"\\[A-Za-z]+", " ", rest)
    found += [w for w in _WORD.findall(rest) if len(w) >= 3 or w.lower() in UNITS]
    return Counter(w.lower() for w in found
                   if w.lower() not in UNITS | JOINERS | MATH_NAMES | SCALES)


def _letters(s: str) -> str:
    """The letters of an answer outside command names, in order (``\\sin A`` -> ``A``)."""
    return "".join(re.findall(r"[A-Za-z]", re.sub(r"\\[A-Za-z]+", " ", _TEXT_CMD.sub(" ", s))))


def _lhs_name(s: str) -> str | None:
    """``y = 5`` -> ``y``; ``(p,q) = (3,2)`` -> ``(p,q)``; None unless exactly one ``=`` with a name on its left."""
    if s.count("=") != 1 or re.search(r"[<>]|\\[lg]eq?|\\neq", s):
        return None
    lhs = re.sub(r"\s+|\\[,;! ]", "", s.split("=")[0])
    if re.fullmatch(r"[A-Za-z](?:_\{?[A-Za-z0-9]+\}?)?", lhs) or re.fullmatch(r"\((?:[A-Za-z],)+[A-Za-z]\)", lhs):
        return lhs
    return None


_INTERVAL = re.compile(r"\s*[(\[]\s*[^()\[\],]+,[^()\[\],]+[)\]]\s*")


def _interval_ends(s: str) -> Counter | None:
    """Multiset of (open, close) brackets when `s` is an interval or a union of intervals, else None."""
    s = re.sub(r"\\left|\\right|\\!|\\,", "", s).replace("\\infty", "oo")
    parts = re.split(r"\\cup|∪|U(?=\s*[(\[])", s)
    ends: list[str] = []
    for p in parts:
        if not _INTERVAL.fullmatch(p):
            return None
        p = p.strip()
        ends.append(p[0] + p[-1])
    return Counter(ends)


def veto(pred: str, gold: str) -> str | None:
    """A reason the two answers cannot be equal, or None."""
    if non_ascii_digit(pred):
        return "the answer has a non-ASCII digit"
    wp, wg = words(pred), words(gold)
    if wp != wg:
        extra = sorted((wp - wg) | (wg - wp))
        return f"the words differ ({', '.join(extra[:4])})"
    lp, lg = _letters(pred), _letters(gold)
    if lp != lg and lp.lower() == lg.lower():
        return f"letters differ in case ({lp} vs {lg})"
    np_, ng = _lhs_name(pred), _lhs_name(gold)
    if np_ and ng and np_ != ng:
        return f"names differ ({np_} = vs {ng} =)"
    ip, ig = _interval_ends(pred), _interval_ends(gold)
    if ip is not None and ig is not None and ip != ig:
        return "interval ends differ (open vs closed)"
    return None
