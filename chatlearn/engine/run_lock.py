"""One run at a time in an output directory (and in its checkpoint directory, when
``data_checkpoint_path`` puts it elsewhere).

Runs in the coordinator.

Two runs writing one output directory corrupt each other's work without a word: both append to
``metrics.jsonl`` (every step twice), overwrite each other's checkpoints, and a resume then
picks a mixture. `RunLock` holds an exclusive ``flock`` on ``<output>/.chatlearn.lock`` from an
engine's ``start()`` (engines with ``writes_output``, `DPOEngine` among them; after the config
is validated, before any process starts) to its ``stop()``; a second run gets a one-line config
error naming the key and the pid holding it. The kernel releases the lock when the process
ends, however it ends (SIGKILL included), so a dead run never blocks the next one, and a
coordinator restarted by `chatlearn launch` takes it again. The file stays (an empty file, not
a stale-pid protocol).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable
from pathlib import Path

from chatlearn.config.errors import ConfigError

LOCK_NAME = ".chatlearn.lock"


class RunLock:
    """``acquire()`` / ``release()`` (or ``with``): ``error(key, problem, fix)`` makes the
    ConfigError raised when another process holds the directory (`located_error`)."""

    def __init__(
        self,
        output: Path,
        error: Callable[[str, str, str], ConfigError],
        key: str = "runtime.output_dir",
    ) -> None:
        self.output = output
        self.error = error
        self.key = key  # the setting that names the directory, for the error
        self._fd: int | None = None

    def acquire(self) -> None:
        self.output.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.output / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            name = self.key.rsplit(".", 1)[-1]
            raise self.error(
                self.key,
                f"{self.output} is in use by another run (pid {holder}); two runs in one "
                "directory would overwrite each other's checkpoints (and records)",
                f"wait for that run to end, or give this one another {name}"
                + (" or exp_name" if name == "output_dir" else ""),
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Idempotent."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # releases the lock

    @staticmethod
    def holder(output: Path) -> int | None:
        """The pid of the live process that holds ``output``'s lock, or None; only looks
        (``/proc/locks``): taking the lock even for a moment could refuse a run starting then."""
        try:
            info = (output / LOCK_NAME).stat()
            table = Path("/proc/locks").read_text()
        except OSError:
            return None
        # the device as /proc/locks writes it (hex major:minor), then the inode
        device = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
        for line in table.splitlines():
            # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"
            fields = line.split()
            if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == device:
                pid = int(fields[4]) if fields[4].isdigit() else 0
                return pid or None  # 0: a process this pid namespace does not see
        return None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
