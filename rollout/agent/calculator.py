"""Built-in tool `calculator`: exact arithmetic on big integers and decimals.

A tokenizer and a recursive-descent parser over exact `Fraction`s (no eval), with bounded expression
length, operand/result digits and exponent. Its grammar is arithmetic as Python writes it (`//`,
`%` as modulo, `**`, `_` in numbers) with unbounded exact results up to its digit limit;
`rewards.builtin.mathparse` reads final answers (LaTeX, variables, `%` as percent, roots, floats
where irrational) under much smaller limits, so the two parsers stay apart.
"""

from __future__ import annotations

from fractions import Fraction


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
