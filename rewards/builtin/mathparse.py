"""A small, safe parser for final answers: numbers, fractions, simple expressions, basic LaTeX.

Model output is untrusted, so nothing here calls ``eval``, ``sympify`` or ``parse_expr``. The text
is normalized, tokenized against a whitelist (digits, single-letter variables; ``xy`` is x*y but a
run of 3+ letters is text and compared as a string; + - * / ^ ( ) { } [ ] , %, and the LaTeX
commands \\frac \\dfrac \\tfrac \\sqrt \\cdot \\times \\div \\pi), parsed by a
recursive-descent parser with bounded length (`MAX_CHARS`), nesting depth (`MAX_DEPTH`), number of
nodes (`MAX_NODES`) and digits, into a tuple AST. Values are computed by our own evaluator: exactly
with `fractions.Fraction` where the result is rational, otherwise in floating point; powers are
checked for size *before* computing (``10**10**10`` and ``9^9^9^9`` are rejected, not evaluated).
Expressions with variables are compared with sympy, but the sympy expression is built node by node
from the AST (bounded integer exponents), never from a string.
"""

from __future__ import annotations

import cmath
import math
import re
from fractions import Fraction

from rewards.builtin.math_rules import JOINERS, UNITS

MAX_CHARS = 200          # longer answers are compared as strings only
MAX_DEPTH = 40           # nesting of parentheses / fractions / powers
MAX_NODES = 200
MAX_DIGITS = 60          # digits in one number literal
MAX_EXACT_BITS = 4096    # exact rationals larger than this fall back to floats
MAX_SYMBOLS = 4
MAX_SYMBOLIC_EXPONENT = 12


class ParseError(ValueError):
    """The text is not an answer this parser accepts (or it exceeds a bound)."""


# -- normalization -----------------------------------------------------------------------------
_TEXT_CMD = re.compile(r"\\(?:text|textbf|textit|textnormal|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]{0,100})\}")
_THOUSANDS = re.compile(r"(?<=[0-9]),(?=[0-9]{3}(?![0-9]))")
_SPACE_THOUSANDS = re.compile(r"(?<![0-9.])[0-9]{1,3}(?: [0-9]{3})+(?![0-9])")
_MIXED = re.compile(r"(?<![0-9.])([0-9]+)\s*(?:\s([0-9]+)\s*/\s*([0-9]+)|\\frac\s*\{([0-9]+)\}\s*\{([0-9]+)\})(?![0-9])")
_TRAILING_WORDS = re.compile(r"(?<=[0-9}])\s+([A-Za-z]{2,}(?:\s+[A-Za-z]{2,}){0,3})\.?$")   # "12 cm", "5 square meters"
_SCALES = {"thousand": 3, "million": 6, "billion": 9, "trillion": 12}
_SCALE_WORD = re.compile(r"([0-9])\s*(?:\\text\{\s*)?(thousand|million|billion|trillion)\b\}?", re.I)
_PERCENT_WORD = re.compile(r"\s*\b(?:percent|percentage|pct)\b")
_REPLACE = [
    ("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\:", ""), ("\\ ", " "),
    ("{,}", ","), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\cfrac", "\\frac"), ("\\%", "%"),
    ("\\$", ""), ("$", ""), ("~", ""),
    ("^{\\circ}", ""), ("^\\circ", ""), ("°", ""), ("\\displaystyle", ""),
    ("\u2212", "-"), ("\u00d7", "*"), ("\u00f7", "/"), ("\u221a", "\\sqrt"), ("\u03c0", "\\pi"),
    ("**", "^"), ("\\cdot", "*"), ("\\times", "*"), ("\\div", "/"), ("\\lbrace", "{"), ("\\rbrace", "}"),
]


def _unit_words(text: str) -> bool:
    return all(w.lower() in UNITS or w.lower() in JOINERS for w in re.findall(r"[A-Za-z]+", text))


def normalize(s: str) -> str:
    """Strip LaTeX decoration, units (known unit words, in \\text{} or after a number), dollar signs,
    thousands separators (``1,000``, ``1 000``, ``1{,}000``), a single-letter ``x =`` prefix; read a
    mixed number ``7 3/4`` / ``7\\frac{3}{4}`` as 7 + 3/4. Other words stay (and make the answer text)."""
    s = s.strip()
    for a, b in (("\\(", ""), ("\\)", ""), ("\\[", ""), ("\\]", "")):
        s = s.replace(a, b)
    for a, b in _REPLACE:
        s = s.replace(a, b)
    s = _TEXT_CMD.sub(lambda m: "" if _unit_words(m.group(1)) else m.group(1), s).strip() or \
        _TEXT_CMD.sub(r"\1", s).strip()
    s = _PERCENT_WORD.sub("%", s)
    s = _SCALE_WORD.sub(lambda m: f"{m.group(1)}*10^{_SCALES[m.group(2).lower()]}", s)
    s = _THOUSANDS.sub("", s)
    s = _SPACE_THOUSANDS.sub(lambda m: m.group(0).replace(" ", ""), s)
    s = _MIXED.sub(lambda m: f"({m.group(1)}+{m.group(2) or m.group(4)}/{m.group(3) or m.group(5)})", s)
    m = _TRAILING_WORDS.search(s)
    if m and _unit_words(m.group(1)):
        s = s[:m.start()]
    if s.count("=") == 1:
        lhs, rhs = s.split("=")
        if re.fullmatch(r"\s*[A-Za-z](_\{?\w\}?)?\s*", lhs) and rhs.strip():
            s = rhs
    s = s.strip().rstrip(".").strip()
    return s


# -- tokenizer ---------------------------------------------------------------------------------
_TOKEN = re.compile(r"\s*(?:([0-9]+\.?[0-9]*|\.[0-9]+)|(\\[A-Za-z]+)|([A-Za-z]+)|([-+*/^(){}\[\],%]))")
_COMMANDS = {"\\frac", "\\sqrt", "\\pi"}
_WORDS = {"sqrt": "\\sqrt", "pi": "\\pi", "frac": "\\frac"}


def tokenize(s: str) -> list[tuple[str, str]]:
    """-> [(kind, text)] with kind in num / sym / cmd / op; anything else raises `ParseError`."""
    if len(s) > MAX_CHARS:
        raise ParseError(f"answer longer than {MAX_CHARS} characters")
    out: list[tuple[str, str]] = []
    pos = 0
    s = s.rstrip()
    while pos < len(s):
        m = _TOKEN.match(s, pos)
        if not m:
            raise ParseError(f"unexpected character {s[pos]!r}")
        num, cmd, word, op = m.groups()
        if num is not None:
            if out and out[-1][0] == "num":   # "2 3": not a number, not a product
                raise ParseError("digits separated by a space")
            if len(num) > MAX_DIGITS:
                raise ParseError("number literal too long")
            out.append(("num", num))
        elif cmd is not None:
            if cmd not in _COMMANDS:
                raise ParseError(f"unsupported command {cmd}")
            out.append(("cmd", cmd))
        elif word is not None:
            if word in _WORDS:
                out.append(("cmd", _WORDS[word]))
            elif len(word) > 2:   # a word: a text answer, compared as a string ("cat" != "act")
                raise ParseError(f"text {word!r}")
            else:                 # xy = x*y
                out.extend(("sym", ch) for ch in word)
        else:
            out.append(("op", op))
        pos = m.end()
    return out


# -- parser ------------------------------------------------------------------------------------
class _Parser:
    def __init__(self, tokens):
        self.t = tokens
        self.i = 0
        self.depth = 0
        self.nodes = 0

    def peek(self):
        return self.t[self.i] if self.i < len(self.t) else ("end", "")

    def take(self, kind=None, text=None):
        tok = self.peek()
        if (kind and tok[0] != kind) or (text and tok[1] != text):
            raise ParseError(f"expected {text or kind}, got {tok[1] or 'end'}")
        self.i += 1
        return tok

    def node(self, *n):
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise ParseError("expression too large")
        return n

    def enter(self):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ParseError("nesting too deep")

    def parse(self):
        items = [self.expr()]
        while self.peek() == ("op", ","):
            self.take()
            items.append(self.expr())
        if self.peek()[0] != "end":
            raise ParseError(f"unexpected {self.peek()[1]!r}")
        return items[0] if len(items) == 1 else self.node("tuple", *items)

    def expr(self):
        self.enter()
        left = self.term()
        while self.peek() in (("op", "+"), ("op", "-")):
            op = self.take()[1]
            right = self.term()
            left = self.node("add", left, right if op == "+" else self.node("neg", right))
        self.depth -= 1
        return left

    def _starts_primary(self):
        k, v = self.peek()
        return k in ("num", "sym") or (k == "cmd") or (k == "op" and v in "({")

    def term(self):
        left = self.unary()
        while True:
            k, v = self.peek()
            if k == "op" and v in "*/":
                self.take()
                right = self.unary()
                left = self.node("mul" if v == "*" else "div", left, right)
            elif self._starts_primary():   # implicit multiplication: 2x, 2\sqrt{2}, 3(4)
                left = self.node("mul", left, self.power())
            else:
                return left

    def unary(self):
        k, v = self.peek()
        if k == "op" and v in "+-":
            self.take()
            self.enter()
            inner = self.unary()
            self.depth -= 1
            return inner if v == "+" else self.node("neg", inner)
        return self.power()

    def power(self):
        base = self.postfix()
        if self.peek() == ("op", "^"):
            self.take()
            self.enter()
            # right-associative: 9^9^9 = 9^(9^9); x^23 is read as x^(23) (LaTeX would say x^2 3)
            exp = self.group() if self.peek() == ("op", "{") else self.unary()
            self.depth -= 1
            return self.node("pow", base, exp)
        return base

    def postfix(self):
        p = self.primary()
        while self.peek() == ("op", "%"):
            self.take()
            p = self.node("pct", p)
        return p

    def number(self, text):
        return self.node("num", Fraction(text))

    def group(self):
        """A LaTeX argument: {expr}, or a single digit / letter (\\frac12)."""
        k, v = self.peek()
        if (k, v) == ("op", "{"):
            self.take()
            e = self.expr()
            self.take("op", "}")
            return e
        if k == "num":
            self.take()
            if len(v) > 1 and v[1:].isdigit():    # \frac12: first digit only, push back the rest
                self.t.insert(self.i, ("num", v[1:]))
                return self.number(v[0])
            return self.number(v)
        if k == "sym":
            self.take()
            return self.node("sym", v)
        raise ParseError(f"expected a LaTeX argument, got {v or 'end'}")

    def primary(self):
        k, v = self.peek()
        if k == "num":
            self.take()
            return self.number(v)
        if k == "sym":
            self.take()
            return self.node("sym", v)
        if k == "cmd":
            self.take()
            self.enter()
            try:
                if v == "\\pi":
                    return self.node("pi")
                if v == "\\frac":
                    return self.node("div", self.group(), self.group())
                # \sqrt[n]{x}, \sqrt{x}, sqrt(x)
                index = self.node("num", Fraction(2))
                if self.peek() == ("op", "["):
                    self.take()
                    index = self.expr()
                    self.take("op", "]")
                if self.peek() == ("op", "("):
                    self.take()
                    arg = self.expr()
                    self.take("op", ")")
                else:
                    arg = self.group()
                return self.node("root", arg, index)
            finally:
                self.depth -= 1
        if k == "op" and v in "({[":
            close = {"(": ")", "{": "}", "[": "]"}[v]
            self.take()
            self.enter()
            e = self.expr()
            if self.peek() == ("op", ","):          # (1, 2): a tuple in parentheses
                items = [e]
                while self.peek() == ("op", ","):
                    self.take()
                    items.append(self.expr())
                e = self.node("tuple", *items)
            self.take("op", close)
            self.depth -= 1
            return e
        raise ParseError(f"unexpected {v or 'end of answer'}")


def parse(text: str):
    """Normalized answer text -> AST (nested tuples). Raises `ParseError`."""
    tokens = tokenize(text)
    if not tokens:
        raise ParseError("empty answer")
    return _Parser(tokens).parse()


def symbols(node) -> set[str]:
    if node[0] == "sym":
        return {node[1]}
    out: set[str] = set()
    for child in node[1:]:
        if isinstance(child, tuple):
            out |= symbols(child)
    return out


# -- evaluation --------------------------------------------------------------------------------
class TooLarge(ParseError):
    pass


def exact(node):
    """Exact rational value, or None when the value is irrational / symbolic / too large to keep."""
    kind = node[0]
    if kind == "num":
        return node[1]
    if kind in ("sym", "pi", "tuple"):
        return None
    if kind == "neg":
        v = exact(node[1])
        return None if v is None else -v
    if kind == "pct":
        v = exact(node[1])
        return None if v is None else v / 100
    if kind in ("add", "mul", "div"):
        a, b = exact(node[1]), exact(node[2])
        if a is None or b is None:
            return None
        if kind == "add":
            r = a + b
        elif kind == "mul":
            r = a * b
        else:
            if b == 0:
                return None
            r = a / b
        return r if _bits(r) <= MAX_EXACT_BITS else None
    if kind == "pow":
        a, b = exact(node[1]), exact(node[2])
        if a is None or b is None or b.denominator != 1:
            return None
        if a == 0 and b < 0:
            return None
        bits = max(_bits(a), 1) * abs(b.numerator)
        if abs(b.numerator) > 10_000 or bits > MAX_EXACT_BITS:
            return None
        return a ** b.numerator
    if kind == "root":
        a, n = exact(node[1]), exact(node[2])
        if a is None or n is None or n.denominator != 1 or n.numerator < 2 or n.numerator > 64 or a < 0:
            return None
        num, den = _int_root(a.numerator, n.numerator), _int_root(a.denominator, n.numerator)
        return None if num is None or den is None else Fraction(num, den)
    return None


def _bits(r: Fraction) -> int:
    return r.numerator.bit_length() + r.denominator.bit_length()


def _int_root(x: int, n: int) -> int | None:
    if x.bit_length() > MAX_EXACT_BITS:
        return None
    r = round(x ** (1.0 / n)) if x < (1 << 1000) else None
    if r is None:
        return None
    for c in (r - 1, r, r + 1):
        if c >= 0 and c ** n == x:
            return c
    return None


def numeric(node, env: dict[str, complex] | None = None) -> complex:
    """Floating-point value (complex, so roots of negatives do not raise). Raises `TooLarge`."""
    kind = node[0]
    if kind == "num":
        return complex(float(node[1]))
    if kind == "sym":
        if env is None or node[1] not in env:
            raise ParseError(f"free symbol {node[1]}")
        return env[node[1]]
    if kind == "pi":
        return complex(math.pi)
    if kind == "neg":
        return -numeric(node[1], env)
    if kind == "pct":
        return numeric(node[1], env) / 100
    if kind == "add":
        return numeric(node[1], env) + numeric(node[2], env)
    if kind == "mul":
        return _finite(numeric(node[1], env) * numeric(node[2], env))
    if kind == "div":
        b = numeric(node[2], env)
        if b == 0:
            raise ParseError("division by zero")
        return _finite(numeric(node[1], env) / b)
    if kind == "pow":
        a, b = numeric(node[1], env), numeric(node[2], env)
        mag = abs(b) * math.log10(abs(a)) if abs(a) not in (0.0, 1.0) else 0.0
        if abs(b) > 1e6 or mag > 300:
            raise TooLarge("power too large")
        if a == 0:
            return complex(0.0) if b.real > 0 else complex(1.0) if b == 0 else _raise_zero()
        return _finite(a ** b)
    if kind == "root":
        a, n = numeric(node[1], env), numeric(node[2], env)
        if n == 0:
            raise ParseError("zeroth root")
        if a.imag == 0 and a.real < 0 and n.imag == 0 and float(n.real).is_integer() and int(n.real) % 2 == 1:
            return complex(-((-a.real) ** (1.0 / n.real)))   # real odd root of a negative number
        return _finite(a ** (1 / n)) if a != 0 else complex(0.0)
    raise ParseError(f"cannot evaluate {kind}")


def _raise_zero():
    raise ParseError("zero to a negative power")


def _finite(z: complex) -> complex:
    if not (cmath.isfinite(z)):
        raise TooLarge("value overflows")
    return z


def check_size(node) -> None:
    """Evaluate once to reject huge powers (10**10**10, 9^9^9^9) before anything else touches them."""
    syms = symbols(node)
    if len(syms) > MAX_SYMBOLS:
        raise ParseError("too many variables")
    env = {s: complex(1.1 + 0.1 * k) for k, s in enumerate(sorted(syms))}
    items = node[1:] if node[0] == "tuple" else (node,)
    for it in items:
        if isinstance(it, tuple) and it[0] == "tuple":
            raise ParseError("nested tuples are not supported")
        if not syms and exact(it) is not None:
            continue
        try:
            numeric(it, env)
        except TooLarge:
            raise
        except (ParseError, OverflowError, ZeroDivisionError, ValueError):
            pass


def to_sympy(node):
    """Build a sympy expression from the AST node by node (bounded exponents); no string parsing."""
    import sympy

    kind = node[0]
    if kind == "num":
        return sympy.Rational(node[1].numerator, node[1].denominator)
    if kind == "sym":
        return sympy.Symbol(node[1])
    if kind == "pi":
        return sympy.pi
    if kind == "neg":
        return -to_sympy(node[1])
    if kind == "pct":
        return to_sympy(node[1]) / 100
    if kind == "add":
        return to_sympy(node[1]) + to_sympy(node[2])
    if kind == "mul":
        return to_sympy(node[1]) * to_sympy(node[2])
    if kind == "div":
        return to_sympy(node[1]) / to_sympy(node[2])
    if kind == "pow":
        e = exact(node[2])
        if e is None or abs(e) > MAX_SYMBOLIC_EXPONENT or e.denominator > 12:
            raise ParseError("exponent not allowed in a symbolic answer")
        return sympy.Pow(to_sympy(node[1]), sympy.Rational(e.numerator, e.denominator))
    if kind == "root":
        n = exact(node[2])
        if n is None or n.denominator != 1 or not 2 <= n <= MAX_SYMBOLIC_EXPONENT:
            raise ParseError("root index not allowed in a symbolic answer")
        return sympy.Pow(to_sympy(node[1]), sympy.Rational(1, n.numerator))
    raise ParseError(f"cannot convert {kind}")
