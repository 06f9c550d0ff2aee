"""ChatLearn's counters as plain formulas, for progress, logs and resume.

Runs in the coordinator (``training_plan.py``, ``run_checkpoints.py``).

* ``consumed_samples`` grows by ``sample_per_episode`` per episode (ChatLearn adds it after the
  last forward batch of each episode, ``chatlearn/runtime/decorator.py``); it is the sampler's
  whole state.
* ``trainer.iteration`` counts optimizer steps: ``ceil(sample_per_episode / global)`` per training
  epoch (``Trainer.num_iteration`` in ``chatlearn/runtime/trainer.py``), so after ``E`` episodes
  ``E * num_training_epoch * ceil(sample_per_episode / train_global_batch_size)``. A module's
  ``_train_iteration`` (``train_step`` calls on one rank) is the same number.
* A reference replica's ``_iteration`` counts ``forward_step`` calls: one per
  ``generation_batch_size`` chunk of its share; on resume ChatLearn sets it to
  ``start_episode * ceil(sample_per_episode / num_replica / generation_batch_size)``
  (``BaseModule.model_setup``), which :func:`reference_iteration` reproduces.
"""

from __future__ import annotations

import math


def check_batch_sizes(micro: int, global_: int, data_parallel_size: int = 1) -> None:
    """The divisibility rules of the training batch sizes, with errors that say what to change."""
    if micro < 1:
        raise ValueError(f"runtime.train_micro_batch_size must be >= 1, got {micro}")
    if global_ < 1:
        raise ValueError(f"runtime.train_global_batch_size must be >= 1, got {global_}")
    if data_parallel_size < 1:
        raise ValueError(f"the data parallel size must be >= 1, got {data_parallel_size}")
    if global_ % micro != 0:
        raise ValueError(
            f"runtime.train_global_batch_size ({global_}) must be a multiple of "
            f"runtime.train_micro_batch_size ({micro})"
        )
    if (global_ // micro) % data_parallel_size != 0:
        raise ValueError(
            f"runtime.train_global_batch_size ({global_}) must be a multiple of "
            f"train_micro_batch_size x data parallel size ({micro} x {data_parallel_size} = "
            f"{micro * data_parallel_size}) so every rank gets the same number of micro-batches"
        )


def num_steps_per_epoch(sample_per_episode: int, train_global_batch_size: int) -> int:
    """Optimizer steps of one pass over an episode's buffer."""
    if train_global_batch_size < 1:
        raise ValueError(
            f"runtime.train_global_batch_size must be >= 1, got {train_global_batch_size}"
        )
    return math.ceil(sample_per_episode / train_global_batch_size)


def num_steps_per_episode(
    sample_per_episode: int, train_global_batch_size: int, num_training_epoch: int = 1
) -> int:
    return num_training_epoch * num_steps_per_epoch(sample_per_episode, train_global_batch_size)


def trainer_iteration(
    num_episodes: int,
    sample_per_episode: int,
    train_global_batch_size: int,
    num_training_epoch: int = 1,
) -> int:
    """``trainer.iteration`` after ``num_episodes`` complete episodes."""
    return num_episodes * num_steps_per_episode(
        sample_per_episode, train_global_batch_size, num_training_epoch
    )


def consumed_samples_after(num_episodes: int, sample_per_episode: int) -> int:
    return num_episodes * sample_per_episode


def episodes_completed(consumed_samples: int, sample_per_episode: int) -> int:
    """Whole episodes behind ``consumed_samples`` (the episode to run next, 0-based)."""
    return consumed_samples // sample_per_episode


def num_forward_chunks(batch_size: int, generation_batch_size: int | None) -> int:
    """``forward_step`` calls for a batch (``generation_batch_size`` <= 0: one call)."""
    if not generation_batch_size or generation_batch_size <= 0:
        return 1
    return max(1, math.ceil(batch_size / generation_batch_size))


def reference_iteration(
    num_episodes: int,
    sample_per_episode: int,
    num_replicas: int,
    generation_batch_size: int | None,
) -> int:
    """A reference replica's ``_iteration`` (forward calls) after ``num_episodes`` episodes."""
    share = sample_per_episode // num_replicas
    return num_episodes * num_forward_chunks(share, generation_batch_size)
