"""The trainer rank's service on its own: steps run in the order they were sent."""

from __future__ import annotations

import asyncio

import pytest
import torch

from chatlearn.actors.identity import ActorIdentity
from chatlearn.actors.worker_core import ActorSpec, ComputeThread, WorkerContext
from chatlearn.engine.protocol import Step, Train, encode
from chatlearn.engine.worker_services import TrainerService

pytestmark = pytest.mark.timeout(30)


class _Recorder:
    def __init__(self) -> None:
        self.steps: list[tuple[int, list[float]]] = []

    def padding_config(self) -> dict:
        return {}

    def train_step(self, data, iteration):
        self.steps.append((iteration, [float(v) for mb in data for v in mb["x"]]))
        return {"loss": 0.0}


async def _arrive(service: TrainerService, episode: int, positions: list[int]) -> None:
    buffer = service.buffers.setdefault(episode, {})
    buffer.update({p: {"x": torch.tensor(float(p))} for p in positions})
    async with service._arrived:
        service._arrived.notify_all()


def _train(micro_batches: list[list[int]], iteration: int) -> dict:
    """A one-step train order of episode 0, as it arrives on the wire."""
    return encode(Train(episode=0, steps=[Step(micro_batches=micro_batches, iteration=iteration)]))


async def test_a_step_whose_data_arrives_first_still_waits_for_the_step_before_it() -> None:
    compute = ComputeThread("compute")
    ctx = WorkerContext(
        ActorSpec(identity=ActorIdentity(model="policy"), class_ref=None),
        routing_id=b"policy",
        loop=asyncio.get_running_loop(),
        compute=compute,
        zmq_context=None,
        in_process=True,
    )
    module = _Recorder()
    service = TrainerService(module, ctx)
    try:
        first = asyncio.create_task(service.handle(_train([[0, 1]], 4)))
        second = asyncio.create_task(service.handle(_train([[2, 3]], 5)))
        await asyncio.sleep(0.01)
        await _arrive(service, 0, [2, 3])  # the second step's samples come first (cache fills)
        await asyncio.sleep(0.2)
        assert module.steps == []  # step 5 must not overtake step 4
        await _arrive(service, 0, [0, 1])
        results = await asyncio.wait_for(asyncio.gather(first, second), 10)
    finally:
        compute.stop()
    assert module.steps == [(4, [0.0, 1.0]), (5, [2.0, 3.0])]
    assert results[0]["steps"][0]["end"] <= results[1]["steps"][0]["start"]
