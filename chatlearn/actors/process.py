"""OS-process plumbing for actors: spawn, watch stderr, terminate trees, notice parent death.

Runs on both sides: the coordinator spawns workers from a clean interpreter
(`python -m chatlearn.actors.worker`, never fork) and tears whole process trees down with
terminate → bounded wait → kill; the worker asks the kernel to signal it when its parent dies.
Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import signal
import socket
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import psutil

__all__ = [
    "CpuSample",
    "StderrTail",
    "cpu_sample",
    "descendants",
    "exited",
    "free_tcp_port",
    "set_parent_death_signal",
    "spawn_worker",
    "starved",
    "terminate_processes",
    "TERMINATE_SIGNAL",
]

# The directory that holds the `chatlearn` package, so a worker imports the same code even when
# the package is used from a source tree that is not installed.
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


def worker_environment(
    extra: Mapping[str, str], base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The coordinator's environment (or `base`) plus `extra` (pinning, distributed rendezvous)."""
    env = dict(os.environ if base is None else base)
    path = env.get("PYTHONPATH", "")
    if _PACKAGE_ROOT not in path.split(os.pathsep):
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, path) if p)
    env["PYTHONUNBUFFERED"] = "1"  # tracebacks and logs reach us before a crash, not after
    env.update(extra)
    return env


@dataclass(frozen=True)
class CpuSample:
    """What the threads of one process did with the CPU, from ``/proc/<pid>/task/*``: total
    time on a CPU and total time runnable but waiting for one (ns), and whether one of them is
    runnable right now."""

    on_cpu_ns: int
    waiting_ns: int
    runnable: bool


def cpu_sample(pid: int) -> CpuSample | None:
    """A `CpuSample` of process ``pid``, or None where that is unknown (not Linux, no
    schedstats, the process is gone).

    A silent actor that wants CPU and does not get it is starved by other load (its compute
    thread runs at a low priority and holds the interpreter lock the heartbeat needs), not hung:
    a hung or stopped process sleeps and wants nothing. (A thread the kernel never picks has its
    waiting time counted only once it runs, hence also ``runnable``.)
    """
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    on_cpu = waiting = 0
    runnable = seen = False
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                fields = f.read().split()
            with open(f"/proc/{pid}/task/{task}/stat") as f:
                state = f.read().rpartition(")")[2].split()[0]
        except (OSError, IndexError):
            continue  # the thread exited meanwhile
        if len(fields) >= 2 and fields[0].isdigit() and fields[1].isdigit():
            on_cpu += int(fields[0])
            waiting += int(fields[1])
            runnable = runnable or state == "R"
            seen = True
    return CpuSample(on_cpu, waiting, runnable) if seen else None


def running(before: CpuSample, after: CpuSample, seconds: float) -> bool:
    """Whether a process ran at least half the time between two samples ``seconds`` apart: a
    silent one that does is computing in a call that holds the interpreter lock (a C extension,
    a regex that backtracks, a huge ``json.loads``), which the heartbeat waits for; a Python
    loop lets the heartbeat run, and a hang or a stop runs nothing."""
    return (after.on_cpu_ns - before.on_cpu_ns) / 1e9 >= 0.5 * seconds


def starved(before: CpuSample, after: CpuSample, seconds: float) -> bool:
    """Whether a process wanted CPU and mostly did not get it between two samples
    ``seconds`` apart: its threads waited for a CPU at least half the time, or one is runnable
    now and together they ran less than half the time (a busy loop runs; a hang sleeps)."""
    waited = (after.waiting_ns - before.waiting_ns) / 1e9
    ran = (after.on_cpu_ns - before.on_cpu_ns) / 1e9
    return waited >= 0.5 * seconds or (after.runnable and ran < 0.5 * seconds)


def spawn_worker(
    args: Sequence[str], env: Mapping[str, str], startup_line: bytes = b""
) -> subprocess.Popen[bytes]:
    """Start `python -m chatlearn.actors.worker ARGS` with stderr piped (see `StderrTail`),
    write `startup_line` (bootstrap.py) to its stdin and keep the pipe open: its end tells the
    worker that we are gone. Close it (`close_stdin`) only once the worker has exited."""
    popen = subprocess.Popen(
        [sys.executable, "-m", "chatlearn.actors.worker", *args],
        env=dict(env),
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        close_fds=True,
        # Own process group: a signal sent to the coordinator's (a terminal's Ctrl-C,
        # `kill -TERM -PGID`) reaches the coordinator, which stops actors in order; actors of a
        # coordinator that dies are stopped by their parent-death signal. Not a new session:
        # the actors share the coordinator's autogroup, so their nice values rank their
        # threads against each other (see `worker_core.apply_priority`).
        process_group=0,
    )
    write_startup_line(popen, startup_line)
    return popen


def write_startup_line(popen: subprocess.Popen[bytes], line: bytes) -> None:
    """Hand a just-started worker its start-up line (a pipe buffer holds it: no blocking)."""
    assert popen.stdin is not None
    with contextlib.suppress(OSError):  # it died at once: its exit code tells why
        popen.stdin.write(line)
        popen.stdin.flush()


def close_stdin(popens: Iterable[subprocess.Popen[bytes]]) -> None:
    """Close the stdin pipes of exited workers (a live one would take it as our death)."""
    for popen in popens:
        if popen.stdin is not None and popen.poll() is not None:
            with contextlib.suppress(OSError):
                popen.stdin.close()


class StderrTail:
    """Forwards a child's stderr to ours, line by line, and keeps the last lines for errors."""

    def __init__(self, stream: IO[bytes], prefix: str, *, max_lines: int = 40) -> None:
        self._stream = stream
        self._prefix = prefix
        self._lines: deque[str] = deque(maxlen=max_lines)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"stderr {prefix}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            for raw in iter(self._stream.readline, b""):
                line = raw.decode("utf-8", "replace").rstrip("\n")
                with self._lock:
                    self._lines.append(line)
                with contextlib.suppress(Exception):
                    sys.stderr.write(f"{self._prefix} {line}\n")
        with contextlib.suppress(OSError):
            self._stream.close()

    def text(self) -> str:
        with self._lock:
            return "\n".join(self._lines)

    def join(self, timeout: float) -> None:
        """Wait (bounded) until the child's stderr is drained; it ends when the child exits."""
        self._thread.join(timeout)


def _tree(pid: int) -> list[psutil.Process]:
    try:
        parent = psutil.Process(pid)
        return [parent, *parent.children(recursive=True)]
    except psutil.Error:
        return []


def exited(popen: subprocess.Popen[bytes]) -> bool:
    """Whether the worker `popen` has exited, without reaping it (`Popen.poll` would): until it
    is reaped its pid, and with it its process group id, cannot go to another process."""
    if popen.returncode is not None:
        return True
    try:
        return os.waitid(os.P_PID, popen.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # reaped elsewhere
        return True


def descendants(popens: Iterable[subprocess.Popen[bytes]]) -> list[psutil.Process]:
    """The processes the workers `popens` started, and theirs, while still findable.

    Two ways, as a worker's children outlive it (SIGKILL, a crash, os._exit in user code):
    its process tree, and its process group (`spawn_worker` makes its pid the group id, and
    children inherit the group), where a child re-parented to init is still found. Only for
    workers not yet reaped (`Popen.returncode` is None): a reaped worker's pid, and so a group
    of that id, may be another process's by now. The `psutil.Process` objects refuse to signal
    a process whose pid was reused since (they check its create_time).

    Not found: a process that left both, a double-forked daemon that re-parented itself to init
    in a session of its own (setsid, start_new_session) before we looked.
    """
    pgids = {popen.pid for popen in popens if popen.returncode is None}
    found: dict[int, psutil.Process] = {}
    for pid in pgids:
        found.update((proc.pid, proc) for proc in _tree(pid)[1:])
    if pgids:
        for proc in psutil.process_iter():
            with contextlib.suppress(OSError):
                if proc.pid not in pgids and os.getpgid(proc.pid) in pgids:
                    found.setdefault(proc.pid, proc)
    return list(found.values())


def terminate_processes(
    popens: Iterable[subprocess.Popen[bytes]],
    *,
    grace: float = 3.0,
    kill_wait: float = 3.0,
    extra: Iterable[psutil.Process] = (),
) -> None:
    """Stop every process and all its `descendants` (and `extra`, found earlier):
    SIGTERM (`TERMINATE_SIGNAL` to workers, also one a shell runs) → wait `grace` → SIGKILL.

    Descendants are collected before anything is signalled: once a parent dies its children are
    re-parented and can no longer be found from it. The direct children are reaped through their
    `Popen` so that their exit codes stay readable.
    """
    popens = list(popens)
    found = {proc.pid: proc for proc in extra}
    found.update((proc.pid, proc) for proc in descendants(popens))
    procs = list(found.values())
    for popen in popens:
        if popen.poll() is None:
            with contextlib.suppress(OSError):
                popen.send_signal(TERMINATE_SIGNAL)
                popen.send_signal(signal.SIGCONT)  # a stopped process acts on it only then
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            if _is_worker(proc):  # run by a shell (a remote actor's, launch/cluster.py)
                proc.send_signal(TERMINATE_SIGNAL)
            else:
                proc.terminate()
            proc.resume()
    _wait(popens, procs, grace)
    for popen in popens:
        if popen.poll() is None:
            with contextlib.suppress(OSError):
                popen.kill()
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    _wait(popens, procs, kill_wait)


def _is_worker(proc: psutil.Process) -> bool:
    """Whether `proc` is a worker (``-m chatlearn.actors.worker``). One that a shell runs (a
    remote actor's, launch/cluster.py) is a descendant of the process we spawned: SIGTERM, what
    the processes a module started get, is to a worker a stop of the whole run asked from
    outside it (worker.py, `Worker._on_sigterm`), which it handed to the coordinator (STOP)
    instead of leaving."""
    with contextlib.suppress(psutil.Error):
        args = proc.cmdline()
        return any(
            flag == "-m" and module == "chatlearn.actors.worker"
            for flag, module in zip(args, args[1:], strict=False)
        )
    return False


def _wait(popens: list[subprocess.Popen[bytes]], procs: list[psutil.Process], timeout: float):
    import time

    deadline = time.monotonic() + timeout
    for popen in popens:
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(max(0.0, deadline - time.monotonic()))
    with contextlib.suppress(psutil.Error):
        psutil.wait_procs(procs, timeout=max(0.0, deadline - time.monotonic()))


def kill_own_children(grace: float = 1.0) -> None:
    """In a worker about to exit: stop the processes it started (DataLoader workers, a
    module's own subprocesses) and theirs: SIGTERM → wait `grace` → SIGKILL.

    Not covered: a process that has already left our tree (a double-forked daemon, re-parented
    to init before we look), and everything when we die without running this (SIGKILL, a
    crash, os._exit in user code): the coordinator then stops what is left in our process group
    (`descendants`)."""
    children = _tree(os.getpid())[1:]
    for proc in children:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    with contextlib.suppress(psutil.Error):
        _, alive = psutil.wait_procs(children, timeout=grace)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()


_PR_SET_PDEATHSIG = 1

# The signal a worker gets when its coordinator dies. Not SIGTERM: the kernel sends it when the
# *thread* that forked us exits, and while a killed coordinator's other threads are still being
# torn down our parent pid has not changed yet, so a SIGTERM from the dying coordinator would
# look just like the SIGTERM of an orderly stop. A real-time signal of our own is unambiguous.
PARENT_DEATH_SIGNAL: int = (
    int(signal.SIGRTMIN) + 1 if hasattr(signal, "SIGRTMIN") else int(signal.SIGTERM)
)


# The signal the coordinator stops a worker with (`terminate_processes`): a worker leaves at once
# on it. SIGTERM from anyone else is a stop of the whole run asked from outside (a scheduler or
# service manager signals every process of a job: SLURM, systemd), which a worker hands to the
# coordinator (worker.py, `Worker._on_sigterm`). Its default action, before a worker's handler
# is in place or in any other process (an ssh client of a remote actor), terminates, as SIGTERM's.
TERMINATE_SIGNAL: int = (
    int(signal.SIGRTMIN) + 2 if hasattr(signal, "SIGRTMIN") else int(signal.SIGTERM)
)


def set_parent_death_signal(sig: int = PARENT_DEATH_SIGNAL) -> bool:
    """Ask Linux to send `sig` to this process when its parent dies; False where unsupported.

    Note the kernel's notion of "parent" is the thread that forked us, which is why the
    coordinator spawns workers from its event-loop thread, never from a short-lived thread.
    Until a handler is installed, the signal's default action (terminate) applies.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A port that is free now, for torch.distributed's MASTER_PORT (rank 0 binds it itself,
    seconds later, once its interpreter and torch are up).

    Taken outside the kernel's ephemeral range when it can be: a port from ``bind(0)`` is in
    that range, where any process's next outgoing connection or ``bind(0)`` may be given it
    before rank 0 binds it (EADDRINUSE: a model that failed to start, seen with test runs side
    by side). Outside it, only a process that names the port can take it."""
    low, high = _ephemeral_ports()
    spans = [(a, b) for a, b in ((15000, low), (high + 1, 65536)) if b - a >= 100]
    chooser = random.Random()  # never the seeded global generator: runs would pick alike
    for _ in range(64 if spans else 0):
        first, end = spans[chooser.randrange(len(spans))]
        port = chooser.randrange(first, end)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _ephemeral_ports() -> tuple[int, int]:
    """The kernel's range for ports it hands out itself (Linux; its default elsewhere)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


class CpuAffinityError(ValueError):
    """The cores this actor was placed on are not this host's (more host-file slots than the
    host has cores): a start-up configuration error, said once by the actor, never a crash to
    restart. ``fix`` says what to change."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.fix = fix


def apply_cpu_affinity_from_env(host: str | None = None) -> tuple[int, ...]:
    """Pin this process to `CHATLEARN_CPU_AFFINITY` (set by the spawner); returns the cores.

    On a CPU-only host of a host file, slot i is core i: a core the host does not have is a
    `CpuAffinityError` naming `host` (psutil's "invalid CPU 6; choose between [0, 1]" named
    neither the host nor the host file).
    """
    spec = os.environ.get("CHATLEARN_CPU_AFFINITY", "")
    cpus = tuple(int(c) for c in spec.split(",") if c.strip())
    if not cpus:
        return cpus
    where = f"host {host or socket.gethostname()}"
    count = len(psutil.cpu_times(percpu=True))  # the cores psutil (and the kernel) accept
    missing = [c for c in cpus if not 0 <= c < count]
    if missing:
        raise CpuAffinityError(
            f"{where}: slot {missing[0]} is CPU core {missing[0]}, but the host has {count} "
            f"core{'s' if count != 1 else ''} (0-{count - 1})",
            f"list it with at most slots={count} in the host file: a CPU-only host's slots "
            "are its cores",
        )
    try:
        psutil.Process().cpu_affinity(list(cpus))
    except (OSError, ValueError) as exc:  # cores outside a container's cpuset, say
        allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        raise CpuAffinityError(
            f"{where}: cannot pin to cores {list(cpus)} ({exc}); this process may use {allowed}",
            "select slots of cores the host lets it use (--include/--exclude or the host file)",
        ) from None
    return cpus
