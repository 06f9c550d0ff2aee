"""Where sockets live: ipc:// files in a private runtime directory, or tcp:// on loopback.

Same-host traffic uses ``ipc://`` endpoints (Unix domain sockets) inside a `RuntimeDir`: a
directory only our user can enter (mode 0700), so no other local user can connect to an actor,
and which is removed with everything in it on `close()` (or at interpreter exit, as a fallback).
Cross-host endpoints are ``tcp://`` with an ephemeral port chosen by the kernel at bind time;
`tcp_endpoint` binds to loopback unless a host is given, so nothing is exposed by accident.

The coordinator owns the runtime directory; actors get its path and use
`RuntimeDir.attach(path)`, which never deletes it.

A coordinator killed with SIGKILL cannot remove its directory: its actors do (they are told its
path at start-up), and failing that the next coordinator's `sweep_stale` does.

`private_endpoint` is what an actor binds for its peers: the ipc endpoint in the runtime
directory, or — in a multi-host run, after `set_network_host(address)` — a tcp endpoint on this
host's address (secured with the run's CURVE keys, see security.py).
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import time
import weakref
from pathlib import Path

# sun_path is 108 bytes on Linux (104 on macOS) including the terminating NUL.
MAX_IPC_PATH_BYTES = 103


def _default_base() -> str:
    """$XDG_RUNTIME_DIR (a per-user tmpfs) when usable, else the temp dir, else /tmp."""
    candidates = [os.environ.get("XDG_RUNTIME_DIR", ""), tempfile.gettempdir(), "/tmp"]
    for candidate in candidates:
        # Leave room in sun_path for "/chatlearn-XXXXXXXX/<name>".
        if candidate and len(candidate) <= 48 and os.path.isdir(candidate):
            if os.access(candidate, os.W_OK | os.X_OK):
                return candidate
    return tempfile.gettempdir()


class RuntimeDir:
    """A private directory (mode 0700) for ipc sockets; removed on `close()`.

    Use as a context manager, or call `close()` in a ``finally``. A handle from `attach` refers
    to a directory someone else owns and leaves it in place.
    """

    def __init__(self, *, base: str | os.PathLike[str] | None = None, prefix: str = "chatlearn-"):
        base = os.fspath(base) if base else _default_base()
        sweep_stale(base, prefix)
        path = tempfile.mkdtemp(prefix=prefix, dir=base)
        os.chmod(path, 0o700)  # mkdtemp already does; say it, since it is the security boundary
        _write_owner(Path(path))
        self.path = Path(path)
        self._finalizer: weakref.finalize | None = weakref.finalize(
            self, shutil.rmtree, path, ignore_errors=True
        )

    @classmethod
    def attach(cls, path: str | os.PathLike[str]) -> RuntimeDir:
        """A handle on an existing private directory (created by another process's RuntimeDir)."""
        resolved = Path(path)
        info = resolved.stat()
        if not stat.S_ISDIR(info.st_mode):
            raise ValueError(f"runtime dir {resolved} is not a directory")
        if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
            raise ValueError(f"runtime dir {resolved} must be owned by us with mode 0700")
        handle = cls.__new__(cls)
        handle.path = resolved
        handle._finalizer = None
        return handle

    def ipc_endpoint(self, name: str) -> str:
        """``ipc://<dir>/<name>``: an endpoint to bind or connect, private to this directory."""
        if not name or "/" in name or "\0" in name or name in (".", ".."):
            raise ValueError(f"ipc endpoint name must be a plain file name, got {name!r}")
        path = self.path / name
        if len(os.fsencode(path)) > MAX_IPC_PATH_BYTES:
            raise ValueError(
                f"ipc path {path} is longer than {MAX_IPC_PATH_BYTES} bytes; use a shorter name"
                " or a RuntimeDir with a shorter base"
            )
        return f"ipc://{path}"

    @property
    def closed(self) -> bool:
        return self._finalizer is not None and not self._finalizer.alive

    def close(self) -> None:
        """Remove the directory and every socket file in it (owned handles only)."""
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> RuntimeDir:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RuntimeDir({str(self.path)!r})"


# Who created a runtime directory: "<pid> <start time of that pid>" (the pair survives pid reuse).
_OWNER_FILE = ".owner"


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot), or None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        if fields[0] in ("Z", "X"):  # dead, not yet reaped by its parent (a killed coordinator)
            return None
        return fields[19]
    except (OSError, IndexError):
        if not os.path.isdir("/proc"):  # not Linux: existence is all we can tell
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return None
            except PermissionError:
                pass
            return "?"
        return None


def _write_owner(path: Path) -> None:
    pid = os.getpid()
    (path / _OWNER_FILE).write_text(f"{pid} {_process_start(pid)}")


def sweep_dead_runs() -> list[Path]:
    """`sweep_stale` where runs make their directories: what a coordinator that died for good
    left, when no actor of it ran on this machine to remove it."""
    return sweep_stale(_default_base())


def sweep_stale(base: str | os.PathLike[str], prefix: str = "chatlearn-") -> list[Path]:
    """Remove the runtime directories in `base` whose creator is dead (a coordinator killed with
    SIGKILL, whose actors could not remove it either); returns them.

    Only directories that prove they are ours count: the name has `prefix`, the owner is this
    user, the mode is 0700, and an owner file names a process that no longer runs (a pid that
    was reused shows another start time). Anything else is left alone.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(base))
    except OSError:
        return removed
    for entry in entries:
        if entry.name.startswith(prefix) and remove_if_abandoned(entry.path):
            removed.append(Path(entry.path))
    return removed


def remove_if_abandoned(path: str | os.PathLike[str], wait: float = 0.0) -> bool:
    """Remove runtime directory `path` if it proves it is ours (this user's, mode 0700, an
    owner file) and the process that created it no longer runs (a pid that was reused shows
    another start time; a zombie is dead), waiting up to `wait` seconds for that process to
    end; True if it was removed. An actor whose coordinator seems gone (its parent died:
    under ``chatlearn launch --launcher local`` and on remote hosts that parent is a shell the
    coordinator stops while it restarts the actor) removes the run's directory only so: the
    live coordinator's sockets were removed with it. The wait: the signal of a parent's death
    comes while it exits, before /proc shows it dead (its other threads are torn down first;
    a GPU context's teardown takes seconds)."""
    try:
        info = os.stat(path, follow_symlinks=False)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            return False
        if stat.S_IMODE(info.st_mode) != 0o700:
            return False
        pid_text, _, started = (Path(path) / _OWNER_FILE).read_text().partition(" ")
        pid = int(pid_text)
    except (OSError, ValueError):
        return False
    deadline = time.monotonic() + wait
    while True:
        current = _process_start(pid)
        if current is None or (started not in ("?", "None") and current not in ("?", started)):
            shutil.rmtree(path, ignore_errors=True)
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def tcp_endpoint(host: str = "127.0.0.1") -> str:
    """A ``tcp://`` endpoint to bind on ``host`` with a kernel-chosen (ephemeral) port.

    Read the resolved port back from the channel's ``endpoint`` attribute after binding.
    """
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6 literal (the socket also needs zmq.IPV6 set)
    return f"tcp://{host}:*"


_network_host: str | None = None


def set_network_host(address: str | None) -> None:
    """Make `private_endpoint` bind tcp on `address` (this host as peers reach it); None: ipc."""
    global _network_host
    if address in ("0.0.0.0", "::", "*"):
        raise ValueError(f"refusing to bind every interface ({address}); give one address")
    _network_host = address


def network_host() -> str | None:
    return _network_host


def private_endpoint(runtime_dir: str | os.PathLike[str] | None, name: str) -> str:
    """An endpoint to bind that only this run's peers can use (see the module docstring)."""
    if _network_host is not None:
        return tcp_endpoint(_network_host)
    if runtime_dir is None:
        raise RuntimeError("this process has neither a runtime directory nor a network host")
    return RuntimeDir.attach(runtime_dir).ipc_endpoint(name)
