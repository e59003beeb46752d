"""Built-ins ``overlong`` (DAPO overlong shaping) and ``length`` (soft length penalty).

Length unit (``unit``): ``"auto"`` (default) uses the row's ``completion_tokens`` or ``num_tokens``
field when present (an int, or a list of token ids whose length is taken) and otherwise counts
whitespace-separated words; ``"tokens"`` requires one of those fields (error if missing);
``"words"`` and ``"chars"`` always count the text. The GRPO driver passes ``completion_tokens``.
"""

from __future__ import annotations

TOKEN_FIELDS = ("completion_tokens", "num_tokens")
UNITS = ("auto", "tokens", "words", "chars")


def completion_length(completion: str, fields: dict, unit: str = "auto") -> int:
    if unit in ("auto", "tokens"):
        for key in TOKEN_FIELDS:
            v = fields.get(key)
            if v is not None:
                return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else len(v)
        if unit == "tokens":
            raise KeyError(f"unit='tokens' needs a {' or '.join(TOKEN_FIELDS)} field in the row")
    if unit == "chars":
        return len(completion)
    return len(completion.split())


def _check_unit(unit: str) -> None:
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {', '.join(UNITS)}, got {unit!r}")


class OverlongReward:
    """DAPO soft overlong punishment: 0 up to ``max_len - buffer``, then linear down to
    ``-penalty`` at ``max_len``, and ``-penalty`` beyond."""

    def __init__(self, max_len: int, buffer: int, penalty: float = 1.0, unit: str = "auto"):
        _check_unit(unit)
        if not 0 < buffer <= max_len:
            raise ValueError(f"need 0 < buffer <= max_len, got buffer={buffer}, max_len={max_len}")
        self.max_len, self.buffer, self.penalty, self.unit = max_len, buffer, penalty, unit

    def __call__(self, prompt: str, completion: str, **fields) -> float:
        n = completion_length(completion, fields, self.unit)
        start = self.max_len - self.buffer
        if n <= start:
            return 0.0
        if n >= self.max_len:
            return -self.penalty
        return -self.penalty * (n - start) / self.buffer


class LengthReward:
    """Soft length penalty: 0 up to ``target``, then ``-coef * (n - target) / scale`` (``scale``
    defaults to ``target``), floored at ``-max_penalty``."""

    def __init__(self, target: int, coef: float = 1.0, scale: int | None = None,
                 max_penalty: float = 1.0, unit: str = "auto"):
        _check_unit(unit)
        if target <= 0:
            raise ValueError(f"target must be > 0, got {target}")
        self.target, self.coef, self.scale = target, coef, scale or target
        self.max_penalty, self.unit = max_penalty, unit

    def __call__(self, prompt: str, completion: str, **fields) -> float:
        n = completion_length(completion, fields, self.unit)
        over = max(0, n - self.target)
        return max(-self.max_penalty, -self.coef * over / self.scale)
