"""Reuse of reference outputs when the same samples come back (later data epochs).

Runs in the coordinator; the trainer ranks' side is in ``worker_services.py``.

The reference model is frozen and a sample's reference output depends only on the sample, so
once computed it never changes. When a run draws more samples than its dataset holds, the same
samples come back in later episodes; recomputing their reference forward would cost as much as
the first time. Instead, trainer ranks keep the outputs (their inbox already holds them, one
per-sample dict each) in a cache keyed by ``SampleIndex``, and the coordinator sends those
positions to the trainers as a *fill* order (copy from the cache into the episode buffer)
instead of a ``forward_step`` chunk.

The coordinator decides what is cached, so it knows without asking what every trainer rank
holds: a forward order is *flagged* (its outputs are to be kept) while the bytes of the flagged
outputs fit ``runtime.max_reference_cache_mb``. The budget is checked against the bytes the
reference reports per order; until the first report arrives the sample size is unknown, so at
most the orders in flight then (two per replica) are flagged on trust. Nothing is ever evicted:
a cache that fills up keeps serving what it has, and the rest is recomputed.

``ReferenceCache`` is the coordinator's side (the bookkeeping); ``TrainerService`` in
``worker_services.py`` holds the data.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from chatlearn.engine.sampler import SampleIndex

MIB = 1024 * 1024


class ReferenceCache:
    """What the trainer ranks hold, and whether a new forward order may add to it."""

    def __init__(self, budget_bytes: int, *, enabled: bool = True) -> None:
        if budget_bytes < 0:
            raise ValueError(f"the reference cache budget must be >= 0, got {budget_bytes}")
        self.enabled = enabled and budget_bytes > 0
        self.budget_bytes = budget_bytes
        self.cached: set[SampleIndex] = set()  # flagged: held (or on their way) at the trainers
        self.cached_bytes = 0  # reported bytes of flagged orders that finished
        self.bytes_per_sample = 0.0  # the largest seen, for orders still in flight
        self._inflight_samples = 0  # samples of flagged orders not reported yet
        self.reused = 0  # samples served from the cache (filled instead of computed)

    def split(
        self, positions: Sequence[int], indices: Sequence[SampleIndex]
    ) -> tuple[list[tuple[int, SampleIndex]], list[tuple[int, SampleIndex]]]:
        """(cached, to compute) pairs of (position, index) of one chunk, in chunk order."""
        hits: list[tuple[int, SampleIndex]] = []
        misses: list[tuple[int, SampleIndex]] = []
        for pair in zip(positions, indices, strict=True):
            (hits if pair[1] in self.cached else misses).append(pair)
        return hits, misses

    def admit(self, indices: Iterable[SampleIndex]) -> bool:
        """Whether a forward order over ``indices`` is flagged; if so they count as cached."""
        if not self.enabled:
            return False
        new = [index for index in indices if index not in self.cached]
        if not new:
            return False
        expected = (self._inflight_samples + len(new)) * self.bytes_per_sample
        if self.cached_bytes + expected > self.budget_bytes:
            return False
        self.cached.update(new)
        self._inflight_samples += len(new)
        return True

    def reported(self, num_samples: int, nbytes: int, *, flagged: bool) -> None:
        """A forward order finished: its output was ``nbytes`` for ``num_samples`` samples."""
        if num_samples > 0:
            self.bytes_per_sample = max(self.bytes_per_sample, nbytes / num_samples)
        if flagged:
            self._inflight_samples -= num_samples
            self.cached_bytes += nbytes


def repeats_samples(dataset_sizes: Sequence[int], samples_to_draw: int) -> bool:
    """Whether drawing ``samples_to_draw`` samples must revisit some sample."""
    return samples_to_draw > min(dataset_sizes, default=0)
