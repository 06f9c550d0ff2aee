"""Lifecycle of real actor processes: the order of events after success and after each failure.

Every test starts real worker processes over real ipc sockets. The autouse fixture in
tests/conftest.py fails a test that leaves a process or a runtime file behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import actors_testlib as lib
import psutil
import pytest

from chatlearn.actors import (
    ActorDeadError,
    ActorError,
    ActorSystem,
    ActorSystemClosedError,
    ActorTimeoutError,
    HostResources,
    PlacementError,
)

pytestmark = pytest.mark.timeout(60)

# Detection bound of the issue: a dead process is noticed within 2 s.
DEATH_NOTICE_SECONDS = 2.0


def _config(tmp_path, cls_models=None, runtime=None, env_vars=None):
    models = cls_models or {"m": {"num_cpu": 1}}
    for values in models.values():
        values.setdefault("model_args", {"events_file": str(tmp_path / "events.txt")})
    return lib.make_config(models, runtime, env_vars)


def _order(kinds: list[str], *expected: str) -> None:
    """`expected` occur in `kinds` in this order (other events may sit between them)."""
    positions = [kinds.index(kind) for kind in expected]
    assert positions == sorted(positions), kinds


async def test_success_lifecycle(tmp_path):
    cfg = _config(tmp_path)
    system = ActorSystem(cfg)
    async with system:
        (group,) = await system.launch(lib.Recorder("m", cfg))
        handle = group[0]
        assert handle.pid != os.getpid()
        assert await group.call(0, "forward_step", {"x": [1, 2]}) == {"x": [2, 4], "iteration": 0}
        assert (await handle.call("forward_step", {"x": [3]}))["iteration"] == 1
        metrics = await handle.call("train_step", [{"a": 1}, {"a": 2}])
        # inside train_step ChatLearn's counter is already advanced: the step's iteration + 1
        assert metrics == {"num_micro_batches": 2.0, "train_iteration": 1}
        assert (await handle.call("train_step", []))["train_iteration"] == 2
    kinds = system.event_kinds()
    assert kinds == ["spawn", "hello", "ready", "shutdown", "exit", "stopped", "closed"]
    assert [e.detail for e in system.events if e.kind == "exit"] == ["exit code 0"]
    # The template was built in this process; the live instance only in the actor.
    with open(tmp_path / "events.txt") as f:
        pids = [int(line.split()[0]) for line in f]
    assert pids[0] == os.getpid() and set(pids[1:]) == {handle.pid}
    assert lib.read_events(tmp_path / "events.txt") == [
        "m 0 init",
        "m 0 init",
        "m 0 setup",
        "m 0 forward_step 0",
        "m 0 forward_step 1",
        "m 0 train_step",
        "m 0 train_step",
    ]
    assert system.failure is None
    with pytest.raises(ActorSystemClosedError):
        await handle.call("noop")


async def test_exception_in_setup(tmp_path):
    cfg = _config(tmp_path)
    system = ActorSystem(cfg)
    async with system:
        with pytest.raises(ActorError) as info:
            await system.launch(lib.FailingSetup("m", cfg))
    err = info.value
    assert (err.type_name, err.method, err.model, err.rank) == ("RuntimeError", "setup", "m", 0)
    assert err.host and "boom in setup" in err.message
    assert 'raise RuntimeError("boom in setup")' in err.remote_traceback
    assert err.exit_code == 3  # the worker's EXIT_STARTUP_FAILED
    kinds = system.event_kinds()
    _order(kinds, "spawn", "hello", "error", "failure", "stopped", "shutdown", "closed")
    assert "ready" not in kinds
    assert lib.read_events(tmp_path / "events.txt") == ["m 0 init", "m 0 init", "m 0 setup"]


async def test_exception_in_step_stops_the_run(tmp_path):
    cfg = _config(tmp_path)
    system = ActorSystem(cfg)
    async with system:
        (group,) = await system.launch(lib.Recorder("m", cfg))
        pid = group[0].pid
        with pytest.raises(ActorError) as info:
            await group.call(0, "fail", "bad input")
        err = info.value
        assert (err.type_name, err.message, err.method) == ("ValueError", "bad input", "fail")
        assert (err.model, err.rank, err.replica_id, err.context["pid"]) == ("m", 0, 0, pid)
        # The traceback starts at the user's code, not in the runtime's loops.
        assert err.remote_traceback.splitlines()[1].strip().startswith('File "')
        assert "actors_testlib.py" in err.remote_traceback.splitlines()[1]
        assert system.failure is err
        with pytest.raises(ActorError):  # the run is stopped: later calls raise the cause
            await group.call(0, "noop")
    kinds = system.event_kinds()
    _order(kinds, "ready", "error", "failure", "exit", "stopped", "closed")
    _order(kinds, "failure", "shutdown", "closed")


async def test_exception_in_step_without_fail_fast_keeps_running(tmp_path):
    cfg = _config(tmp_path)
    async with ActorSystem(cfg, fail_fast=False) as system:
        (group,) = await system.launch(lib.Recorder("m", cfg))
        with pytest.raises(ActorError):
            await group.call(0, "fail", "recoverable")
        assert await group.call(0, "add", 2) == 2
        assert system.failure is None


async def test_import_error_in_user_module(tmp_path):
    cfg = _config(tmp_path, env_vars={"ACTORS_TEST_BREAK_IMPORT": "1"})
    system = ActorSystem(cfg)
    async with system:
        with pytest.raises(ActorError) as info:
            await system.launch(lib.Recorder("m", cfg))
    err = info.value
    assert err.type_name == "ModuleNotFoundError" and err.method == "import"
    assert "chatlearn_test_no_such_dependency" in err.message
    assert "actors_testlib.py" in err.remote_traceback
    assert err.exit_code == 3
    _order(system.event_kinds(), "spawn", "hello", "error", "failure", "stopped", "closed")


async def test_crash_during_setup_reports_exit_code_and_stderr(tmp_path):
    cfg = _config(tmp_path)
    system = ActorSystem(cfg)
    async with system:
        with pytest.raises(ActorDeadError) as info:
            await system.launch(lib.CrashingSetup("m", cfg))
    err = info.value
    assert err.exit_code == 9 and err.model == "m" and err.rank == 0
    assert "during startup" in str(err)
    assert "about to os._exit(9)" in err.stderr_tail
    _order(system.event_kinds(), "spawn", "hello", "exit", "failure", "stopped", "closed")


@pytest.mark.serial  # a wall-clock bound (death noticed, a timeout, starved told from hung)
async def test_startup_timeout(tmp_path):
    cfg = _config(tmp_path)
    system = ActorSystem(cfg, startup_timeout=1.5)
    async with system:
        with pytest.raises(ActorDeadError) as info:
            await system.launch(lib.SlowSetup("m", cfg))
    assert "startup_timeout=1.5" in str(info.value)
    assert "needs a larger runtime.startup_timeout" in str(info.value)  # what to do
    _order(system.event_kinds(), "spawn", "hello", "failure", "exit", "stopped", "closed")


@pytest.mark.serial  # a wall-clock bound (death noticed, a timeout, starved told from hung)
async def test_a_setup_within_its_modules_allowance_beyond_startup_timeout(tmp_path):
    # A large checkpoint took longer to read than startup_timeout (60 s by default): the run
    # stopped with "did not become ready". A module says how long beyond it its setup may take.
    models = {"m": {"num_cpu": 1, "model_args": {"setup_s": 2.5, "allowance_s": 3.0}}}
    cfg = _config(tmp_path, models)
    system = ActorSystem(cfg, startup_timeout=1.5)
    async with system:
        await system.launch(lib.AllowedSlowSetup("m", cfg))  # ready after 2.5 s: allowed
    models["m"]["model_args"] = {"setup_s": 60, "allowance_s": 1.0}
    cfg = _config(tmp_path, models)
    system = ActorSystem(cfg, startup_timeout=1.5)
    started = time.monotonic()
    async with system:
        with pytest.raises(ActorDeadError) as info:
            await system.launch(lib.AllowedSlowSetup("m", cfg))
    assert time.monotonic() - started < 10  # 2.5 s allowed, then stopped
    assert "startup_timeout=1.5 s + 1 s to read its checkpoint" in str(info.value)


@pytest.mark.serial  # a wall-clock bound (death noticed, a timeout, starved told from hung)
async def test_os_exit_mid_call(tmp_path):
    cfg = _config(tmp_path)
    system = ActorSystem(cfg)
    async with system:
        (group,) = await system.launch(lib.Recorder("m", cfg))
        start = time.monotonic()
        with pytest.raises(ActorDeadError) as info:
            await group.call(0, "exit_now", 7)
        elapsed = time.monotonic() - start
    err = info.value
    assert err.exit_code == 7 and err.signal is None
    assert (err.model, err.rank, err.pid) == ("m", 0, group[0].pid)
    assert "exit code 7" in str(err)
    assert elapsed < DEATH_NOTICE_SECONDS, elapsed
    _order(system.event_kinds(), "ready", "exit", "failure", "stopped", "closed")


@pytest.fixture
def children() -> Iterator[list[psutil.Process]]:
    """The modules' own processes a test checks, killed at its end however it ends: once
    re-parented to init they are out of the autouse leak check's sight."""
    procs: list[psutil.Process] = []
    yield procs
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()  # psutil refuses if the pid was reused meanwhile


async def spawned_child(group, children: list[psutil.Process], index: int = 0) -> psutil.Process:
    """The `sleep` child `lib.Spawner` started in setup (its actor is alive: it is that one)."""
    proc = psutil.Process(await group.call(index, "child_pid"))
    children.append(proc)
    return proc


def assert_gone(proc: psutil.Process, within: float = 3.0) -> None:
    try:
        proc.wait(within)
    except psutil.TimeoutExpired:
        pytest.fail(f"the module's child process {proc.pid} outlived its actor")


async def test_a_modules_child_process_ends_with_a_healthy_run(tmp_path, children):
    """Looked for after SHUTDOWN, once the actor had exited, it was init's and was left."""
    cfg = _config(tmp_path)
    async with ActorSystem(cfg) as system:
        (group,) = await system.launch(lib.Spawner("m", cfg))
        child = await spawned_child(group, children)
    assert system.failure is None
    assert_gone(child)


async def test_a_modules_child_process_ends_with_its_crashed_actor(tmp_path, children):
    """An actor killed in user code (os._exit) cannot stop its children: the coordinator finds
    them in its process group, and they go before the actor is restarted."""
    cfg = _config(tmp_path)
    async with ActorSystem(cfg) as system:
        (group,) = await system.launch(lib.Spawner("m", cfg))
        system.heal("m")
        child = await spawned_child(group, children)
        with pytest.raises(ActorDeadError):
            await group.call(0, "exit_now", 7)
        await system.wait_ready("m", 0)
        assert_gone(child)
        second = await spawned_child(group, children)  # the restarted actor's
        assert second.is_running()
    assert_gone(second)


async def _wait_until_busy(path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any("sleeping" in line for line in lib.read_events(path)):
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the actor never started the call")


@pytest.mark.serial  # a wall-clock bound (death noticed, a timeout, starved told from hung)
async def test_kill9_mid_call_fails_every_pending_call(tmp_path):
    models = {"a": {"num_cpu": 1}, "b": {"num_cpu": 1}}
    cfg = _config(tmp_path, models)
    system = ActorSystem(cfg)
    async with system:
        ga, gb = await system.launch(lib.Recorder("a", cfg), lib.Recorder("b", cfg))
        victim = asyncio.ensure_future(ga.call(0, "sleep", 30))
        bystander = asyncio.ensure_future(gb.call(0, "sleep", 30))
        await asyncio.sleep(0.3)  # both calls are running on their compute threads
        start = time.monotonic()
        os.kill(ga[0].pid, signal.SIGKILL)
        with pytest.raises(ActorDeadError) as info:
            await victim
        elapsed = time.monotonic() - start
        with pytest.raises(ActorDeadError) as other:
            await bystander  # the other model's call fails with the root cause
    err = info.value
    assert err.exit_code == -signal.SIGKILL and err.signal == signal.SIGKILL
    assert "SIGKILL" in str(err) and err.model == "a"
    assert other.value is err
    assert elapsed < DEATH_NOTICE_SECONDS, elapsed
    exits = [e for e in system.events if e.kind == "exit"]
    assert {e.model for e in exits} == {"a", "b"}


async def _stop_actor_during_call(tmp_path, heartbeat_timeout, stopping=lambda: None):
    """Launch an actor and SIGSTOP it (alive for the OS, silent for us) during a long call,
    right after ``stopping()``; returns the system, the call's error and the seconds from the
    stop to that error."""
    cfg = _config(tmp_path)
    system = ActorSystem(cfg, heartbeat_interval=0.2, heartbeat_timeout=heartbeat_timeout)
    async with system:
        (group,) = await system.launch(lib.Recorder("m", cfg))
        pending = asyncio.ensure_future(group.call(0, "sleep", 30))
        await asyncio.sleep(0.2)
        stopping()
        start = time.monotonic()
        os.kill(group[0].pid, signal.SIGSTOP)
        with pytest.raises(ActorDeadError) as info:
            await pending
        elapsed = time.monotonic() - start
    return system, info.value, elapsed


@pytest.mark.serial  # a wall-clock bound (death noticed, a timeout, starved told from hung)
async def test_hung_actor_is_noticed_by_heartbeat(tmp_path):
    system, error, elapsed = await _stop_actor_during_call(tmp_path, 1.5)
    assert "no heartbeat" in str(error) and "hung or stopped" in str(error)
    assert 1.0 < elapsed < 1.5 + DEATH_NOTICE_SECONDS, elapsed
    _order(system.event_kinds(), "ready", "hung", "failure", "exit", "stopped", "closed")


@pytest.mark.serial  # a wall-clock bound (death noticed, a timeout, starved told from hung)
async def test_call_timeout_for_user_code_that_hangs(tmp_path):
    cfg = _config(tmp_path)
    system = ActorSystem(cfg)
    async with system:
        (group,) = await system.launch(lib.Recorder("m", cfg))
        assert await group[0].options(timeout=10).call("add", 1) == 1
        with pytest.raises(ActorTimeoutError) as info:
            await group[0].options(timeout=1.0).call("sleep", 1000)
        assert isinstance(info.value, ActorDeadError) and isinstance(info.value, TimeoutError)
        assert info.value.method == "sleep" and info.value.timeout == 1.0
    _order(system.event_kinds(), "ready", "failure", "exit", "stopped", "closed")


async def test_placement_error_starts_nothing(tmp_path):
    cfg = _config(tmp_path, {"big": {"num_cpu": 3}})
    system = ActorSystem(cfg, host=HostResources("h", cpus=(0, 1)))
    async with system:
        with pytest.raises(PlacementError, match="do not fit"):
            await system.launch(lib.Recorder("big", cfg))
    assert "spawn" not in system.event_kinds()


@pytest.mark.serial  # a wall-clock bound (death noticed, a timeout, starved told from hung)
async def test_a_silent_actor_that_waits_for_cpu_is_starved_not_hung(tmp_path, monkeypatch):
    # Heavy load from other programs can keep a low-priority actor off the cores for longer than
    # the heartbeat timeout. The supervisor then asks the kernel (the actor's threads' run-queue
    # wait and state): while it keeps wanting CPU it is not declared dead; once it stops (hung,
    # stopped) it is, within 1.5 timeouts. The kernel's figures are simulated here: the actor
    # is stopped (silent) and "waits" for a CPU all the time for 3 s, then not at all.
    import chatlearn.actors.runtime as runtime_module
    from chatlearn.actors.process import CpuSample

    stopped_at = [float("inf")]

    def fake_cpu_sample(pid: int) -> CpuSample:
        waited = min(max(time.monotonic() - stopped_at[0], 0.0), 3.0)
        return CpuSample(on_cpu_ns=0, waiting_ns=int(waited * 1e9), runnable=False)

    def stopping() -> None:
        stopped_at[0] = time.monotonic()

    monkeypatch.setattr(runtime_module, "cpu_sample", fake_cpu_sample)
    _, error, elapsed = await _stop_actor_during_call(tmp_path, 1.0, stopping)
    assert "no heartbeat" in str(error)
    # alive while "starved" (3 s, three timeouts), dead within 1.5 timeouts after
    assert 3.0 < elapsed < 3.0 + 1.5 + DEATH_NOTICE_SECONDS, elapsed


@pytest.mark.serial  # a wall-clock bound (death noticed, a timeout, starved told from hung)
async def test_a_silent_actor_that_computes_holding_the_lock_is_not_hung(tmp_path, caplog):
    # A call that holds the interpreter lock for longer than the heartbeat timeout (a regex, a
    # huge json.loads) silences the actor's event loop; it runs all the while, so it is kept,
    # with one warning, and the call returns (it was declared hung after 1 s).
    cfg = _config(tmp_path)
    system = ActorSystem(cfg, heartbeat_interval=0.2, heartbeat_timeout=1.0)
    async with system:
        (group,) = await system.launch(lib.Recorder("m", cfg))
        assert await group.call(0, "hold_lock", 3.0) == "held"
        assert await group.call(0, "add", 1) == 1  # and it goes on
    assert "computing, not hung" in caplog.text
    assert "hung" not in system.event_kinds()


async def test_a_call_that_runs_long_without_call_timeout_is_told_of(tmp_path, caplog):
    # A call that waits with the interpreter lock released (a collective whose peer is gone)
    # keeps its actor heartbeating: with call_timeout null nothing ends it, so the coordinator
    # says which call has run how long, at the threshold and at twice the length (not at each
    # heartbeat); with call_timeout set it says nothing (the timeout will speak).
    cfg = _config(tmp_path)
    caplog.set_level(logging.WARNING, logger="chatlearn.actors")
    for call_timeout, expected in ((None, 2), (30.0, 0)):
        caplog.clear()
        system = ActorSystem(
            cfg,
            heartbeat_interval=0.1,
            heartbeat_timeout=2.0,
            long_call_warning=0.4,
            call_timeout=call_timeout,
        )
        async with system:
            (group,) = await system.launch(lib.Recorder("m", cfg))
            assert await group.call(0, "sleep", 1.5) == "slept"
            assert await group.call(0, "add", 1) == 1
        warnings = [r.getMessage() for r in caplog.records if "has been running" in r.getMessage()]
        assert len(warnings) == expected, warnings
        if expected:
            assert "'sleep'" in warnings[0] and "runtime.call_timeout" in warnings[0]
            assert f"pid {group[0].pid}" in warnings[0]


@pytest.mark.serial  # a wall-clock bound (death noticed, a timeout, starved told from hung)
def test_cpu_samples_tell_starved_from_sleeping_and_running() -> None:
    import subprocess
    import sys

    from chatlearn.actors.process import cpu_sample, running, starved

    if not hasattr(os, "SCHED_IDLE") or cpu_sample(os.getpid()) is None:
        pytest.skip("needs Linux schedstats")
    cpu = min(os.sched_getaffinity(0))

    def spinner(idle: bool) -> subprocess.Popen[bytes]:
        policy = "os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))" if idle else ""
        code = f"import os\nos.sched_setaffinity(0, [{cpu}])\n{policy}\nwhile True: pass"
        return subprocess.Popen([sys.executable, "-c", code])

    # on one core: the normal spinner runs, the idle one wants the core and does not get it
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        procs["running"] = spinner(idle=False)
        procs["idle"] = spinner(idle=True)
        procs["sleeper"] = sleeper = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(30)"]
        )
        time.sleep(1.0)  # started, pinned, idle policy set
        before = {name: cpu_sample(p.pid) for name, p in procs.items()}
        time.sleep(1.0)
        after = {name: cpu_sample(p.pid) for name, p in procs.items()}
    finally:
        for p in procs.values():
            p.kill()
            p.wait(10)
    verdict = {name: starved(before[name], after[name], 1.0) for name in procs}
    assert verdict == {"running": False, "idle": True, "sleeper": False}, (before, after)
    verdict = {name: running(before[name], after[name], 1.0) for name in procs}
    assert verdict == {"running": True, "idle": False, "sleeper": False}, (before, after)
    assert cpu_sample(sleeper.pid) is None  # gone


_SIGNAL_RECORDER = """
import os, signal, sys, time
out = sys.argv[-1]
def note(name, leave):
    with open(out, "a") as f:
        f.write(name + "\\n")
    if leave:
        os._exit(143)
signal.signal(signal.SIGTERM, lambda *_: note("SIGTERM", False))
signal.signal(int(sys.argv[-2]), lambda *_: note("TERMINATE_SIGNAL", True))
open(out + ".ready", "w").close()
time.sleep(30)
"""


def test_a_worker_under_a_shell_is_stopped_with_the_coordinators_signal(tmp_path):
    """A worker run by a shell (a remote actor's `Cluster.remote_command`, here with
    `--launcher local`) is a descendant of the process the coordinator spawned, and got the
    SIGTERM meant for the processes a module starts: it took it for a stop asked from outside
    the run and handed it to the coordinator (STOP), which could stop a failed run as if
    signalled (exit 143), and stayed until the SIGKILL after the grace. It now gets
    `TERMINATE_SIGNAL` and leaves at once."""
    from chatlearn.actors.process import TERMINATE_SIGNAL, terminate_processes

    out = tmp_path / "signals"
    worker = [sys.executable, "-c", _SIGNAL_RECORDER, "-m", "chatlearn.actors.worker"]
    command = f"trap '' TERM; {shlex.join([*worker, str(TERMINATE_SIGNAL), str(out)])}; exit $?"
    shell = subprocess.Popen(["/bin/sh", "-c", command], process_group=0)
    try:
        deadline = time.monotonic() + 10
        while not (tmp_path / "signals.ready").exists():
            assert time.monotonic() < deadline and shell.poll() is None
            time.sleep(0.02)
        start = time.monotonic()
        terminate_processes([shell], grace=5.0, kill_wait=1.0)
        assert time.monotonic() - start < 4.0  # not the grace (an orphan's reaping: ~1 s)
        assert out.read_text().split() == ["TERMINATE_SIGNAL"]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(shell.pid, signal.SIGKILL)
        shell.wait(5)
