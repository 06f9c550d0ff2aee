"""The runtime's self-healing (``ActorSystem.heal``): a lost actor's unit is restarted on the
same slots, its callers get ``ActorLostError`` and can wait for it; the restart policy bounds the
restarts; models that do not heal fail the run as before."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import actors_testlib as lib
import pytest

from chatlearn.actors import ActorDeadError, ActorError, ActorLostError, ActorSystem, RestartPolicy

pytestmark = pytest.mark.timeout(90)


async def _pid(group, index: int = 0) -> int:
    return (await group.call(index, "where"))["pid"]


async def _until_lost(
    group, index: int = 0, within: float = 10.0, method: str = "noop"
) -> ActorLostError:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            await group.call(index, method)
        except ActorLostError as lost:
            return lost
        await asyncio.sleep(0.02)
    raise AssertionError("the actor was never lost")


async def _until_dead(group, within: float = 10.0) -> ActorDeadError:
    """The error of the first call that fails (the actor was killed just before)."""
    with pytest.raises(ActorDeadError) as info:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            await group.call(0, "noop")
            await asyncio.sleep(0.02)
    return info.value


async def test_a_killed_replica_restarts_on_its_slot_and_the_others_keep_running(tmp_path):
    cfg = lib.make_config({"a": {"num_cpu": 2, "cpu_per_process": 1}})
    primed: list[int | None] = []
    async with ActorSystem(cfg) as system:
        (group,) = await system.launch(lib.Recorder("a", cfg))

        async def prime(replica: int | None) -> None:
            primed.append(replica)
            assert await group.call(replica, "add", 5) == 5  # only the hook reaches it now

        system.heal("a", unit="replica", on_restart=prime)
        before = [await group.call(i, "where") for i in range(2)]
        assert await group.call(1, "add", 1) == 1
        os.kill(before[1]["pid"], signal.SIGKILL)
        lost = await _until_lost(group, 1)
        assert lost.model == "a" and lost.replica_id == 1 and lost.attempt == 1
        assert "killed by SIGKILL" in str(lost)
        assert await group.call(0, "add", 1) == 1  # replica 0 is untouched meanwhile
        await system.wait_ready("a", 1)
        after = await group.call(1, "where")
        assert after["pid"] != before[1]["pid"] and after["affinity"] == before[1]["affinity"]
        assert await group.call(1, "add", 1) == 6  # setup() ran again, then the hook
        assert primed == [1] and group[1].incarnation == 1 and group[0].incarnation == 0
        (restart,) = system.restarts
        assert (restart.model, restart.replica_id, restart.attempt, restart.tries) == ("a", 1, 1, 1)
        assert restart.ready is not None and restart.ready - restart.started < 15
        assert system.event_kinds("a").count("restart") == 1


async def test_a_hung_actor_is_killed_and_restarted():
    cfg = lib.make_config({"a": {"num_cpu": 1}}, {"heartbeat_timeout": 1.0})
    async with ActorSystem(cfg) as system:
        (group,) = await system.launch(lib.Recorder("a", cfg))
        system.heal("a")
        pid = await _pid(group)
        os.kill(pid, signal.SIGSTOP)
        lost = await _until_lost(group, within=10)
        assert "no heartbeat" in str(lost)
        await system.wait_ready("a")
        assert await _pid(group) != pid
        assert (
            not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
        )


async def test_the_policy_bounds_restarts_and_says_how_many_were_tried():
    cfg = lib.make_config({"a": {"num_cpu": 1}})
    async with ActorSystem(cfg) as system:
        (group,) = await system.launch(lib.Recorder("a", cfg))
        system.heal("a", policy=RestartPolicy(max_restarts=2, window=60))
        for attempt in (1, 2):
            os.kill(await _pid(group), signal.SIGKILL)
            assert (await _until_lost(group)).attempt == attempt
            await system.wait_ready("a")
        os.kill(await _pid(group), signal.SIGKILL)
        error = await _until_dead(group)
        assert not isinstance(error, ActorLostError)
        assert (
            "not restarted again: 2 restart(s) within 1 min already (max_restarts=2"
            in "\n".join(error.__notes__)
        )
        assert system.failure is error


async def test_restarts_older_than_the_window_no_longer_count():
    cfg = lib.make_config({"a": {"num_cpu": 1}})
    async with ActorSystem(cfg) as system:
        (group,) = await system.launch(lib.Recorder("a", cfg))
        system.heal("a", policy=RestartPolicy(max_restarts=1, window=0.5))
        for attempt in (1, 2):
            os.kill(await _pid(group), signal.SIGKILL)
            assert (await _until_lost(group)).attempt == attempt
            await system.wait_ready("a")
            await asyncio.sleep(0.6)
        assert system.failure is None


async def test_user_errors_are_not_retried_unless_the_policy_says_so():
    cfg = lib.make_config({"a": {"num_cpu": 1}, "b": {"num_cpu": 1}})
    async with ActorSystem(cfg) as system:
        a, b = await system.launch(lib.Recorder("a", cfg), lib.Recorder("b", cfg))
        system.heal("a", policy=RestartPolicy(on_error=True))
        system.heal("b")
        with pytest.raises(ActorLostError) as info:
            await a.call(0, "fail", "bad sample")
        assert isinstance(info.value.cause, ActorError) and "bad sample" in str(info.value)
        await system.wait_ready("a")
        assert await a.call(0, "add", 2) == 2
        with pytest.raises(ActorError):
            await b.call(0, "fail", "a bug")
        assert isinstance(system.failure, ActorError)  # b does not retry user errors


async def _kill_and_wait_for_the_new_process(group) -> None:
    """SIGKILL the actor, then wait (10 s at most) until its replacement process exists."""
    os.kill(await _pid(group), signal.SIGKILL)
    await _until_lost(group)
    deadline = time.monotonic() + 10
    while group[0].pid is None or group[0].incarnation < 1:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)


async def test_a_process_lost_while_restarting_is_restarted_again():
    cfg = lib.make_config({"a": {"num_cpu": 1}})
    async with ActorSystem(cfg) as system:
        (group,) = await system.launch(lib.Recorder("a", cfg))
        system.heal("a", policy=RestartPolicy(max_restarts=5))
        await _kill_and_wait_for_the_new_process(group)
        os.kill(group[0].pid, signal.SIGKILL)  # the new process, while it starts
        await system.wait_ready("a")
        assert await group.call(0, "add", 3) == 3
        (restart,) = system.restarts
        assert restart.tries == 2 and system.num_restarts == 2


async def test_new_processes_lost_while_starting_are_restarted_as_long_as_the_policy_allows(
    tmp_path,
):
    # Each new process was lost while it started, every loss outside the window of the one
    # before (as when starting takes longer than the window): the policy allowed every restart,
    # but the run stopped after max_restarts + 1 of them with "could not be restarted: too many
    # tries"
    marker = tmp_path / "slow"
    cfg = lib.make_config({"a": {"num_cpu": 1, "model_args": {"slow_marker": str(marker)}}})
    async with ActorSystem(cfg) as system:
        (group,) = await system.launch(lib.SlowOnceMarked("a", cfg))
        system.heal("a", policy=RestartPolicy(max_restarts=1, window=0.3))
        marker.touch()  # the new processes hang in setup() until killed
        os.kill(await _pid(group), signal.SIGKILL)
        await _until_lost(group)
        for incarnation in range(1, 5):
            deadline = time.monotonic() + 10
            while group[0].pid is None or group[0].incarnation < incarnation:
                assert time.monotonic() < deadline and system.failure is None, system.failure
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.4)  # the window of the restart before has passed
            if incarnation == 4:
                marker.unlink()  # this one's replacement starts
            os.kill(group[0].pid, signal.SIGKILL)  # in setup(): lost while starting
        await system.wait_ready("a")
        assert await group.call(0, "add", 3) == 3
        (restart,) = system.restarts
        assert restart.tries == 5 and system.num_restarts == 5


async def test_a_restart_cut_short_by_the_runs_stop_is_not_counted_again(caplog):
    # a stop (Ctrl-C) while the new process started made its start fail: that was logged as
    # "the restarted process failed while starting (...); restart 2" and counted as one more
    cfg = lib.make_config({"a": {"num_cpu": 1}})
    async with ActorSystem(cfg) as system:
        (group,) = await system.launch(lib.Recorder("a", cfg))
        system.heal("a", policy=RestartPolicy(max_restarts=5))
        await _kill_and_wait_for_the_new_process(group)
        system.fail(RuntimeError("training stopped: interrupted by SIGINT"))
        with pytest.raises(RuntimeError, match="interrupted by SIGINT"):
            await system.wait_ready("a")
        await asyncio.gather(*system._restart_tasks)
        (restart,) = system.restarts
        assert restart.tries == 1 and system.num_restarts == 1
        assert "failed while starting" not in caplog.text


async def test_a_model_that_does_not_heal_fails_the_run_as_before():
    cfg = lib.make_config({"a": {"num_cpu": 1}})
    async with ActorSystem(cfg) as system:
        (group,) = await system.launch(lib.Recorder("a", cfg))
        os.kill(await _pid(group), signal.SIGKILL)
        assert not isinstance(await _until_dead(group), ActorLostError)
        assert system.restarts == []


async def test_a_whole_model_unit_restarts_every_rank():
    cfg = lib.make_config(
        {"d": {"num_cpu": 2, "cpu_per_process": 1, "trainable": True}},
        {"train_micro_batch_size": 1, "train_global_batch_size": 2},
    )
    async with ActorSystem(cfg) as system:
        (group,) = await system.launch(lib.DistModule("d", cfg))
        system.heal("d", unit="model")
        pids = [h.pid for h in group]
        os.kill(pids[1], signal.SIGKILL)
        await _until_lost(group, 0, method="report")  # rank 0, alive, is restarted with it
        await system.wait_ready("d")
        assert all(h.pid not in pids for h in group)
        reports = await group.call_all("report")  # a new torch.distributed group formed
        assert [r["setup_sum"] for r in reports] == [3.0, 3.0]
