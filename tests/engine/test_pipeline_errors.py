"""The pipeline fails with single errors, never a task group's ExceptionGroup (pipeline.py)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from chatlearn.actors import ActorLostError
from chatlearn.engine.pipeline import DPOPipeline, first_error


def _lost() -> ActorLostError:
    cause = RuntimeError("exited unexpectedly; killed by SIGKILL (exit code -9)")
    return ActorLostError(cause, model="policy_trainer", replica_id=0, attempt=1)


def test_first_error_unwraps_nested_groups_and_names_the_others() -> None:
    lost, other = _lost(), ValueError("bad\nsecond line")
    group = ExceptionGroup("orders", [ExceptionGroup("inner", [lost]), lost, other])
    assert first_error(group) is lost
    assert lost.__notes__ == ["also failed meanwhile: ValueError: bad"]  # lost counted once


def test_a_reference_loop_fails_with_its_orders_first_error() -> None:
    # A fill order to a trainer rank that died fails with the trainer's ActorLostError inside
    # the reference loop's task group; the engine restarts the trainer only on that error
    # itself (before, the run sometimes stopped on "ExceptionGroup: unhandled errors in a
    # TaskGroup" instead of healing: test_healing's killed-in-a-collective trainer test).
    lost = _lost()

    async def fill() -> None:
        raise lost

    async def orders(*_: Any) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(asyncio.sleep(10))  # an order still in flight: cancelled
            group.create_task(fill())
            await asyncio.sleep(10)  # the loop waits for credit meanwhile: cancelled

    pipeline = SimpleNamespace(_reference_orders=orders)
    with pytest.raises(ActorLostError) as caught:
        asyncio.run(DPOPipeline._reference_loop(pipeline, 0, range(1)))  # type: ignore[arg-type]
    assert caught.value is lost
