"""The run's state (``state.RunState``) and its checkpoint record (``CoordinatorState``)."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest

from chatlearn.engine.checkpoint import CoordinatorState
from chatlearn.engine.state import HISTORY_KEPT, RunState

_CONTEXT = {"sampler": {"consumed_samples": 16}, "training": {"seed": 1}, "trainer": {}}


def _trained(steps: int, *, steps_per_episode: int = 4, samples_per_episode: int = 8) -> RunState:
    state = RunState()
    for number in range(steps):
        state.step_trained({"loss": 1.0 / (number + 1)})
        if state.step_in_episode == steps_per_episode:
            state.episode_trained(state.episode, samples_per_episode)
    return state


def test_steps_and_episodes_advance_the_counters() -> None:
    state = _trained(6)
    assert (state.iteration, state.episode, state.step_in_episode) == (6, 1, 2)
    assert state.consumed_samples == 8  # the completed episode's samples only
    assert state.first_step == {"iteration": 1, "loss": 1.0}
    assert state.history[-1] == {"iteration": 6, "loss": 1.0 / 6}


def test_run_state_keeps_the_last_steps_only() -> None:
    state = RunState(history=[{"iteration": i} for i in range(HISTORY_KEPT + 10)])
    assert len(state.history) == HISTORY_KEPT
    assert state.history[0] == {"iteration": 10}
    fresh = _trained(3 * HISTORY_KEPT)
    assert len(fresh.history) == HISTORY_KEPT
    assert fresh.history[-1]["iteration"] == 3 * HISTORY_KEPT
    assert fresh.first_step["iteration"] == 1  # kept although its history entry is gone


def test_the_checkpoint_record_round_trips_into_the_run_state() -> None:
    live = _trained(6)
    record = CoordinatorState.of(live, reason="request", **_CONTEXT)
    live.step_trained({"loss": 0.0})  # training goes on: the record is a copy
    assert record.iteration == 6 and len(record.history) == 6
    data = json.loads(record.to_json())
    # coordinator.json keeps its keys: the counters at the top level, the history as a list
    assert {f.name for f in fields(RunState)} | set(_CONTEXT) | {"reason"} <= set(data)
    assert data["step_in_episode"] == 2 and data["history"][-1]["iteration"] == 6
    restored = CoordinatorState.from_json(record.to_json()).copy()
    assert type(restored) is RunState
    assert restored == _trained(6)
    assert restored.history.maxlen == HISTORY_KEPT


def test_a_record_without_first_step_takes_its_history_s_first() -> None:
    data = json.loads(CoordinatorState.of(_trained(3), **_CONTEXT).to_json())
    del data["first_step"]  # written before the run's first step was kept
    assert CoordinatorState.from_json(json.dumps(data)).first_step == data["history"][0]


def test_a_record_without_a_counter_is_refused() -> None:
    data = json.loads(CoordinatorState.of(_trained(4), **_CONTEXT).to_json())
    del data["consumed_samples"]
    with pytest.raises(ValueError, match="consumed_samples: missing or not an integer"):
        CoordinatorState.from_json(json.dumps(data))
    data["consumed_samples"] = "16"
    with pytest.raises(ValueError, match="consumed_samples: missing or not an integer"):
        CoordinatorState.from_json(json.dumps(data))


def test_the_evaluations_of_a_long_run_keep_the_first_and_the_last() -> None:
    # the coordinator appended one record per evaluation and never trimmed them (~1 MB/h with
    # an evaluation every 2 s); the summary's "before training" figure is the first one
    from chatlearn.engine.state import HISTORY_KEPT, bounded_history, first_and_last

    history: list[dict] = []
    for i in range(5 * HISTORY_KEPT + 7):
        history.append({"iteration": i})
        bounded_history(history)
        assert len(history) < 2 * HISTORY_KEPT
    assert history[0] == {"iteration": 0} and history[-1] == {"iteration": 5 * HISTORY_KEPT + 6}
    kept = first_and_last(history)
    assert len(kept) == HISTORY_KEPT and kept[0] == {"iteration": 0}
    assert [r["iteration"] for r in kept[1:]] == list(
        range(4 * HISTORY_KEPT + 8, 5 * HISTORY_KEPT + 7)
    )
    assert first_and_last(history[:3]) == history[:3]
