"""`chatlearn launch --max-restarts N`: a coordinator that dies is restarted and resumes.

The launch process becomes a small supervisor, like torchrun's agent. It forks a child that runs
the script exactly as ``--max-restarts 0`` runs it in-process, and waits for it:

- A child killed by a signal other than SIGINT, SIGTERM or SIGHUP (SIGKILL from the OOM killer,
  SIGSEGV, SIGABRT, SIGBUS, ...) is a dead coordinator. Its actors exit by themselves (they watch
  their parent), and after a short pause a new child runs the script again, which resumes from
  the newest complete checkpoint (``runtime.enable_resume_training``). At most ``max_restarts``
  restarts fall within any ``window`` seconds; the child sees how many came before it in
  ``CHATLEARN_COORDINATOR_RESTARTS``.
- Any exit code is final, 1 included (an exception the script's output already shows): the
  supervisor exits with it. A signal death it does not restart exits with 128 + the signal.

Fork, not a new interpreter: the run's CURVE keys exist in this process's memory only, and a
forked child inherits them without their being written to a file, argv or the environment.

Signals: SIGINT, SIGTERM and SIGHUP sent to the supervisor are forwarded to the child, each one
(the child's first is a graceful stop, its second an immediate one), and no restart follows.
A signal from the terminal (Ctrl-C, a hang-up) reaches the child directly, as the child is in
the terminal's foreground process group too, so it is not forwarded: the child would see it
twice. A signal another process sends to the whole group (``kill -TERM -PGID``) cannot be told
from one sent to the supervisor alone, so the child gets it twice, directly and forwarded: the
coordinator takes its first signal repeated within a second as one request
(`chatlearn.engine.interrupts`; before the engine's handlers, `_interrupt_once_per_repeat`).
The child is killed if the supervisor dies (PR_SET_PDEATHSIG), so a killed launch leaves no
coordinator behind, and then no actor.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import NoReturn

from chatlearn.actors.hosts import COORDINATOR_RESTARTS_ENV_VAR, SIGNAL_REPEAT_WINDOW
from chatlearn.actors.process import set_parent_death_signal
from chatlearn.transport.endpoints import sweep_dead_runs

__all__ = [
    "RESTARTS_ENV_VAR",
    "STOP_SIGNALS",
    "exit_code",
    "restarts_in_window",
    "should_restart",
    "supervise",
]

RESTARTS_ENV_VAR = COORDINATOR_RESTARTS_ENV_VAR

# Signals that mean "stop": a child they kill is not restarted, and once the supervisor got one
# it restarts nothing any more.
STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP})

# The pause before a restart, so that the dead coordinator's actors have exited.
RESTART_PAUSE = 1.0


# si_code of a signal the kernel sends itself, e.g. the terminal's SIGINT on Ctrl-C (Linux).
_SI_KERNEL = 0x80


def restarts_in_window(history: Sequence[float], now: float, window: float) -> int:
    """How many of the restarts at times `history` (seconds) lie within `window` before `now`."""
    return sum(1 for t in history if now - t < window)


def should_restart(
    status: int, history: Sequence[float], now: float, max_restarts: int, window: float
) -> bool:
    """Whether a child that ended with wait status `status` at `now` is restarted: it was killed
    by a signal that is not a stop signal, and fewer than `max_restarts` of the earlier restarts
    (their times in `history`) lie within `window` seconds."""
    if not os.WIFSIGNALED(status) or os.WTERMSIG(status) in STOP_SIGNALS:
        return False
    return restarts_in_window(history, now, window) < max_restarts


def exit_code(status: int) -> int:
    """The exit code a shell reports for wait status `status` (128 + signal after a kill)."""
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def supervise(run: Callable[[], None], *, max_restarts: int, window: float) -> int:
    """Run `run` in forked children, restarting dead ones (module docstring); the exit code.

    The stop signals and SIGCHLD stay blocked in this process when it returns: it exits next,
    with the child's code, and a late Ctrl-C must not change that.
    """
    watched = {*STOP_SIGNALS, signal.SIGCHLD}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, watched)
    history: list[float] = []  # when restarts happened (time.monotonic())
    stops: list[int] = []  # stop signals received, in order
    attempts = 0
    while True:
        attempts += 1
        pid = _fork(run, restarts=attempts - 1, mask=mask)
        status = _wait(pid, stops)
        now = time.monotonic()
        if stops or not should_restart(status, history, now, max_restarts, window):
            _sweep()
            if os.WIFSIGNALED(status) and os.WTERMSIG(status) not in STOP_SIGNALS and not stops:
                used = restarts_in_window(history, now, window)
                _say(
                    f"the coordinator (pid {pid}) was killed by {_name(os.WTERMSIG(status))}; "
                    f"restarts exhausted ({used} of {max_restarts} within {_minutes(window)} "
                    f"used, {attempts} attempts in all); exiting with {exit_code(status)}"
                )
            return exit_code(status)
        used = restarts_in_window(history, now, window) + 1
        _say(
            f"the coordinator (pid {pid}) was killed by {_name(os.WTERMSIG(status))}; restart "
            f"{used} of {max_restarts} (resuming from the newest checkpoint)"
        )
        history.append(now)
        if _pause(RESTART_PAUSE, stops):
            _sweep()
            return 128 + stops[0]


def _sweep() -> None:
    """Remove what the dead coordinator left in its runtime directory when no actor of it ran
    on this machine to do so (every model on other hosts): the next run on this machine would,
    but the last one's stayed otherwise (with its control socket)."""
    with contextlib.suppress(Exception):
        sweep_dead_runs()


def _fork(run: Callable[[], None], *, restarts: int, mask: set[int]) -> int:
    """Fork a child that runs `run` and exits; its pid."""
    for stream in (sys.stdout, sys.stderr):  # or the child would print what is buffered again
        with contextlib.suppress(Exception):
            stream.flush()
    supervisor = os.getpid()
    pid = os.fork()
    if pid == 0:
        _child(run, restarts=restarts, supervisor=supervisor, mask=mask)
    return pid


def _child(run: Callable[[], None], *, restarts: int, supervisor: int, mask: set[int]) -> NoReturn:
    """The coordinator: runs `run` and leaves with ``os._exit``, never returning into the stack
    of the supervisor (click's, the launch command's `finally` blocks) that it was forked from."""
    code = 1
    try:
        set_parent_death_signal(signal.SIGKILL)
        if os.getppid() == supervisor:  # else the supervisor died before the line above
            _interrupt_once_per_repeat()
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            os.environ[RESTARTS_ENV_VAR] = str(restarts)
            code = _run_as_main(run)
    except BaseException as exc:  # a failure of the lines above, not of the script
        with contextlib.suppress(BaseException):
            sys.__excepthook__(type(exc), exc, exc.__traceback__)
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(BaseException):
                stream.flush()
        os._exit(code)


def _interrupt_once_per_repeat() -> None:
    """Python's SIGINT handler (a `KeyboardInterrupt`), but a repeat within `SIGNAL_REPEAT_WINDOW`
    seconds is the same request and ignored: a SIGINT sent to the launch's process group reaches
    the coordinator twice, directly and forwarded, and before the engine's handlers (which take
    it as one request too) the second interrupted the first one's clean-up, with tracebacks and
    exit code 1 instead of 130. An ignored SIGINT, or a handler of the user's, is left alone."""
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return
    last: list[float] = []

    def handler(signum: int, frame: object) -> None:
        now = time.monotonic()
        if last and now - last[0] < SIGNAL_REPEAT_WINDOW:
            return
        last[:] = [now]
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)


def _run_as_main(run: Callable[[], None]) -> int:
    """Run `run`, then do what the interpreter does when a script ends: the exit code of an
    uncaught `SystemExit` or exception (shown by ``sys.excepthook``, which may exit itself, as
    chatlearn's does for config errors), a wait for non-daemon threads, the atexit functions
    (the runtime's cleanup among them)."""
    try:
        try:
            run()
            code = 0
        except SystemExit:
            raise
        except BaseException as exc:
            sys.excepthook(type(exc), exc, exc.__traceback__)
            code = 1
    except SystemExit as stop:
        code = _system_exit_code(stop)
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    return code


def _system_exit_code(stop: SystemExit) -> int:
    """The exit code of an uncaught `SystemExit`, as the interpreter computes it."""
    if stop.code is None:
        return 0
    if isinstance(stop.code, int):
        return stop.code & 0xFF
    print(stop.code, file=sys.stderr)
    return 1


def _wait(pid: int, stops: list[int]) -> int:
    """Wait for child `pid` and return its wait status, forwarding stop signals to it (those
    the terminal sent reach it directly) and appending them to `stops`."""
    watched = {*STOP_SIGNALS, signal.SIGCHLD}
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        # SIGCHLD ends the wait when the child exits; the timeout only bounds a missed one
        info = signal.sigtimedwait(watched, 1.0)
        if info is None or info.si_signo not in STOP_SIGNALS:
            continue
        stops.append(info.si_signo)
        if info.si_code != _SI_KERNEL:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, info.si_signo)


def _pause(seconds: float, stops: list[int]) -> bool:
    """Sleep `seconds`, or less if a stop signal comes (appended to `stops`; returns True)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        info = signal.sigtimedwait(STOP_SIGNALS, left)
        if info is not None:
            stops.append(info.si_signo)
            return True
    return False


def _say(line: str) -> None:
    print(f"chatlearn launch: {line}", file=sys.stderr, flush=True)


def _name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:g} min"
