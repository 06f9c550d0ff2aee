"""`chatlearn launch --max-restarts`: the restart decision, and real launches whose coordinator
dies (SIGKILL), fails (an exception) or is stopped (SIGTERM, Ctrl-C on a terminal). A DPO run
whose coordinator is killed and resumes from its checkpoint: tests/examples/test_example_chaos.py
(under launch, with the chaos harness)."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import shutil
import signal
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path

import pytest

from chatlearn.launch.supervise import STOP_SIGNALS, exit_code, restarts_in_window, should_restart

pytestmark = pytest.mark.timeout(60)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "engine"))
from resume_trials import alive, assert_all_exit  # noqa: E402

REPO = HERE.parents[1]
SCRIPT = HERE / "restart_script.py"
RESTART_LINE = "chatlearn launch: the coordinator (pid"


def killed(signum: int) -> int:
    """The wait status of a process killed by `signum`."""
    return int(signum)


def exited(code: int) -> int:
    """The wait status of a process that exited with `code`."""
    return code << 8


# -- the decision -----------------------------------------------------------------------------


def test_only_a_death_by_a_signal_that_is_not_a_stop_is_restarted():
    for signum in (signal.SIGKILL, signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS):
        assert should_restart(killed(signum), [], 0.0, 3, 3600.0)
    for signum in STOP_SIGNALS:
        assert not should_restart(killed(signum), [], 0.0, 3, 3600.0)
    for code in (0, 1, 2, 130, 137, 143):
        assert not should_restart(exited(code), [], 0.0, 3, 3600.0)
    assert not should_restart(killed(signal.SIGKILL), [], 0.0, 0, 3600.0)  # no budget at all


def test_the_budget_counts_only_restarts_within_the_window():
    history = [100.0, 200.0, 300.0]
    assert restarts_in_window(history, 310.0, 60.0) == 1
    assert restarts_in_window(history, 310.0, 250.0) == 3
    # three restarts within the hour: the budget of 3 is used up ...
    assert not should_restart(killed(signal.SIGKILL), history, 310.0, 3, 3600.0)
    assert should_restart(killed(signal.SIGKILL), history, 310.0, 4, 3600.0)
    # ... until the oldest one leaves the window
    assert not should_restart(killed(signal.SIGKILL), history, 3699.0, 3, 3600.0)
    assert should_restart(killed(signal.SIGKILL), history, 3700.0, 3, 3600.0)


def test_a_sigint_repeated_within_a_second_interrupts_the_coordinator_once():
    """A SIGINT sent to the launch's process group reaches the coordinator directly and then
    forwarded: before the engine's handlers, the copy interrupted the first one's clean-up
    (tracebacks, exit code 1 instead of 130). The child's handler takes it as one."""
    from chatlearn.launch.supervise import _interrupt_once_per_repeat

    def sigint(pause: float) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(pause)  # the handler runs within it

    previous = signal.getsignal(signal.SIGINT)
    try:
        _interrupt_once_per_repeat()
        with pytest.raises(KeyboardInterrupt):
            sigint(0.5)
        sigint(0.05)  # the forwarded copy, during the clean-up: nothing
        time.sleep(1.0)
        with pytest.raises(KeyboardInterrupt):  # a second request, later, interrupts again
            sigint(0.5)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _interrupt_once_per_repeat()  # an ignored SIGINT (nohup, a background job) stays so
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_exit_codes_are_the_shells():
    assert [exit_code(exited(c)) for c in (0, 1, 2, 143)] == [0, 1, 2, 143]
    assert exit_code(killed(signal.SIGKILL)) == 137
    assert exit_code(killed(signal.SIGSEGV)) == 128 + signal.SIGSEGV


# -- real launches ------------------------------------------------------------------------------


def launch_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "chatlearn.cli", "launch", *args]


def run_launch(
    *args: str, timeout: float = 40, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        launch_command(*args),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env=env,
    )


def start_launch(*args: str, **kwargs) -> subprocess.Popen[str]:
    defaults = {"stdin": subprocess.DEVNULL, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    return subprocess.Popen(launch_command(*args), cwd=REPO, text=True, **{**defaults, **kwargs})


def attempts(directory: Path) -> list[dict[str, int]]:
    path = directory / "attempts.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def wait_for(path: Path, proc: subprocess.Popen[str], within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not path.exists():
        assert proc.poll() is None, f"the launch ended with {proc.returncode} before {path.name}"
        assert time.monotonic() < deadline, f"no {path.name} within {within:g} s"
        time.sleep(0.02)


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def test_a_killed_coordinator_is_restarted_once_and_the_command_succeeds(tmp_path):
    result = run_launch("--max-restarts", "2", str(SCRIPT), "once", str(tmp_path))
    try:
        assert result.returncode == 0, result.stderr
        restarts = [x for x in result.stderr.splitlines() if x.startswith(RESTART_LINE)]
        first = int((tmp_path / "first").read_text())
        assert restarts == [
            f"{RESTART_LINE} {first}) was killed by SIGKILL; restart 1 of 2 (resuming from the "
            "newest checkpoint)"
        ]
        runs = attempts(tmp_path)
        assert [r["attempt"] for r in runs] == [0, 1]
        assert int((tmp_path / "second").read_text()) == runs[1]["pid"]
        assert runs[0]["ppid"] == runs[1]["ppid"]  # both children of the one supervisor
    finally:
        assert_all_exit([r["pid"] for r in attempts(tmp_path)])


def test_a_coordinator_that_keeps_dying_exhausts_the_restarts(tmp_path):
    # runtime directories of their own (another run's start-up would sweep them too)
    runtime_base = tempfile.mkdtemp(prefix="clrt-", dir="/tmp")
    env = {**os.environ, "XDG_RUNTIME_DIR": runtime_base}
    try:
        result = run_launch("--max-restarts", "2", str(SCRIPT), "always", str(tmp_path), env=env)
        left_over = os.listdir(runtime_base)
    finally:
        shutil.rmtree(runtime_base, ignore_errors=True)
    try:
        assert result.returncode == 128 + signal.SIGKILL, result.stderr
        assert [r["attempt"] for r in attempts(tmp_path)] == [0, 1, 2]
        lines = [x for x in result.stderr.splitlines() if x.startswith(RESTART_LINE)]
        assert len(lines) == 3
        assert "restart 1 of 2" in lines[0] and "restart 2 of 2" in lines[1]
        assert "killed by SIGKILL; restarts exhausted (2 of 2 within 60 min used, " in lines[2]
        assert "3 attempts in all); exiting with 137" in lines[2]
        # no actor on this machine removed them: the next coordinator swept its predecessor's,
        # the supervisor the last one's (it stayed, with its control socket)
        left = [Path((tmp_path / f"runtime-{n}").read_text()) for n in range(3)]
        assert all(path.parent == Path(runtime_base) for path in left)
        assert left_over == [], result.stderr
    finally:
        assert_all_exit([r["pid"] for r in attempts(tmp_path)])


def test_an_exception_is_final_exit_1_without_a_restart(tmp_path):
    result = run_launch("--max-restarts", "2", str(SCRIPT), "raise", str(tmp_path))
    try:
        assert result.returncode == 1, result.stderr
        assert "RuntimeError: a bug in the user's script" in result.stderr
        assert RESTART_LINE not in result.stderr
        assert [r["attempt"] for r in attempts(tmp_path)] == [0]
    finally:
        assert_all_exit([r["pid"] for r in attempts(tmp_path)])


def test_max_restarts_0_runs_the_script_in_the_launch_process(tmp_path):
    proc = start_launch("--max-restarts", "0", str(SCRIPT), "exit0", str(tmp_path))
    try:
        proc.wait(30)
        assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
        assert attempts(tmp_path) == [{"attempt": -1, "pid": proc.pid, "ppid": os.getpid()}]
    finally:
        stop(proc)
        proc.stdout.close(), proc.stderr.close()  # type: ignore[union-attr]
    # by default a child of the launch process runs it, told it is the first attempt
    proc = start_launch(str(SCRIPT), "exit0", str(tmp_path))
    try:
        proc.wait(30)
        assert proc.returncode == 0
        second = attempts(tmp_path)[1]
        assert second["attempt"] == 0 and second["ppid"] == proc.pid != second["pid"]
    finally:
        stop(proc)
        proc.stdout.close(), proc.stderr.close()  # type: ignore[union-attr]
        assert_all_exit([r["pid"] for r in attempts(tmp_path)])


@pytest.mark.parametrize("max_restarts", ["0", "2"])
@pytest.mark.parametrize("mode", ["interrupted", "keyboard", "stopped", "stopped_in_group"])
def test_an_uncaught_stop_on_sigint_exits_130(tmp_path, mode, max_restarts):
    # stopped: learn_async()'s TrainingStopped, an Exception, not a SystemExit
    result = run_launch("--max-restarts", max_restarts, str(SCRIPT), mode, str(tmp_path))
    try:
        assert result.returncode == 128 + signal.SIGINT, result.stderr
        assert "Aborted!" not in result.stderr and RESTART_LINE not in result.stderr
        assert "Traceback" not in result.stderr
        assert len(attempts(tmp_path)) == 1
    finally:
        assert_all_exit([r["pid"] for r in attempts(tmp_path)])


@pytest.mark.parametrize("times", [1, 2])
def test_sigterm_to_the_supervisor_is_forwarded_each_time_and_not_restarted(tmp_path, times):
    proc = start_launch(str(SCRIPT), "signals", str(tmp_path))
    try:
        wait_for(tmp_path / "ready", proc)
        for _ in range(times):
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.1)
        _, stderr = proc.communicate(timeout=20)
        assert proc.returncode == 128 + signal.SIGTERM, stderr
        assert json.loads((tmp_path / "signals.json").read_text()) == ["SIGTERM"] * times
        assert RESTART_LINE not in stderr and len(attempts(tmp_path)) == 1
    finally:
        stop(proc)
        assert_all_exit([r["pid"] for r in attempts(tmp_path)])


def test_sigint_to_the_launchs_process_group_exits_130_without_a_traceback(tmp_path):
    # the coordinator gets it twice (directly and forwarded): the copy interrupted the
    # clean-up of the first (exit code 1 and tracebacks)
    proc = start_launch(str(SCRIPT), "slow_cleanup", str(tmp_path), process_group=0)
    try:
        wait_for(tmp_path / "ready", proc)
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=20)
        assert proc.returncode == 128 + signal.SIGINT, stderr
        assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    finally:
        stop(proc)
        assert_all_exit([r["pid"] for r in attempts(tmp_path)])


def _controlling_terminal() -> None:
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def test_ctrl_c_on_a_terminal_reaches_the_coordinator_once(tmp_path):
    """The terminal sends SIGINT to the supervisor and the coordinator alike: not forwarded."""
    master, slave = pty.openpty()
    try:
        proc = start_launch(
            str(SCRIPT),
            "signals",
            str(tmp_path),
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
            preexec_fn=_controlling_terminal,
        )
    finally:
        os.close(slave)
    try:
        wait_for(tmp_path / "ready", proc)
        os.write(master, b"\x03")  # Ctrl-C
        proc.wait(20)
        assert proc.returncode == 128 + signal.SIGINT
        assert json.loads((tmp_path / "signals.json").read_text()) == ["SIGINT"]
        assert len(attempts(tmp_path)) == 1
    finally:
        stop(proc)
        os.close(master)
        assert_all_exit([r["pid"] for r in attempts(tmp_path)])


def test_a_killed_supervisor_takes_its_coordinator_along(tmp_path):
    proc = start_launch(str(SCRIPT), "sleep", str(tmp_path), stdout=subprocess.DEVNULL)
    try:
        wait_for(tmp_path / "ready", proc)
        proc.kill()
        proc.wait(10)
        assert_all_exit([r["pid"] for r in attempts(tmp_path)], within=5)
        assert RESTART_LINE not in proc.stderr.read()  # type: ignore[union-attr]
    finally:
        stop(proc)
        proc.stderr.close()  # type: ignore[union-attr]
        for pid in [r["pid"] for r in attempts(tmp_path)]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
