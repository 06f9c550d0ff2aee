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
import shutil
from pathlib import Path

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
        super().__init__(f"{head}\n  fix: {fix}" if fix else head)

    def one_line(self) -> str:
        """`file:line: key: what is wrong (fix: ...)`, the form printed when a run stops."""
        return one_line(str(self))


def one_line(message: str) -> str:
    """A ConfigError's two-line text (`head` + `  fix: ...`) as one line; other text joined."""
    head, sep, fix = message.partition("\n  fix: ")
    head = " ".join(head.split())
    return f"{head} (fix: {' '.join(fix.split())})" if sep else head


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
    free = free_bytes(path)
    if free is not None and free < NEARLY_FULL_BYTES:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:200]
        return f"the file system is full ({free_space(path)}): {first}"
    return None


def free_space(path: str | Path) -> str:
    """``12 MiB free of 15 MiB`` for the file system of ``path`` (or of its nearest parent)."""
    try:
        usage = shutil.disk_usage(nearest_existing(Path(path)))
    except OSError:
        return "free space unknown"
    return f"{usage.free / 2**20:.0f} MiB free of {usage.total / 2**20:.0f} MiB"


def free_bytes(path: str | Path) -> int | None:
    try:
        return shutil.disk_usage(nearest_existing(Path(path))).free
    except OSError:
        return None


def nearest_existing(path: Path) -> Path:
    """``path``, or its nearest ancestor that exists."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
