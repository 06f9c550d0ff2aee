"""Calls into real actor processes: handles, groups, services, overlap, and round-trip latency."""

from __future__ import annotations

import asyncio
import statistics
import time

import actors_testlib as lib
import pytest

from chatlearn.actors import ActorDeadError, ActorError, ActorSystem

pytestmark = pytest.mark.timeout(60)

SERVICES = {"echo": "actors_testlib:EchoService"}


async def test_group_calls_scatter_and_replicas():
    # An inference model with 2 processes is 2 replicas of one rank each (ChatLearn's rule).
    cfg = lib.make_config({"m": {"num_cpu": 2, "cpu_per_process": 1}})
    async with ActorSystem(cfg) as system:
        (group,) = await system.launch(lib.Recorder("m", cfg))
        assert (len(group), group.num_replica, group.world_size) == (2, 2, 1)
        assert [[h.replica_id for h in r] for r in group.replicas] == [[0], [1]]
        wheres = await group.call_all("where")
        assert [w["replica_id"] for w in wheres] == [0, 1]
        assert [w["num_replica"] for w in wheres] == [2, 2]
        assert await group.scatter("add", [5, 7]) == [5, 7]
        assert await group.call(1, "add", 1) == 8
        echoed = await group[0].call("echo", 1, (2, 3), key={"nested": [1.5, None, b"x"]})
        assert echoed == {"args": [1, (2, 3)], "kwargs": {"key": {"nested": [1.5, None, b"x"]}}}
        with pytest.raises(ValueError, match="3 items"):
            await group.scatter("add", [1, 2, 3])


async def test_unknown_method_and_unsendable_result_are_actor_errors():
    cfg = lib.make_config({"m": {"num_cpu": 1}})
    async with ActorSystem(cfg, fail_fast=False) as system:
        (group,) = await system.launch(lib.Recorder("m", cfg))
        with pytest.raises(ActorError) as info:
            await group.call(0, "no_such_method")
        assert info.value.type_name == "AttributeError"
        with pytest.raises(ActorError) as info:
            await group.call(0, "thread_name.__class__")  # not a service: rejected
        with pytest.raises(ActorError) as info:
            await group.call(0, "__init__", "m")
        with pytest.raises(ActorError) as info:
            await group.call(0, "unsendable")
        assert info.value.type_name == "EncodeError" and "'unsendable'" in info.value.message
        assert await group.call(0, "add", 3) == 3  # the actor is fine


async def test_services_async_on_loop_sync_on_compute_thread():
    cfg = lib.make_config({"m": {"num_cpu": 1}})
    async with ActorSystem(cfg) as system:
        (group,) = await system.launch(lib.Recorder("m", cfg), services={"m": SERVICES})
        handle = group[0]
        assert handle.info["services"] == ["echo"]
        pong = await handle.call("echo.ping", 5)
        assert pong == {
            "x": 5,
            "thread": "MainThread",
            "model": "m",
            "rank": 0,
            "in_process": False,
        }
        assert await handle.call("echo.compute", 4) == {"x": 12, "thread": "chatlearn-compute"}
        assert await handle.call("echo.offload", 2) == 2  # ctx.run_compute on the module
        assert await handle.call("thread_name") == "chatlearn-compute"


@pytest.mark.serial  # asserts a wall-clock bound: run alone (make test's second part)
async def test_socket_loop_serves_while_the_compute_thread_is_busy():
    cfg = lib.make_config({"m": {"num_cpu": 1}})
    async with ActorSystem(cfg) as system:
        (group,) = await system.launch(lib.Recorder("m", cfg), services={"m": SERVICES})
        handle = group[0]
        busy = asyncio.ensure_future(handle.call("sleep", 1.5))
        # queued behind the sleep; module and plain service calls run in arrival order
        queued = [
            asyncio.ensure_future(handle.call("add", 1)),
            asyncio.ensure_future(handle.call("echo.add_to_module", 10)),
            asyncio.ensure_future(handle.call("add", 100)),
        ]
        await asyncio.sleep(0.2)
        start = time.monotonic()
        assert (await handle.call("echo.ping", "during compute"))["x"] == "during compute"
        assert time.monotonic() - start < 0.5  # answered while the step computes
        assert not busy.done() and not any(q.done() for q in queued)
        assert await busy == "slept"
        assert await asyncio.gather(*queued) == [1, 11, 111]


@pytest.mark.serial  # asserts a wall-clock bound: run alone (make test's second part)
async def test_noop_round_trip_latency():
    """The control round trip of a no-op call (p50 well under 1 ms; loose bound for CI)."""
    cfg = lib.make_config({"m": {"num_cpu": 1}})
    async with ActorSystem(cfg) as system:
        (group,) = await system.launch(lib.Recorder("m", cfg))
        handle = group[0]
        for _ in range(100):  # warm up (allocations, branch predictors, lazy paths)
            await handle.call("noop")
        samples = []
        for _ in range(1000):
            start = time.perf_counter()
            await handle.call("noop")
            samples.append(time.perf_counter() - start)
        pings = []
        for _ in range(200):
            pings.append(await system.send_ping(handle))
    p50 = statistics.median(samples) * 1e6
    p90 = statistics.quantiles(samples, n=10)[-1] * 1e6
    ping50 = statistics.median(pings) * 1e6
    print(f"\nno-op call round trip: p50 {p50:.0f} us, p90 {p90:.0f} us; ping p50 {ping50:.0f} us")
    assert p50 < 5000, f"p50 {p50:.0f} us"


def test_error_context_added_by_the_runtime_travels_with_a_user_error():
    # e.g. which step of a training call of several raised (the coordinator names that step)
    from chatlearn.actors.worker_core import add_error_context, user_error

    try:
        raise ValueError("bad sample")
    except ValueError as exc:
        add_error_context(exc, train_step_iteration=5)
        add_error_context(exc, episode=1)
        err = user_error(exc, {"model": "policy", "rank": 0})
    assert err.context == {"model": "policy", "rank": 0, "train_step_iteration": 5, "episode": 1}
    assert "ValueError: bad sample" in err.remote_traceback
    assert "train_step_iteration=5" in str(err)


async def test_a_call_the_actor_cannot_decode_stops_the_run_instead_of_waiting_forever():
    # 600k items: more than a receiver decodes in one message (524,288). The actor dropped it
    # as malformed and the caller waited for an answer that could never come.
    cfg = lib.make_config({"m": {"num_cpu": 1}}, {"max_restarts": 0})
    async with ActorSystem(cfg) as system:
        (group,) = await system.launch(lib.Recorder("m", cfg))
        with pytest.raises(ActorDeadError) as info:
            await asyncio.wait_for(group[0].call("echo", list(range(600_000))), 30)
        assert "a message from the coordinator cannot be decoded" in str(info.value)
        assert "TooManyObjectsError" in str(info.value)
