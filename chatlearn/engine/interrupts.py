"""Ctrl-C, SIGTERM and SIGHUP in the coordinator: a graceful stop first, an immediate one on
repeat.

Runs in the coordinator.

``DPOEngine.learn_async`` installs :class:`SignalGuard` (``loop.add_signal_handler``, on the
main thread only; the previous handlers come back when it leaves) and routes the signals to
:class:`Interrupts`:

1. The first signal asks for a graceful stop: no new training step is sent, the running ones
   finish, a checkpoint is written if checkpoints are configured, every process is stopped. A
   watchdog turns it into an immediate stop after ``stop_timeout`` seconds, counted for the
   running steps and then again for the checkpoint.
2. A second signal (or the watchdog) stops at once: every actor process is killed and the run
   ends without a new checkpoint (the last complete one stays as it was). Under
   ``chatlearn launch`` (``dedupe``), the same signal again within ``SIGNAL_REPEAT_WINDOW``
   seconds of the first (chatlearn/actors/hosts.py) is not a second one but the same request
   arriving twice: ``kill -TERM -PGID`` (what process managers and schedulers send) reaches
   its coordinator both directly and forwarded by the supervisor, which cannot tell a signal
   sent to the group from one sent to itself alone. Run directly, a quick second Ctrl-C stops
   at once, as it always did.

Either way ``await learn_async()`` then raises :class:`TrainingStopped` (an ``Exception``:
catchable in any task) and ``learn()`` :class:`TrainingInterrupted`, a ``SystemExit`` whose
code is ``128 + signal`` (130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP), so an uncaught one
ends the script with the exit code shells and schedulers expect. The SIGINT one is also a
``KeyboardInterrupt``, so scripts that already catch that keep working. (Python turns an
uncaught *plain* ``KeyboardInterrupt`` into death by SIGINT, not exit code 130; the subclass
exits with 130.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from chatlearn.actors.hosts import SIGNAL_REPEAT_WINDOW

logger = logging.getLogger("chatlearn.engine")

# SIGHUP too: a closed terminal or ssh session, and what `chatlearn launch` forwards as a stop
# (it met the default action: the coordinator died at once, the steps since the last
# checkpoint lost). Not where it is ignored (nohup): that choice stands.
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class TrainingInterrupted(SystemExit):
    """Training stopped on a signal. ``code`` is the exit code (128 + signal number).

    ``checkpoint`` is the newest complete checkpoint when the run stopped (None without one).
    """

    def __init__(self, signum: int, checkpoint: Path | None = None) -> None:
        super().__init__(128 + int(signum))
        self.signum = int(signum)
        self.checkpoint = checkpoint

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


class TrainingKeyboardInterrupt(TrainingInterrupted, KeyboardInterrupt):
    """``TrainingInterrupted`` by SIGINT: also a ``KeyboardInterrupt`` (module docstring)."""


class TrainingStopped(Exception):
    """What ``learn_async()`` raises after stopping on a signal: an ordinary exception, since a
    ``SystemExit`` raised in an asyncio task leaves the event loop itself (asyncio re-raises
    it out of ``run_forever`` whoever awaits the task). ``learn()`` turns it into
    :class:`TrainingInterrupted` once its loop is closed (``as_exit()``)."""

    def __init__(self, signum: int, checkpoint: Path | None = None) -> None:
        self.signum = int(signum)
        self.checkpoint = checkpoint
        self.code = 128 + self.signum  # the exit code of a script that stops on it
        where = f"the newest checkpoint is {checkpoint}" if checkpoint else "no checkpoint"
        super().__init__(f"training stopped by {self.signal_name}; {where}")

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    def __reduce__(self) -> tuple[Any, ...]:  # pickled by its arguments, not its message
        return (type(self), (self.signum, self.checkpoint))

    @property
    def shell_exit_code(self) -> int:
        """What `chatlearn launch` exits with when a script leaves this uncaught."""
        return self.code

    def as_exit(self) -> TrainingInterrupted:
        return interrupted(self.signum, self.checkpoint)


def interrupted(signum: int, checkpoint: Path | None = None) -> TrainingInterrupted:
    """The exception ``learn()`` raises after stopping on ``signum``."""
    if signum == signal.SIGINT:
        return TrainingKeyboardInterrupt(signum, checkpoint)
    return TrainingInterrupted(signum, checkpoint)


class Interrupts:
    """Counts signals and escalates: graceful stop, then immediate stop (module docstring).

    ``graceful()`` starts a graceful stop and returns True, or returns False when there is
    nothing to stop gracefully (e.g. processes are still starting): then the stop is immediate.
    ``hard(reason)`` stops at once. Both are called on the event loop.
    """

    def __init__(
        self,
        *,
        graceful: Callable[[], bool],
        hard: Callable[[str], None],
        stop_timeout: float,
        saves: bool = True,
        dedupe: bool = False,
    ) -> None:
        self.saves = saves  # whether a graceful stop writes a checkpoint (the run saves at all)
        self.dedupe = dedupe  # a quick repeat of the first signal is the same request (launch)
        self.graceful = graceful
        self.hard = hard
        self.stop_timeout = stop_timeout
        self.signum: int | None = None  # the first signal: it decides the exit code
        self.count = 0
        self._first_at = 0.0  # time.monotonic() of the first signal
        self._watchdog: asyncio.TimerHandle | None = None
        self._saving = False  # the watchdog times the checkpoint's writing (`saving`)
        self._forwarded = False  # the first stop request came from an actor (`forwarded`)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def handle(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if (
            (self.dedupe or self._forwarded)
            and self.count == 1
            and signum == self.signum
            and time.monotonic() - self._first_at < SIGNAL_REPEAT_WINDOW
        ):
            logger.info(
                "%s received again within %g s: the same stop request (e.g. a signal to the "
                "process group that `chatlearn launch` forwards too); send it again to stop "
                "at once",
                name,
                SIGNAL_REPEAT_WINDOW,
            )
            return
        self.count += 1
        if self.signum is None:
            self.signum = signum
            self._first_at = time.monotonic()
        if self.count == 1 and self.graceful():
            logger.warning(
                "%s received: finishing the running training steps (at most %.0f s), then "
                "%s; send it again to stop at once",
                name,
                self.stop_timeout,
                "saving and stopping"
                if self.saves
                else "stopping without a checkpoint (neither save_episode_interval nor "
                "save_step_interval is set)",
            )
            loop = asyncio.get_running_loop()
            self._watchdog = loop.call_later(self.stop_timeout, self._expired)
            return
        if self.count == 1:
            logger.warning("%s received: stopping at once", name)
        else:
            logger.warning(
                "%s received (a second signal): stopping at once, without a checkpoint", name
            )
        self.hard(f"interrupted by {name}")

    def forwarded(self, signum: int, who: str) -> bool:
        """An actor of the run received ``signum`` from outside it (worker.py): a scheduler or
        service manager stopping a job signals every process of it (SLURM, systemd). A stop as
        if the coordinator had received it (the coordinator's own arriving within
        ``SIGNAL_REPEAT_WINDOW`` is the same request); once a stop is under way, nothing more.
        Returns True: the stop is the run's to make (the actor waits for it)."""
        if self.count:
            logger.info("%s received by %s as well", signal.Signals(signum).name, who)
            return True
        logger.warning("%s received by %s: the run stops", signal.Signals(signum).name, who)
        self._forwarded = True
        self.handle(signum)
        return True

    def saving(self) -> None:
        """A checkpoint is being written. During a graceful stop it gets ``stop_timeout``
        seconds of its own: the steps' allowance cut off the save that is the point of the
        graceful stop (a large model's checkpoint takes minutes), and the run ended at its
        previous checkpoint."""
        if self._watchdog is None:
            return
        self._watchdog.cancel()
        self._saving = True
        logger.warning(
            "writing the checkpoint (at most %.0f s); send the signal again to stop at once "
            "without it",
            self.stop_timeout,
        )
        loop = asyncio.get_running_loop()
        self._watchdog = loop.call_later(self.stop_timeout, self._expired)

    @contextlib.contextmanager
    def timing_save(self) -> Iterator[None]:
        """``with``: `saving` on entry, `saved` on exit, whatever the save did."""
        self.saving()
        try:
            yield
        finally:
            self.saved()

    def saved(self) -> None:
        """The checkpoint of `saving` is written (or failed): the rest of the stop gets
        ``stop_timeout`` again, timed as the steps were."""
        if self._watchdog is None or not self._saving:
            return
        self._watchdog.cancel()
        self._saving = False
        loop = asyncio.get_running_loop()
        self._watchdog = loop.call_later(self.stop_timeout, self._expired)

    def _expired(self) -> None:
        if self._saving:
            logger.error(
                "the checkpoint was not written within %.0f s; stopping at once (the newest "
                "complete checkpoint stays; raise runtime.stop_timeout for larger models)",
                self.stop_timeout,
            )
            self.hard(f"checkpoint not written within {self.stop_timeout:g} s")
            return
        logger.error(
            "the run did not stop within %.0f s of the signal; stopping at once", self.stop_timeout
        )
        self.hard(f"no graceful stop within {self.stop_timeout:g} s")

    def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None


class SignalGuard:
    """``with SignalGuard(callback):`` routes SIGINT/SIGTERM/SIGHUP to ``callback(signum)`` on the
    running loop, when on the main thread (elsewhere signals cannot be handled: a no-op).

    On leaving, the program's handlers are back as they were, also those of the loop itself (a
    web server's ``loop.add_signal_handler(SIGTERM, ...)``): ``remove_signal_handler`` deletes
    the loop's handler, so an embedding program ignored SIGTERM after ``learn_async()``.
    asyncio's loops show theirs (``_signal_handlers``): the guard replaces it for its duration
    and puts it back. uvloop hides them, so a loop handler there is left in place and runs as
    well (the guard takes the signal at the Python level)."""

    def __init__(self, callback: Callable[[int], None]) -> None:
        self.callback = callback
        self._previous: dict[int, Any] = {}  # signum -> Python-level handler before
        self._loop_previous: dict[int, Any] = {}  # signum -> the loop's handle before (asyncio)
        self._python_level: set[int] = set()  # taken with signal.signal, not the loop
        self._loop: asyncio.AbstractEventLoop | None = None

    def __enter__(self) -> SignalGuard:
        if threading.current_thread() is not threading.main_thread():
            return self
        loop = self._loop = asyncio.get_running_loop()
        shown = getattr(loop, "_signal_handlers", None)  # asyncio's loops: signum -> Handle
        for signum in map(int, HANDLED_SIGNALS):
            previous = signal.getsignal(signum)
            if signum == signal.SIGHUP and previous == signal.SIG_IGN:
                continue  # nohup: the program is to outlive its terminal
            if not isinstance(shown, dict) and getattr(previous, "__self__", None) is loop:
                # the loop has a handler of its own that it will not show: leave it in place
                signal.signal(signum, self._from_signal)
                self._python_level.add(signum)
                self._previous[signum] = previous
                continue
            try:
                before = shown.get(signum) if isinstance(shown, dict) else None
                loop.add_signal_handler(signum, self.callback, signum)
            except (NotImplementedError, RuntimeError, ValueError):  # no signals on this loop
                continue
            self._previous[signum] = previous
            if before is not None:
                self._loop_previous[signum] = before
        return self

    def _from_signal(self, signum: int, frame: object) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self.callback, signum)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._loop is not None or not self._previous
        for signum, previous in self._previous.items():
            before = self._loop_previous.get(signum)
            if self._loop is not None and signum not in self._python_level:
                self._loop.remove_signal_handler(signum)
                if before is not None and not self._loop.is_closed():
                    self._loop.add_signal_handler(signum, before._callback, *before._args)
                    continue
            # remove_signal_handler leaves the default; give back what was there (e.g. the
            # SIGINT handler of asyncio.Runner) so the program behaves as before learn()
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
        self._loop_previous.clear()
        self._python_level.clear()
