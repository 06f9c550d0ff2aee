"""The episode training plan: which buffer positions every optimizer step trains on, per rank.

Runs in the coordinator; a trainer rank receives its micro-batches as buffer positions
(``protocol.Step``).

After (or, with the pipeline, while) the reference fills an episode's buffer of ``num_samples``
per-sample outputs (positions ``0..num_samples-1``), the trainer runs ``num_training_epoch``
passes over it. :func:`plan_episode` says, for every optimizer step, the micro-batches each
data-parallel rank trains on, each a tuple of buffer positions. Trainer ranks build those
micro-batches from their local buffer (``batching.gather_micro_batch``) and call ``train_step``
with the list.

The rules are ChatLearn's (``StreamDataset.iter_fixed`` / ``_get_batch`` and
``EpisodeRelayBuffer.shuffle`` / ``batch_shuffle`` in ``chatlearn/data/data.py``,
``Trainer.train`` / ``next_batch`` in ``chatlearn/runtime/trainer.py``, the executor's
queue-to-dp-rank order in ``chatlearn/runtime/executor.py``):

* A pass is a stream of ``ceil(num_samples / micro)`` micro-batches taken in buffer order. A short
  last micro-batch is filled by wrapping to the start of the (current) buffer order.
* Steps per pass: ``ceil(num_samples / global)``. Each step gives every rank
  ``global // micro // dp`` consecutive micro-batches of the stream: rank 0 first, then rank 1, ...
  If the stream runs out, a rank's list is padded by repeating its own first micro-batches.
* Passes after the first reorder the previous pass's order first: mode ``"batch"`` cuts it into
  micro-batch-sized blocks, drops the incomplete remainder and shuffles the blocks; mode
  ``"sample"`` shuffles the samples. The stream still has ``ceil(num_samples / micro)``
  micro-batches, so after a batch shuffle that dropped a remainder, the last one is the first
  block again (the wrap fill on a shorter buffer).

Deliberate deviations: ChatLearn shuffles with Python's unseeded global ``random``; here the
shuffle of (episode, epoch) is seeded from ``seed`` so runs and resumes repeat exactly. In
ChatLearn a batch shuffle that drops a remainder makes the next pass crash (its stream asks an
empty queue for the missing samples); here the wrap fill covers it. ChatLearn pads a short rank
list with ``own[:k - len(own)]``, which stays short when fewer than half arrived; here the padding
cycles until the list is full. A rank that gets no micro-batch at all (ChatLearn hands it
``None``) gets the first micro-batches of the pass, so every rank always trains on a full list.

Pipelining: only the first pass depends on arrival order. ``TrainStep.required_positions`` is the
set a step needs; ``TrainStep.max_required_position`` is the largest position any step up to and
including it needs, so a step of the first pass can start once positions ``0..that`` arrived.
Because the wrap fill takes positions from the start of the buffer, the last step of the first
pass needs no later positions than the rest of its stream. Later passes need the whole buffer.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Literal

from chatlearn.engine.counters import check_batch_sizes, num_steps_per_epoch

ShuffleMode = Literal["batch", "sample"]

MicroBatch = tuple[int, ...]


@dataclass(frozen=True, slots=True)
class TrainStep:
    """One optimizer step: ``micro_batches[rank]`` is the rank's list of micro-batches."""

    episode_id: int
    epoch: int
    step_in_epoch: int
    step_in_episode: int
    micro_batches: tuple[tuple[MicroBatch, ...], ...]
    required_positions: tuple[int, ...]
    max_required_position: int

    def for_rank(self, rank: int) -> tuple[MicroBatch, ...]:
        return self.micro_batches[rank]

    def positions_for_rank(self, rank: int) -> tuple[int, ...]:
        """Sorted distinct positions rank ``rank`` needs for this step."""
        return tuple(sorted({p for mb in self.micro_batches[rank] for p in mb}))

    def global_batch(self) -> tuple[int, ...]:
        """All positions of the step in rank order (rank 0's micro-batches first)."""
        return tuple(p for rank in self.micro_batches for mb in rank for p in mb)


@dataclass(frozen=True, slots=True)
class EpisodePlan:
    """Every optimizer step of one episode, epoch by epoch."""

    episode_id: int
    num_samples: int
    micro_batch_size: int
    global_batch_size: int
    data_parallel_size: int
    num_epochs: int
    shuffle_mode: ShuffleMode
    steps_per_epoch: int
    steps: tuple[TrainStep, ...]

    @property
    def num_micro_batches_per_rank(self) -> int:
        return self.global_batch_size // self.micro_batch_size // self.data_parallel_size

    def epoch_steps(self, epoch: int) -> tuple[TrainStep, ...]:
        start = epoch * self.steps_per_epoch
        return self.steps[start : start + self.steps_per_epoch]


def shuffle_seed(seed: int, episode_id: int, epoch: int) -> int:
    """A stable 64-bit seed for the shuffle of (episode, epoch); same on every host and run."""
    digest = hashlib.blake2b(
        f"chatlearn-train-shuffle/{seed}/{episode_id}/{epoch}".encode(), digest_size=8
    ).digest()
    return int.from_bytes(digest, "little")


def reorder(order: list[int], micro: int, mode: ShuffleMode, rng: random.Random) -> list[int]:
    """The buffer order of the next pass (ChatLearn's ``batch_shuffle`` / sample shuffle)."""
    if mode == "sample":
        shuffled = list(order)
        rng.shuffle(shuffled)
        return shuffled
    blocks = [order[i * micro : (i + 1) * micro] for i in range(len(order) // micro)]
    if not blocks:
        # fewer samples than one micro-batch: dropping the only (partial) block would leave an
        # empty buffer (ChatLearn then crashes); keep it as it is
        return list(order)
    rng.shuffle(blocks)
    return [p for block in blocks for p in block]


def micro_batch_stream(order: list[int], num_samples: int, micro: int) -> list[MicroBatch]:
    """``ceil(num_samples / micro)`` micro-batches over ``order``, the short last one wrapped."""
    stream: list[MicroBatch] = []
    for start in range(0, num_samples, micro):
        mb = order[start : start + micro]
        # wrap to the start of the buffer; cyclic so that micro > len(order) still fills up
        i = 0
        while len(mb) < micro:
            mb.append(order[i % len(order)])
            i += 1
        stream.append(tuple(mb))
    return stream


def _assign_steps(
    stream: list[MicroBatch], num_steps: int, dp: int, per_rank: int
) -> list[tuple[tuple[MicroBatch, ...], ...]]:
    """Per step, per rank: ``per_rank`` consecutive micro-batches of the stream, padded."""
    steps: list[tuple[tuple[MicroBatch, ...], ...]] = []
    cursor = 0
    for _ in range(num_steps):
        ranks: list[tuple[MicroBatch, ...]] = []
        for _rank in range(dp):
            own = stream[cursor : cursor + per_rank]
            cursor += per_rank
            if not own:
                own = [stream[i % len(stream)] for i in range(per_rank)]
            else:
                own = [own[i % len(own)] for i in range(per_rank)]
            ranks.append(tuple(own))
        steps.append(tuple(ranks))
    return steps


def plan_episode(
    num_samples: int,
    *,
    train_micro_batch_size: int,
    train_global_batch_size: int,
    data_parallel_size: int = 1,
    num_training_epoch: int = 1,
    training_shuffle_mode: ShuffleMode = "batch",
    seed: int = 0,
    episode_id: int = 0,
) -> EpisodePlan:
    """The optimizer steps of one episode whose buffer holds ``num_samples`` samples.

    Exactly ``num_training_epoch * ceil(num_samples / train_global_batch_size)`` steps.
    """
    if num_samples < 1:
        raise ValueError(f"an episode needs at least one sample, got {num_samples}")
    check_batch_sizes(train_micro_batch_size, train_global_batch_size, data_parallel_size)
    if num_training_epoch < 1:
        raise ValueError(f"runtime.num_training_epoch must be >= 1, got {num_training_epoch}")
    if training_shuffle_mode not in ("batch", "sample"):
        raise ValueError(
            f"runtime.training_shuffle_mode must be 'batch' or 'sample', "
            f"got {training_shuffle_mode!r}"
        )
    micro, dp = train_micro_batch_size, data_parallel_size
    per_rank = train_global_batch_size // micro // dp
    steps_per_epoch = num_steps_per_epoch(num_samples, train_global_batch_size)

    steps: list[TrainStep] = []
    order = list(range(num_samples))
    max_so_far = -1
    for epoch in range(num_training_epoch):
        if epoch > 0:
            rng = random.Random(shuffle_seed(seed, episode_id, epoch))
            order = reorder(order, micro, training_shuffle_mode, rng)
        stream = micro_batch_stream(order, num_samples, micro)
        for index, ranks in enumerate(_assign_steps(stream, steps_per_epoch, dp, per_rank)):
            required = tuple(sorted({p for rank in ranks for mb in rank for p in mb}))
            max_so_far = max(max_so_far, required[-1])
            steps.append(
                TrainStep(
                    episode_id=episode_id,
                    epoch=epoch,
                    step_in_epoch=index,
                    step_in_episode=len(steps),
                    micro_batches=ranks,
                    required_positions=required,
                    max_required_position=max_so_far,
                )
            )
    return EpisodePlan(
        episode_id=episode_id,
        num_samples=num_samples,
        micro_batch_size=micro,
        global_batch_size=train_global_batch_size,
        data_parallel_size=dp,
        num_epochs=num_training_epoch,
        shuffle_mode=training_shuffle_mode,
        steps_per_epoch=steps_per_epoch,
        steps=tuple(steps),
    )
