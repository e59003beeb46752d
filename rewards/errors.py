"""Errors raised by the rewards package (standalone: no imports from the rest of the project)."""

from __future__ import annotations


class RewardError(Exception):
    """Base class; the message is meant for the user who wrote the reward spec or data."""


class RewardSpecError(RewardError):
    """A reward spec cannot be loaded: missing file or function, wrong signature, bad option."""


class RewardDataError(RewardError):
    """Input data for reward scoring is malformed (broken JSONL line, mismatched lengths)."""


class RewardPoolError(RewardError):
    """The worker pool cannot run at all (workers fail to start or to load the functions)."""
