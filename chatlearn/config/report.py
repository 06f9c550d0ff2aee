"""How a config error reaches the user: one line on stderr and exit code 2, no traceback.

    file:line: key: what is wrong (fix: what to change)

`chatlearn.init()` installs `excepthook` (chained to the hook that was there), so a `ConfigError`
that nothing catches — raised by `init()` itself or later, e.g. by placement in `engine.learn()`
or by a module's `setup()` in an actor — ends the script that way. Scripts that catch
`ConfigError` keep working: `init()` raises, only the uncaught error is printed by the hook.
`chatlearn launch` reports the errors of the script it runs itself (`report_and_exit`).
`CHATLEARN_DEBUG=1` (or `chatlearn launch --debug`) prints the full traceback instead.
"""

from __future__ import annotations

import os
import signal
import sys
from types import TracebackType
from typing import NoReturn

from .errors import ConfigError

DEBUG_ENV_VAR = "CHATLEARN_DEBUG"
EXIT_CODE = 2  # a usage error, as for command-line tools (argparse, click)

__all__ = [
    "DEBUG_ENV_VAR",
    "EXIT_CODE",
    "config_error_line",
    "debug_enabled",
    "excepthook",
    "install_excepthook",
    "report_and_exit",
    "shell_exit_code",
]


def debug_enabled() -> bool:
    """Whether config errors show their traceback (`CHATLEARN_DEBUG` set and not 0/false)."""
    value = os.environ.get(DEBUG_ENV_VAR, "").strip().lower()
    return value not in ("", "0", "false", "no", "off")


def config_error_line(exc: BaseException) -> str | None:
    """The one line of a config error, or None when `exc` is not one.

    A config error is a `ConfigError`, or an error that stands for one raised elsewhere: an
    `ActorError` whose remote type was a ConfigError answers `config_error_line()` itself.
    """
    if isinstance(exc, ConfigError):
        return exc.one_line()
    remote = getattr(exc, "config_error_line", None)
    if callable(remote):
        line = remote()
        return line if isinstance(line, str) else None
    return None


def report_and_exit(exc: BaseException) -> NoReturn:
    """Print the one line of config error `exc` to stderr and exit with code 2."""
    line = config_error_line(exc)
    if line is None:
        raise exc
    print(line, file=sys.stderr, flush=True)
    raise SystemExit(EXIT_CODE)


def excepthook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    """`sys.excepthook` of scripts that called `chatlearn.init()`; other errors pass through."""
    previous = getattr(excepthook, "previous", sys.__excepthook__)
    line = config_error_line(exc)
    if line is None:
        previous(exc_type, exc, tb)
        return
    if debug_enabled():
        previous(exc_type, exc, tb)
    else:
        print(line, file=sys.stderr, flush=True)
    # SystemExit raised by the hook is honoured by the interpreter: a normal exit (atexit
    # handlers and finalizers run, so no actor or runtime directory is left) with our code.
    sys.exit(EXIT_CODE)


def install_excepthook() -> None:
    """Make `excepthook` the process's hook, chained to the current one (idempotent)."""
    if sys.excepthook is excepthook:
        return
    excepthook.previous = sys.excepthook  # type: ignore[attr-defined]
    sys.excepthook = excepthook


def shell_exit_code(exc: BaseException) -> int | None:
    """The exit code a command ends with for an interrupt: a KeyboardInterrupt's 130 (the code
    of learn()'s TrainingInterrupted, a SystemExit too, for its signal), learn_async()'s
    TrainingStopped's, also inside the exception group of a TaskGroup that ran it (when it is
    all the group holds); None for anything else (click would turn a KeyboardInterrupt into
    "Aborted!" and exit code 1). A name of its own: the actors' errors carry an exit_code too,
    their process's (a config error that ended an actor's start-up exited 3 without its
    line)."""
    if isinstance(exc, KeyboardInterrupt):
        code = exc.code if isinstance(exc, SystemExit) else None
        return code if isinstance(code, int) else 128 + signal.SIGINT
    code = getattr(exc, "shell_exit_code", None)
    if isinstance(code, int):
        return code
    if isinstance(exc, BaseExceptionGroup):
        codes = [shell_exit_code(inner) for inner in exc.exceptions]
        if codes and None not in codes:
            return codes[0]
    return None
