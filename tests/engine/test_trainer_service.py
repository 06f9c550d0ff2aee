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


def _service(module: _Recorder) -> tuple[TrainerService, ComputeThread]:
    """A trainer service of `module` on this loop, with the compute thread it runs on."""
    compute = ComputeThread("compute")
    ctx = WorkerContext(
        ActorSpec(identity=ActorIdentity(model="policy"), class_ref=None),
        routing_id=b"policy",
        loop=asyncio.get_running_loop(),
        compute=compute,
        zmq_context=None,
        in_process=True,
    )
    return TrainerService(module, ctx), compute


async def test_a_step_whose_data_arrives_first_still_waits_for_the_step_before_it() -> None:
    module = _Recorder()
    service, compute = _service(module)
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
        compute.stop(RuntimeError("the test is over"))
    assert module.steps == [(4, [0.0, 1.0]), (5, [2.0, 3.0])]
    assert results[0]["steps"][0]["end"] <= results[1]["steps"][0]["start"]


def test_a_failed_save_says_where_it_wrote_and_the_room_there(tmp_path) -> None:
    # a full disk made torch.save say only "[enforce fail at inline_container.cc] unexpected
    # pos 2375360 vs 2375252": no path, no iteration, nothing about space
    import resource

    from chatlearn.actors.worker_core import _CONTEXT_ATTR

    class _Full(_Recorder):
        name = "policy"

        def save_checkpoint(self, iteration):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")

    ctx = WorkerContext(
        ActorSpec(identity=ActorIdentity(model="policy"), class_ref=None),
        routing_id=b"policy",
        loop=None,  # type: ignore[arg-type]
        compute=None,  # type: ignore[arg-type]
        zmq_context=None,
        in_process=True,
    )
    service = TrainerService(_Full(), ctx)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 2**20, hard))
    try:
        with pytest.raises(RuntimeError) as info:
            service._checkpoint_call("save", str(tmp_path), 7)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    context = getattr(info.value, _CONTEXT_ATTR)
    assert context["checkpoint"] == str(tmp_path / "policy" / "rank_0")
    assert context["disk_free"].endswith(" MiB") and " MiB free of " in context["disk_free"]
    assert context["file_size_limit"] == "64.0 MiB (ulimit -f)"


async def test_outputs_no_later_step_uses_leave_the_buffer() -> None:
    # an episode's buffer held every sample's reference output until the next episode: with
    # sample_per_episode 100k (the whole data set, as ChatLearn configs often do) ~2.4 GB per
    # trainer rank at max_length 512, whatever pipeline_window was; the pipeline now names the
    # positions each step uses last (last_uses) and the rank drops them after that step
    from chatlearn.engine.pipeline import last_uses
    from chatlearn.engine.training_plan import plan_episode

    plan = plan_episode(9, train_micro_batch_size=2, train_global_batch_size=4)
    done = last_uses(plan)
    # the wrap fill reuses position 0 in the last step: it goes only then
    assert {s: sorted(p) for s, p in done.items()} == {0: [1, 2, 3], 1: [4, 5, 6, 7], 2: [0, 8]}
    twice = plan_episode(
        10, train_micro_batch_size=2, train_global_batch_size=4, num_training_epoch=2
    )
    assert all(step.epoch == 1 for step in twice.steps if step.step_in_episode in last_uses(twice))

    module = _Recorder()
    service, compute = _service(module)
    try:
        await _arrive(service, 0, list(range(6)))
        order = Train(episode=0, steps=[Step(micro_batches=[[0, 1]], iteration=1)], release=[0])
        await asyncio.wait_for(service.handle(encode(order)), 10)
    finally:
        compute.stop(RuntimeError("the test is over"))
    assert sorted(service.buffers[0]) == [1, 2, 3, 4, 5]
