"""How an episode's reference work is cut into chunks and paced against training.

Runs in the coordinator (for ``pipeline.py``).

An episode's samples are split into one contiguous share per reference replica (ChatLearn's rule,
``Episode.shares``); each share is cut into ``generation_batch_size`` chunks, one ``forward_step``
call each. :class:`EpisodeLayout` gives every chunk its *buffer positions*: the place of its
samples in the episode buffer that the training plan (``training_plan.py``) indexes.

With one replica the buffer order is the episode order, as in ChatLearn. With ``R`` replicas the
chunks are interleaved round-robin (replica 0's first chunk, replica 1's first chunk, ..., then
every replica's second chunk, ...). ChatLearn fills its buffer in arrival order; a fixed
interleaving keeps runs reproducible and lets every replica feed the first training steps at
once. Concatenating the shares instead would leave replica 1's output unused until the trainer
had consumed all of replica 0's, so overlapping it with training would need a whole-episode
window.

:class:`CreditWindow` bounds how far the reference may run ahead of training: the chunk ending at
global position ``p`` (``episode_id * sample_per_episode + position``) may start once
``p < released + size``, where ``released`` advances as training steps complete. That bounds the
reference outputs held beyond the current episode's buffer, whatever the dataset size.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from chatlearn.engine.batching import chunk_sizes
from chatlearn.engine.sampler import Episode, SampleIndex


@dataclass(frozen=True, slots=True)
class ChunkOrder:
    """One ``forward_step`` call of one reference replica."""

    episode_id: int
    replica_id: int
    chunk_id: int
    positions: tuple[int, ...]
    indices: tuple[SampleIndex, ...]


class EpisodeLayout:
    """The chunks of an episode, per replica, with their buffer positions."""

    def __init__(self, episode: Episode, num_replicas: int, generation_batch_size: int | None):
        self.episode_id = episode.episode_id
        self.num_samples = len(episode.indices)
        shares = episode.shares(num_replicas)
        pieces: list[list[tuple[SampleIndex, ...]]] = []
        for share in shares:
            sizes = chunk_sizes(len(share.indices), generation_batch_size)
            start, share_pieces = 0, []
            for size in sizes:
                share_pieces.append(tuple(share.indices[start : start + size]))
                start += size
            pieces.append(share_pieces)
        self.chunks: list[list[ChunkOrder]] = [[] for _ in shares]
        position = 0
        for chunk_id in range(max((len(p) for p in pieces), default=0)):
            for replica_id, share_pieces in enumerate(pieces):
                if chunk_id >= len(share_pieces):
                    continue
                indices = share_pieces[chunk_id]
                positions = tuple(range(position, position + len(indices)))
                position += len(indices)
                self.chunks[replica_id].append(
                    ChunkOrder(
                        episode_id=self.episode_id,
                        replica_id=replica_id,
                        chunk_id=chunk_id,
                        positions=positions,
                        indices=indices,
                    )
                )
        assert position == self.num_samples


class CreditWindow:
    """Lets reference work through global position ``p`` start once ``p < released + size``.

    ``size=None`` disables the bound. Waiters leave only by being allowed or by their task's
    cancellation, which the pipeline's shutdown (close → cancel → gather) provides.
    """

    def __init__(self, size: int | None) -> None:
        if size is not None and size <= 0:
            raise ValueError(f"the credit window must be positive, got {size}")
        self.size = size
        self.released = 0
        self._changed = asyncio.Condition()

    def allows(self, last_position: int) -> bool:
        return self.size is None or last_position < self.released + self.size

    async def acquire(self, last_position: int) -> None:
        """Wait until work ending at global position ``last_position`` may start."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.allows(last_position))

    async def release_through(self, position: int) -> None:
        """Training no longer holds back positions up to ``position`` (exclusive)."""
        async with self._changed:
            if position > self.released:
                self.released = position
                self._changed.notify_all()


class GroupSizer:
    """How many ready items (reference chunks, training steps) one order carries.

    Every order costs a fixed few hundred microseconds of messaging and task switching on each
    side. Items that take far longer than that (real models) go one per order, as before; cheap
    ones are grouped until a group holds about ``budget`` seconds of work by the running
    estimate of an item's compute time, at most ``most`` items. Grouping moves only message
    boundaries: every item is still its own ``forward_step`` or ``train_step``, in order.
    """

    def __init__(self, budget: float = 0.005, most: int = 64) -> None:
        if budget <= 0 or most < 1:
            raise ValueError(f"a group needs a positive budget and size, got {budget}, {most}")
        self.budget = budget
        self.most = most
        self.seconds_per_item: float | None = None  # unknown until the first report

    def observe(self, seconds: float, num_items: int) -> None:
        """A report: ``num_items`` items took ``seconds`` of compute."""
        if num_items <= 0:
            return
        cost = max(seconds, 0.0) / num_items
        previous = self.seconds_per_item
        self.seconds_per_item = cost if previous is None else 0.8 * previous + 0.2 * cost

    def size(self) -> int:
        cost = self.seconds_per_item
        if cost is None:
            return 1  # unknown cost: assume an expensive item
        return max(1, min(self.most, int(self.budget / max(cost, 1e-7))))
