from __future__ import annotations

import asyncio

import pytest

from chatlearn.engine.sampler import EpisodeSampler
from chatlearn.engine.schedule import CreditWindow, EpisodeLayout


def _rows(chunk) -> list[int]:
    return [index.row for index in chunk.indices]


def test_one_replica_keeps_episode_order() -> None:
    episode = EpisodeSampler(35, 16, shuffle=False).next_episode()
    layout = EpisodeLayout(episode, num_replicas=1, generation_batch_size=5)
    chunks = layout.chunks[0]
    assert [len(c.positions) for c in chunks] == [5, 5, 5, 1]
    assert [p for c in chunks for p in c.positions] == list(range(16))
    assert [r for c in chunks for r in _rows(c)] == list(range(16))


def test_two_replicas_interleave_chunks_round_robin() -> None:
    episode = EpisodeSampler(35, 16, shuffle=False).next_episode()
    layout = EpisodeLayout(episode, num_replicas=2, generation_batch_size=3)
    # ChatLearn's shares: replica 0 rows 0..7, replica 1 rows 8..15, chunks of 3, 3, 2
    assert [_rows(c) for c in layout.chunks[0]] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert [_rows(c) for c in layout.chunks[1]] == [[8, 9, 10], [11, 12, 13], [14, 15]]
    # in buffer order the replicas take turns: chunk i of replica 0, then of replica 1
    order = sorted((c for chunks in layout.chunks for c in chunks), key=lambda c: c.positions[0])
    assert [(c.replica_id, c.chunk_id) for c in order] == [
        (0, 0),
        (1, 0),
        (0, 1),
        (1, 1),
        (0, 2),
        (1, 2),
    ]
    assert [p for c in order for p in c.positions] == list(range(16))


def test_no_split_gives_one_chunk_per_replica() -> None:
    episode = EpisodeSampler(10, 8, shuffle=False).next_episode()
    layout = EpisodeLayout(episode, num_replicas=2, generation_batch_size=0)
    assert [len(c) for c in layout.chunks] == [1, 1]
    assert layout.chunks[1][0].positions == (4, 5, 6, 7)


async def test_credit_window_blocks_until_released() -> None:
    window = CreditWindow(4)
    await asyncio.wait_for(window.acquire(3), 1)
    waiter = asyncio.create_task(window.acquire(5))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    await window.release_through(1)
    await asyncio.sleep(0.01)
    assert not waiter.done()
    await window.release_through(2)
    await asyncio.wait_for(waiter, 1)
    with pytest.raises(ValueError):
        CreditWindow(0)
