"""The run's state: ChatLearn's counters of a training run and its recent steps' metrics.

Runs in the coordinator. A leaf (standard library only), so that every module holding the state
imports it from here: the pipeline advances it, the engine reads it (``engine.trainer.iteration``,
``learn()``'s result), and a checkpoint's ``coordinator.json`` is this state plus what the
checkpoint adds (``checkpoint.CoordinatorState`` extends :class:`RunState`). The counters are
declared once, here; nothing else keeps a copy of them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

HISTORY_KEPT = 1000  # steps' metrics kept in memory and in a checkpoint (for summaries)


def bounded_history(records: list[dict[str, Any]], count: int = HISTORY_KEPT) -> None:
    """Trim ``records`` in place to its first record and its last ``count - 1`` once it holds
    twice ``count`` (amortised O(1) per record): the evaluations of a run of days stay a few
    thousand, and the summary's "before training" figure stays the first."""
    if len(records) >= 2 * count:
        del records[1 : len(records) - count + 1]


def first_and_last(
    records: list[dict[str, Any]], count: int = HISTORY_KEPT
) -> list[dict[str, Any]]:
    """A copy of ``records`` with at most ``count``: the first and the last ``count - 1``."""
    if len(records) <= count:
        return list(records)
    return [records[0], *records[len(records) - count + 1 :]]


@dataclass(slots=True, kw_only=True)
class RunState:
    """Where a run is, between two optimizer steps.

    ``iteration`` counts the optimizer steps of the whole run (ChatLearn's
    ``trainer.iteration``); ``episode`` is the episode in progress (the next one at a
    boundary), ``step_in_episode`` its steps already trained (0 at a boundary), and
    ``consumed_samples`` the samples of the *completed* episodes, so a sampler rebuilt from it
    draws ``episode`` next. The reference runs ahead of training, so the sampler's own position
    is past that; the state never uses it.

    ``history`` holds the metrics of the last ``HISTORY_KEPT`` steps only (every step's are in
    metrics.jsonl, and a run of 100k steps must not keep them all in memory); ``first_step``
    keeps the run's first step, for its summary.
    """

    iteration: int = 0
    episode: int = 0
    step_in_episode: int = 0
    consumed_samples: int = 0
    history: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=HISTORY_KEPT))
    first_step: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.history, deque) or self.history.maxlen != HISTORY_KEPT:
            self.history = deque(self.history, maxlen=HISTORY_KEPT)

    def copy(self) -> RunState:
        """An independent ``RunState`` with these counters and history: the run's start, kept
        for a rewind without a checkpoint, or the live state restored from a checkpoint's."""
        return RunState(
            iteration=self.iteration,
            episode=self.episode,
            step_in_episode=self.step_in_episode,
            consumed_samples=self.consumed_samples,
            history=self.history.copy(),
            first_step=dict(self.first_step),
        )

    def step_trained(self, metrics: dict[str, float]) -> None:
        """One more optimizer step, with its metrics (averaged over the ranks)."""
        self.iteration += 1
        self.step_in_episode += 1
        self.history.append({"iteration": self.iteration, **metrics})
        if not self.first_step:
            self.first_step = self.history[-1]

    def episode_trained(self, episode: int, num_samples: int) -> None:
        """``episode``'s last step is done: the state moves to the boundary before the next."""
        self.episode = episode + 1
        self.step_in_episode = 0
        self.consumed_samples += num_samples
