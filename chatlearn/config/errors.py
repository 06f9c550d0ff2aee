"""The one error type of configuration problems, and the shared logger.

Every user-facing config problem is a `ConfigError`: one line saying where (file and line when
the value came from YAML, else "config built in code"), which key (a dotted path such as
`runtime.train_global_batch_size`) and what is wrong, then a second line saying what to change.
It subclasses `ValueError` so code written against ChatLearn's asserts/ValueErrors still catches it.
What the user sees at the end of a run is `one_line()`: `where: key: problem (fix: ...)`.
"""

from __future__ import annotations

import errno
import logging
import re
import shutil
from pathlib import Path
from typing import Any

logger = logging.getLogger("chatlearn.config")

# Used as the location of values that did not come from a file.
IN_CODE = "config built in code"


class ConfigError(ValueError):
    """A configuration problem: where it is, which key, what is wrong and how to fix it."""

    def __init__(
        self,
        problem: str,
        *,
        where: str | None = None,
        key: str | None = None,
        fix: str | None = None,
    ) -> None:
        self.problem = problem
        self.where = where
        self.key = key
        self.fix = fix
        head = ": ".join(part for part in (where, key, problem) if part)
        super().__init__(f"{head}{_FIX}{fix}" if fix else head)

    def one_line(self) -> str:
        """`file:line: key: what is wrong (fix: ...)`, the form printed when a run stops."""
        return one_line(str(self))


_FIX = "\n  fix: "  # between a ConfigError's head and its fix (`ConfigError.__init__`)


def split_fix(message: str) -> tuple[str, str | None]:
    """(head, fix) of a ConfigError's text (fix None when it has none), e.g. of one raised in
    an actor, which arrives as text."""
    head, sep, fix = message.partition(_FIX)
    return head, (fix if sep else None)


def sample_where(index: int, split: str = "") -> str:
    """How an error names sample ``index`` of the ``split`` data set ("training", "eval"; ""
    outside a run), in the words `sample_named` reads back: the coordinator points a module's
    error about it at the record's file:line (chatlearn/engine/sample_errors.py)."""
    return f"sample {index} of the {split + ' ' if split else ''}data set"


_SAMPLE_WHERE = re.compile(r"sample (\d+) of the (\w+) data set")


def sample_named(message: str) -> tuple[int, str] | None:
    """(index, split) of the sample `sample_where` named in ``message``, or None."""
    found = _SAMPLE_WHERE.search(message)
    return (int(found.group(1)), found.group(2)) if found else None


def one_line(message: str) -> str:
    """A ConfigError's two-line text (`head` + `  fix: ...`) as one line; other text joined."""
    head, fix = split_fix(message)
    head = " ".join(head.split())
    return f"{head} (fix: {' '.join(fix.split())})" if fix is not None else head


class ValueProblem(Exception):
    """Raised by value checkers; the caller turns it into a ConfigError with location and key."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.fix = fix


def located_error(config: object, key: str, problem: str, fix: str) -> ConfigError:
    """The ConfigError of key path ``key``, at the file and line where ``config`` (a `Config`)
    has it written; unlocated for anything else (a config built in code by other means)."""
    error = getattr(config, "error", None)
    if callable(error):
        located: ConfigError = error(key, problem, fix)
        return located
    return ConfigError(problem, key=key, fix=fix)


# what a file system answers when it refuses writes for want of room or permission to grow:
# full, over quota, mounted read-only, past the file size limit (``ulimit -f``)
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})
# below this much free space a failed write is taken for a full disk (torch.save then says only
# "file write failed" or "unexpected pos", with no errno)
NEARLY_FULL_BYTES = 1 << 20


class StorageError(ConfigError):
    """The run's storage refused a write (``STORAGE_ERRNOS``, or a write that failed on a file
    system with no room left): what to change is the disk, not the program, so it is one line
    like a config error (exit 2), naming the path, the free space and what to do."""


def storage_problem(exc: BaseException, path: str | Path) -> str | None:
    """Why writing under ``path`` failed when the storage is the cause: the OS's words (and the
    free space); None when it is not (a bug of the code that wrote is shown as it is)."""
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:  # the error and what it came from
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in STORAGE_ERRNOS:
            return f"{error.strerror or error} ({free_space(path)})"
        error = error.__cause__ or error.__context__
    usage = disk_usage(path)
    if usage is not None and usage.free < NEARLY_FULL_BYTES:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:200]
        return f"the file system is full ({free_space(path, usage)}): {first}"
    return None


def storage_error(
    exc: BaseException,
    path: str | Path,
    what: str,
    then: str = " and run the same command again: it resumes from its newest checkpoint",
) -> StorageError | None:
    """``what`` (e.g. "writing the run's metrics") failed under ``path`` for want of storage:
    the one line saying so (where, the OS's words, the free space, what to do); None when the
    storage is not the cause."""
    problem = storage_problem(exc, path)
    if problem is None:
        return None
    return StorageError(f"{what} failed: {problem}", where=str(path), fix=f"free space there{then}")


def free_space(path: str | Path, usage: Any = None) -> str:
    """``12 MiB free of 15 MiB`` for the file system of ``path`` (or of its nearest parent)."""
    usage = usage or disk_usage(path)
    if usage is None:
        return "free space unknown"
    return f"{usage.free / 2**20:.0f} MiB free of {usage.total / 2**20:.0f} MiB"


def disk_usage(path: str | Path) -> Any:
    """`shutil.disk_usage` of the file system of ``path`` (or of its nearest parent); None
    when it cannot be read."""
    try:
        return shutil.disk_usage(nearest_existing(Path(path)))
    except OSError:
        return None


def nearest_existing(path: Path) -> Path:
    """``path``, or its nearest ancestor that exists."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
