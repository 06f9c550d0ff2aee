"""Cheap chunks and steps travel several to an order (issue 17), without changing what runs."""

from __future__ import annotations

import pytest
import torch

from chatlearn.engine.pipeline import step_group
from chatlearn.engine.schedule import GroupSizer
from chatlearn.engine.training_plan import plan_episode
from chatlearn.engine.worker_services import join_parts


def test_group_sizer_groups_cheap_items_only() -> None:
    sizer = GroupSizer(budget=0.005, most=64)
    assert sizer.size() == 1  # nothing known yet: as if expensive
    sizer.observe(0.2, 2)  # 100 ms an item (a real model): one per order
    assert sizer.size() == 1
    cheap = GroupSizer(budget=0.005, most=64)
    cheap.observe(0.001, 10)  # 100 µs an item
    assert cheap.size() in (49, 50)
    for _ in range(50):
        cheap.observe(0.0, 10)  # free items: capped
    assert cheap.size() == 64
    cheap.observe(10.0, 1)  # one slow report is enough to stop grouping
    assert cheap.size() == 1
    with pytest.raises(ValueError):
        GroupSizer(budget=0)


def test_step_groups_leave_the_reference_room_in_the_window() -> None:
    plan = plan_episode(
        12, train_micro_batch_size=1, train_global_batch_size=2, num_training_epoch=2
    )
    steps = plan.steps  # 6 steps of the first pass (2 new samples each), then 6 more
    # a window of 8 samples: at most 4 new samples a group, so 2 steps
    assert [s.step_in_episode for s in step_group(steps, 0, 0, most=64, room=4)] == [0, 1]
    assert [s.step_in_episode for s in step_group(steps, 2, 4, most=64, room=4)] == [2, 3]
    # the sizer's bound
    assert len(step_group(steps, 0, 0, most=1, room=4)) == 1
    # the first step goes even when it alone needs more than the room (a window of 1 step)
    assert len(step_group(steps, 0, 0, most=64, room=1)) == 1
    # the second pass needs nothing new: the rest in one group
    later = step_group(steps, 6, 12, most=64, room=4)
    assert [s.step_in_episode for s in later] == list(range(6, 12))
    # no window: only the sizer bounds a group
    assert len(step_group(steps, 0, 0, most=64, room=None)) == 12


def _part(positions: list[int], width: int = 3, cache: bool = False) -> dict:
    part = {
        "positions": positions,
        "data": {"x": torch.arange(len(positions) * width).reshape(len(positions), width)},
    }
    if cache:
        part["cache"] = [[0, p] for p in positions]
    return part


def test_join_parts_joins_what_can_be_joined() -> None:
    joined = join_parts([_part([0, 1]), _part([2]), _part([3, 4], cache=True), _part([5], 4)])
    # cache runs stay apart from the others; a wider tensor cannot join them
    assert [p["positions"] for p in joined] == [[0, 1, 2], [3, 4], [5]]
    assert joined[0]["data"]["x"].shape == (3, 3)
    assert torch.equal(joined[0]["data"]["x"][2], torch.arange(3))
    assert "cache" not in joined[0] and joined[1]["cache"] == [[0, 3], [0, 4]]
    single = [_part([7])]
    assert join_parts(single) is single
