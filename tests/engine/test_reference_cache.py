"""The coordinator's bookkeeping of reused reference outputs (reference_cache.py)."""

from __future__ import annotations

import pytest

from chatlearn.engine.reference_cache import ReferenceCache, repeats_samples
from chatlearn.engine.sampler import SampleIndex


def _indices(*rows: int) -> list[SampleIndex]:
    return [SampleIndex(0, row) for row in rows]


def test_split_keeps_chunk_order_and_positions() -> None:
    cache = ReferenceCache(1 << 20)
    assert cache.admit(_indices(1, 3))
    hits, misses = cache.split([10, 11, 12, 13], _indices(0, 1, 2, 3))
    assert hits == [(11, SampleIndex(0, 1)), (13, SampleIndex(0, 3))]
    assert misses == [(10, SampleIndex(0, 0)), (12, SampleIndex(0, 2))]


def test_budget_counts_reported_bytes_and_orders_in_flight() -> None:
    cache = ReferenceCache(900)
    assert cache.admit(_indices(0, 1))  # sample size unknown yet: kept on trust
    cache.reported(2, 400, flagged=True)  # 200 bytes per sample
    assert cache.admit(_indices(2, 3))  # 400 + 2 * 200 = 800 <= 900
    assert not cache.admit(_indices(4))  # 400 + 3 * 200 > 900 (the order in flight counts)
    cache.reported(2, 300, flagged=True)  # smaller than expected: 700 kept
    assert not cache.admit(_indices(4, 5))  # 700 + 2 * 200 > 900
    assert cache.admit(_indices(4))  # 700 + 200 <= 900
    assert cache.cached == set(_indices(0, 1, 2, 3, 4))


def test_unflagged_reports_only_teach_the_sample_size() -> None:
    cache = ReferenceCache(1000)
    cache.reported(4, 2000, flagged=False)  # 500 bytes per sample, nothing kept
    assert cache.cached_bytes == 0
    assert cache.admit(_indices(0, 1))
    assert not cache.admit(_indices(2))


def test_disabled_or_zero_budget_keeps_nothing() -> None:
    assert not ReferenceCache(0).admit(_indices(0))
    assert not ReferenceCache(1 << 20, enabled=False).admit(_indices(0))
    with pytest.raises(ValueError, match=">= 0"):
        ReferenceCache(-1)


def test_already_cached_samples_are_not_admitted_twice() -> None:
    cache = ReferenceCache(1 << 20)
    assert cache.admit(_indices(0))
    assert not cache.admit(_indices(0))


def test_repeats_samples() -> None:
    assert not repeats_samples([100], 100)
    assert repeats_samples([100], 101)
    assert repeats_samples([1000, 10], 11)  # the small dataset cycles first
