"""Seed mixing: every seed derived from a run seed and counters, and every hash that splits a synthetic
task into train and eval, as one named function (pure integer arithmetic; no torch).

Runs replay only if these stay bit-identical: a change to any formula changes sampled tokens, data
order and task splits of every run, so tests/test_seeds.py pins their values.

Seeds:
    sample_seed(seed, i)            sample i of a request seeded `seed` (splitmix64; 63 bits)
    job_seed(seed, index, salt)     request seed of GRPO prompt `index` (salt: 0 train, 1 eval)
    index_seed(seed, i)             request seed of eval row i; generator of pretraining row i
    epoch_seed(seed, epoch)         permutation of one data epoch
    record_seed(seed, epoch, i)     per-record draw of SFT record i of an epoch
    source_seed(seed, k)            seed of the k-th data source of a mixture
Train / eval splits (True: the item is in the eval split):
    text_held_out(text, fraction)              crc32 of the item's text
    sum_held_out(a, b, op, fraction)           arithmetic task's (a, op, b)
    product_held_out(a, b, fraction)           bigmul task's (a, b)
"""

from __future__ import annotations

import zlib

_MASK64 = (1 << 64) - 1


def sample_seed(seed: int, sample_index: int) -> int:
    """Seed of sample `sample_index` of a request seeded `seed` (splitmix64 of the pair; 63 bits)."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(sample_index) + 0x632BE59BD9B4E019) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) & ((1 << 63) - 1)


def job_seed(seed: int, index: int, salt: int = 0) -> int:
    """Request seed of prompt `index` of a GRPO run seeded `seed`; `salt` separates streams (eval: 1)."""
    return (seed * 1_000_003 + index * 7919 + salt * 104_729) % (1 << 62)


def index_seed(seed: int, index: int) -> int:
    """Seed of item `index` of a stream seeded `seed` (eval row requests, pretraining row draws)."""
    return seed * 1_000_003 + index


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of one epoch's record permutation (below 2**63 - 1)."""
    return (seed * 1_000_003 + epoch * 7919) % (2**63 - 1)


def record_seed(seed: int, epoch: int, index: int) -> int:
    """Seed of the per-record draw for record `index` of epoch `epoch`."""
    return seed * 1_000_003 + epoch * 100_003 + index


def source_seed(seed: int, k: int) -> int:
    """Seed of the k-th source (0-based) of a data mixture seeded `seed`."""
    return seed + 17 * k


def text_held_out(text: str, fraction: float) -> bool:
    """Whether an item whose identity is `text` is in the eval split (crc32; independent of any seed)."""
    return zlib.crc32(text.encode()) % 10_000 < int(fraction * 10_000)


def sum_held_out(a: int, b: int, op: str, fraction: float) -> bool:
    """Whether arithmetic problem `a op b` is in the eval split (independent of any seed)."""
    return (a * 1_000_003 + b * 7919 + ord(op) * 31 + 12345) % 1000 < int(fraction * 1000)


def product_held_out(a: int, b: int, fraction: float) -> bool:
    """Whether product `a*b` is in the eval split (independent of any seed)."""
    return (a * 7919 + b * 104729) % 1000 < int(fraction * 1000)
