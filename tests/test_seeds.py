"""model.seeds: each named seed / split function returns exactly what its inline formula gave, so that
runs with the same seeds replay the same data order, task splits and tokens."""

import itertools
import zlib

import pytest

from model import seeds

SEEDS = [0, 1, 7, 42, 1234, 2**31 - 1, 2**40 + 3]
INDICES = [0, 1, 2, 17, 999, 123_456, 2**33]


@pytest.mark.parametrize("seed,index", itertools.product(SEEDS, INDICES))
def test_seed_functions_equal_their_formulas(seed, index):
    assert seeds.job_seed(seed, index) == (seed * 1_000_003 + index * 7919) % (1 << 62)
    assert seeds.job_seed(seed, index, 1) == (seed * 1_000_003 + index * 7919 + 104_729) % (1 << 62)
    assert seeds.index_seed(seed, index) == seed * 1_000_003 + index
    assert seeds.epoch_seed(seed, index) == (seed * 1_000_003 + index * 7919) % (2**63 - 1)
    assert seeds.record_seed(seed, 3, index) == seed * 1_000_003 + 3 * 100_003 + index
    assert seeds.source_seed(seed, index) == seed + 17 * index


def test_pinned_values():
    """Literal values: a change to a formula fails here even if the test's formulas were edited with it."""
    assert [seeds.sample_seed(0, 0), seeds.sample_seed(7, 3), seeds.sample_seed(2**62, 2**40)] == [
        7905728728188956330, 9070220471979545070, 5294062537226461700]
    assert seeds.job_seed(3, 5, 1) == 3_000_009 + 39_595 + 104_729
    assert seeds.epoch_seed(2, 4) == 2_000_006 + 31_676
    assert seeds.record_seed(1, 2, 3) == 1_000_003 + 200_006 + 3


def test_sample_seed_is_splitmix64_of_the_pair():
    m = (1 << 64) - 1
    for seed, i in itertools.product(SEEDS, INDICES):
        x = (seed * 0x9E3779B97F4A7C15 + i + 0x632BE59BD9B4E019) & m
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
        assert seeds.sample_seed(seed, i) == (x ^ (x >> 31)) & ((1 << 63) - 1)
    assert len({seeds.sample_seed(7, i) for i in range(100)} | {seeds.sample_seed(8, i) for i in range(100)}) == 200


@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.2, 0.5])
def test_split_hashes_equal_their_formulas(fraction):
    for a, b in itertools.product(range(0, 300, 7), range(1, 400, 11)):
        for op in "+-*":
            assert seeds.sum_held_out(a, b, op, fraction) == (
                (a * 1_000_003 + b * 7919 + ord(op) * 31 + 12345) % 1000 < int(fraction * 1000))
            text = f"{a}{op}{b}"
            assert seeds.text_held_out(text, fraction) == (
                zlib.crc32(text.encode()) % 10_000 < int(fraction * 10_000))
        assert seeds.product_held_out(a, b, fraction) == ((a * 7919 + b * 104729) % 1000 < int(fraction * 1000))


def test_split_fractions_are_roughly_kept():
    n = 20_000
    got = sum(seeds.text_held_out(f"q{i}", 0.1) for i in range(n)) / n
    assert 0.08 < got < 0.12
    got = sum(seeds.product_held_out(10_000 + i, 20_000 + 3 * i, 0.2) for i in range(n)) / n
    assert 0.15 < got < 0.25
