"""Running the command: in its own process group, under the monkey if a plan has events, and
killing its whole tree when it ends, times out or is interrupted."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from chatlearn.chaos.monkey import ChaosEvent, ChaosMonkey, ChaosPlan


@dataclass(slots=True)
class RunResult:
    """One run of the command: how it ended and what the monkey did to it."""

    name: str
    pid: int
    exit_code: int | None  # Popen's: negative for a signal; None if it could not be reaped
    seconds: float
    timed_out: bool = False
    interrupted: bool = False
    events: list[ChaosEvent] = field(default_factory=list)
    monkey_outcome: str = ""
    actors_seen: bool | None = None  # ChaosMonkey.actors_seen
    planned: int = 0
    killed: int = 0  # processes of the run's tree or group the harness killed after it
    log: Path | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and not self.interrupted

    def describe(self) -> str:
        if self.exit_code is None:
            how = "did not exit"
        elif self.exit_code < 0:
            how = f"killed by {signal.Signals(-self.exit_code).name}"
        else:
            how = f"exit {self.exit_code}"
        if self.timed_out:
            how += " (timed out: the harness killed it)"
        if self.interrupted:
            how += " (interrupted: the harness killed it)"
        if self.killed and not (self.timed_out or self.interrupted):
            how += f" (it left {self.killed} process(es) behind: killed)"
        return f"{how} after {self.seconds:.1f} s"


class Terminated(Exception):
    """SIGTERM or SIGHUP (``signum``) reached the harness: stop the run as for Ctrl-C."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(signum)
        self.signum = int(signum)


def run_command(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float,
    plan: ChaosPlan | None = None,
    log: Path | None = None,
    name: str = "run",
    poll: float = 0.05,
) -> RunResult:
    """Run ``argv`` in its own process group until it exits, with a :class:`ChaosMonkey` on it
    if ``plan`` has events, and kill its whole tree after ``timeout`` seconds or on Ctrl-C
    (KeyboardInterrupt is re-raised after the cleanup). Output goes to ``log`` if given."""
    out = log.open("ab") if log is not None else None
    started = time.monotonic()
    popen: subprocess.Popen[bytes] | None = None
    monkey = None
    try:
        # A stop signal while the run starts (inside Popen, whose child already runs) raised
        # before anything owned the run, and left it going on: it is raised once it is owned.
        with signals_deferred():
            popen = subprocess.Popen(
                list(argv),
                env=dict(env) if env is not None else None,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT if out is not None else None,
                process_group=0,
            )
            planned = plan.total if plan else 0
            result = RunResult(name, popen.pid, None, 0.0, log=log, planned=planned)
        if plan is not None and plan.total > 0:
            monkey = ChaosMonkey(popen.pid, plan, timeout=timeout, poll=poll).start()
        try:
            popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            result.timed_out = True
    except (KeyboardInterrupt, Terminated):
        if popen is not None:
            result.interrupted = True
        raise
    finally:
        # a second Ctrl-C (or SIGTERM, SIGHUP) in the seconds this takes stopped it halfway, the
        # tree frozen by kill_tree's SIGSTOP and left so: it is raised once the tree is gone
        with signals_deferred():
            if monkey is not None:
                monkey.stop()
                monkey.join(5.0)
                result.events = list(monkey.events)
                result.monkey_outcome = monkey.outcome
                result.actors_seen = monkey.actors_seen
            if popen is not None:
                # Also after a clean exit: what the run left in its process group goes too.
                result.killed = kill_tree(popen, pgid=popen.pid)
                result.exit_code = popen.returncode
                result.seconds = time.monotonic() - started
            if out is not None:
                out.close()
    return result


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP received in the block are held until it ends, then raised to the
    handlers of before (the first of them: one is enough to stop). Main thread only, where
    Python runs its signal handlers; elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    # a handler not set from Python (None) could not be put back: that signal is not held
    stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.getsignal(sig) for sig in stops}
    previous = {sig: handler for sig, handler in previous.items() if handler is not None}
    try:
        # inside the try: a signal between two of these, raised by a handler not yet replaced,
        # leaves none of them replaced
        for sig in previous:
            signal.signal(sig, lambda signum, frame: received.append(signum))
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if received:
            signal.raise_signal(received[0])


def kill_tree(
    popen: subprocess.Popen[Any] | int, *, pgid: int | None = None, grace: float = 5.0
) -> int:
    """Kill a process, its descendants and the process group ``pgid`` (default: the process's
    own group, unless it is ours); returns how many processes it killed, a Popen's root aside.

    The tree is first frozen with SIGSTOP, in bounded passes until no new descendant shows up,
    so that nothing spawns or respawns meanwhile; then every member gets SIGKILL and SIGCONT.
    Waits up to ``grace`` seconds for them to be gone (a zombie counts as gone: its parent, or
    init, reaps it), reaping ``popen`` when it is a Popen. The group of a root that is gone
    can still be killed by its pgid (Linux reuses no pid while its group has members).
    """
    pid = popen if isinstance(popen, int) else popen.pid
    if pgid is None:
        with contextlib.suppress(ProcessLookupError):
            pgid = os.getpgid(pid)
    if pgid == os.getpgid(0):
        pgid = None  # never our own group
    roots: list[psutil.Process] = []
    if isinstance(popen, int) or popen.returncode is None:  # a reaped pid may be someone else's
        with contextlib.suppress(psutil.NoSuchProcess):
            roots.append(psutil.Process(pid))
    members: dict[int, psutil.Process] = {}
    for _ in range(20):
        found = list(roots)
        for proc in [*roots, *members.values()]:
            with contextlib.suppress(psutil.Error):
                found += proc.children(recursive=True)
        added = [p for p in found if p.pid not in members and _alive(p)]
        for proc in added:
            members[proc.pid] = proc
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGSTOP)
        if not added:
            break
    if pgid is not None:
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error, OSError):
                if proc.pid not in members and os.getpgid(proc.pid) == pgid and _alive(proc):
                    members[proc.pid] = proc
        for sig in (signal.SIGKILL, signal.SIGCONT):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, sig)
    for proc in members.values():
        for sig in (signal.SIGKILL, signal.SIGCONT):
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)  # psutil checks it is still the same process
    if not isinstance(popen, int):
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(timeout=grace)
    deadline = time.monotonic() + grace
    others = [p for p in members.values() if p.pid != pid or isinstance(popen, int)]
    remaining = others
    while remaining and time.monotonic() < deadline:
        remaining = [p for p in remaining if _alive(p)]
        if remaining:
            time.sleep(0.02)
    return len(others)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
