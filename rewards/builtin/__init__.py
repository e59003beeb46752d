"""Built-in reward functions, by the name used in specs (``load_reward("math", **options)``).

Each entry is a factory: options in, a per-sample ``fn(prompt, completion, **fields)`` out.
"""

from __future__ import annotations

from rewards.builtin.format import FormatReward
from rewards.builtin.length import LengthReward, OverlongReward
from rewards.builtin.math_answer import MathReward
from rewards.builtin.structured import JsonReward, ToolCallReward

BUILTINS = {
    "math": MathReward,
    "format": FormatReward,
    "json": JsonReward,
    "tool_call": ToolCallReward,
    "overlong": OverlongReward,
    "length": LengthReward,
}

__all__ = ["BUILTINS", "FormatReward", "JsonReward", "LengthReward", "MathReward", "OverlongReward",
           "ToolCallReward"]
