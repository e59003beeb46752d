"""Math-Verify (Hugging Face's verifier) as the ``math`` reward's slow path, under a CPU-time limit.

Only its LaTeX path is used: `math_verify.parse` with `LatexExtractionConfig` (an ANTLR grammar that
builds sympy objects) and `math_verify.verify`. Its ``ExprExtractionConfig`` is never used: that
path runs ``sympy.parse_expr``, which evaluates Python code. Answers reach it only after `gate`
(bounded length, a character whitelist, no quotes, no ``__``), wrapped as ``\\boxed{answer}``.

Math-Verify's own timeouts use ``signal.alarm``, which would cancel the reward pool's per-call
timer, so they are off (``parsing_timeout=None``, ``timeout_seconds=None``) and `cpu_limit` bounds
each call instead: an ``ITIMER_PROF`` timer (CPU seconds of this process, a separate timer from the
pool's ``ITIMER_REAL``) raising `VerifierTimeout`. Signals only reach the main thread: elsewhere
the call runs without this limit (a warning says so once) and only the pool's limit applies.
"""

from __future__ import annotations

import functools
import logging
import re
import signal
import threading

log = logging.getLogger("rewards.math")

MAX_ANSWER_CHARS = 300
_ALLOWED = re.compile(r"[0-9A-Za-z\\{}()\[\]^_+\-*/.,;:=<>|!&%$~ \t\n]*")
_warned_thread = False


class VerifierTimeout(BaseException):
    """A Math-Verify call ran past its CPU budget (BaseException: Math-Verify's ``except
    Exception`` blocks do not swallow it)."""


class MathVerifyMissing(ImportError):
    pass


def load():
    """Import Math-Verify once; a clear error when it is not installed."""
    try:
        import math_verify  # noqa: F401
        from math_verify import LatexExtractionConfig, parse, verify  # noqa: F401
    except ImportError as e:
        raise MathVerifyMissing(
            "the math reward needs Math-Verify: pip install 'math-verify[antlr4_13_2]' (it is a core "
            "dependency: `make install` installs it); or pass verifier='builtin'") from e
    logging.getLogger("math_verify").setLevel(logging.ERROR)   # its "timeout disabled" notice
    return math_verify


def gate(answer: str) -> str | None:
    """Why `answer` may not be handed to Math-Verify (None: it may)."""
    if len(answer) > MAX_ANSWER_CHARS:
        return f"longer than {MAX_ANSWER_CHARS} characters"
    if "__" in answer:
        return "contains '__'"
    if not _ALLOWED.fullmatch(answer):
        bad = next(c for c in answer if not _ALLOWED.fullmatch(c))
        return f"character {bad!r} outside the LaTeX whitelist"
    return None


class cpu_limit:
    """``with cpu_limit(0.8):`` raises `VerifierTimeout` after 0.8 s of CPU time (main thread only)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.enabled = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()

    def __enter__(self):
        global _warned_thread
        if not self.enabled:
            if not _warned_thread:
                log.warning("math reward: not on the main thread, so Math-Verify calls have no CPU limit "
                            "of their own (the reward pool's timeout still applies)")
                _warned_thread = True
            return self
        self._old = signal.signal(signal.SIGPROF, _on_prof)
        signal.setitimer(signal.ITIMER_PROF, self.seconds)
        return self

    def __exit__(self, *exc):
        if self.enabled:
            signal.setitimer(signal.ITIMER_PROF, 0)
            signal.signal(signal.SIGPROF, self._old)
        return False


def _on_prof(signum, frame):
    raise VerifierTimeout()


@functools.lru_cache(maxsize=4096)
def _parse(answer: str):
    from math_verify import LatexExtractionConfig, parse

    return tuple(parse("\\boxed{" + answer + "}", [LatexExtractionConfig(boxed_match_priority=0)],
                       fallback_mode="first_match", parsing_timeout=None))


def equal(pred: str, gold: str, budget_s: float = 0.8) -> tuple[bool | None, str]:
    """(Math-Verify's verdict, note). None when it was not asked (gate), failed or ran out of time."""
    for side, s in (("answer", pred), ("reference", gold)):
        why = gate(s)
        if why:
            return None, f"Math-Verify not asked: the {side} {why}"
    from math_verify import verify

    try:
        with cpu_limit(budget_s):
            g, p = _parse(gold), _parse(pred)
            if not g or not p:
                return None, "Math-Verify could not read " + ("the reference" if not g else "the answer")
            ok = verify(list(g), list(p), timeout_seconds=None)
    except VerifierTimeout:
        return None, f"Math-Verify ran past {budget_s} s of CPU"
    except (RecursionError, MemoryError, ValueError, TypeError) as e:
        return None, f"Math-Verify failed ({type(e).__name__})"
    return bool(ok), f"Math-Verify: {'equal' if ok else 'not equal'} ({_show(p)} vs {_show(g)})"


def _show(parsed) -> str:
    return str(parsed[0])[:60] if parsed else "?"
