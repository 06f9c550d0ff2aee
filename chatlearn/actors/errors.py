"""Errors of the actor runtime, as the coordinator sees them.

Runs in the coordinator, which raises these to its callers; ``ModuleError`` is also raised in
the actor processes (``module.py``).

Two kinds of failure reach a caller of an actor:

- `ActorError`: the user's code raised inside an actor (in a step, in `setup()`, while the
  user's module was imported). The wire worked; the error carries the remote traceback and where
  it happened (model, rank, replica, host, method). It is a `RemoteError`, so code that already
  handles transport-level remote errors handles it too.
- `ActorDeadError`: the actor process is gone or no longer answers (crash, `os._exit`, kill -9,
  OOM, a hang noticed by the heartbeat, a call that exceeded its timeout). It names the model,
  rank, host, pid, and the exit code or signal, with the last lines the process wrote to stderr.

`PlacementError` is a configuration error: the models' device requests do not fit the host.
`ModuleError` is what `BaseModule.error()` raises inside an actor.

An `ActorError` whose remote type was a `ConfigError` (a module's `setup()` rejecting its model
arguments, say) is a config error too: `config_error_line()` gives its one line, which is what
the user sees when it stops the run (`chatlearn.config.report`).
"""

from __future__ import annotations

import signal
from typing import Any, Self

from chatlearn.actors.identity import ActorIdentity
from chatlearn.config.errors import ConfigError, one_line
from chatlearn.transport.errors import RemoteError

__all__ = [
    "ActorDeadError",
    "ActorError",
    "ActorSystemClosedError",
    "ActorTimeoutError",
    "ModuleError",
    "PlacementError",
    "describe_exit_code",
    "shell_signal",
]


def describe_exit_code(exit_code: int | None) -> str:
    """Human text for a `Popen.returncode` (negative means killed by that signal)."""
    if exit_code is None:
        return "still running"
    if exit_code < 0:
        try:
            name = signal.Signals(-exit_code).name
        except ValueError:
            name = f"signal {-exit_code}"
        return f"killed by {name} (exit code {exit_code})"
    return f"exit code {exit_code}"


def shell_signal(exit_code: int | None) -> int | None:
    """The signal a shell's exit status reports (128 + signal, as ``sh`` exits when its command
    was killed: a remote actor's, whose ssh client passes it on), or None."""
    if exit_code is not None and 128 < exit_code <= 128 + 64:
        return exit_code - 128
    return None


# Remote type names that mean a config error (ConfigError and its subclasses, by convention).
_CONFIG_ERROR_NAMES = ("ConfigError", "PlacementError", "StorageError")


class ActorError(RemoteError):
    """The user's code raised inside an actor; carries the remote traceback and its location."""

    def __init__(
        self,
        type_name: str,
        message: str,
        remote_traceback: str = "",
        context: dict[str, Any] | None = None,
        *,
        exit_code: int | None = None,
    ) -> None:
        super().__init__(type_name, message, remote_traceback, context)
        # Set for startup failures, after which the actor process exits.
        self.exit_code = exit_code

    @classmethod
    def from_remote(cls, err: RemoteError, **context: Any) -> ActorError:
        """Wrap a transport `RemoteError`, filling in location keys the peer did not send."""
        merged = {**{k: v for k, v in context.items() if v is not None}, **err.context}
        return cls(err.type_name, err.message, err.remote_traceback, merged)

    @property
    def model(self) -> str | None:
        return self.context.get("model")

    @property
    def rank(self) -> int | None:
        return self.context.get("rank")

    @property
    def replica_id(self) -> int | None:
        return self.context.get("replica_id")

    @property
    def host(self) -> str | None:
        return self.context.get("host")

    @property
    def method(self) -> str | None:
        return self.context.get("method")

    @property
    def is_config_error(self) -> bool:
        """Whether the remote error was a ConfigError (or a subclass named so)."""
        return self.type_name.rpartition(".")[2].endswith(_CONFIG_ERROR_NAMES)

    def config_error_line(self) -> str | None:
        """`file:line: key: problem (fix: ...) [model ..., rank ..., in ...]`, for config errors."""
        if not self.is_config_error:
            return None
        where = [
            f"model {self.model}" if self.model else "",
            f"rank {self.rank}" if self.rank is not None else "",
            f"in {self.method}" if self.method else "",
        ]
        context = ", ".join(part for part in where if part)
        return f"{one_line(self.message)} [{context}]" if context else one_line(self.message)

    def __str__(self) -> str:
        text = super().__str__()
        if self.exit_code is not None:
            text += f"\n(the actor process then exited: {describe_exit_code(self.exit_code)})"
        return text


class ActorDeadError(RuntimeError):
    """An actor process died or stopped answering; every other actor of the run is stopped."""

    def __init__(
        self,
        model: str,
        rank: int,
        host: str,
        *,
        replica_id: int = 0,
        pid: int | None = None,
        exit_code: int | None = None,
        reason: str = "",
        stderr_tail: str = "",
        remote_traceback: str = "",
    ) -> None:
        self.model = model
        self.rank = rank
        self.replica_id = replica_id
        self.host = host
        self.pid = pid
        self.exit_code = exit_code
        self.reason = reason
        self.stderr_tail = stderr_tail
        self.remote_traceback = remote_traceback
        super().__init__(self._headline())

    @classmethod
    def of(cls, actor: ActorIdentity, **details: Any) -> Self:
        """The error of ``actor`` (its model, replica, rank and host); ``details`` are the
        constructor's other keywords (``pid``, ``reason``, ...; ``method`` and ``timeout`` for
        an ``ActorTimeoutError``)."""
        return cls(actor.model, actor.rank, actor.host, replica_id=actor.replica_id, **details)

    @property
    def signal(self) -> int | None:
        """The signal that killed the process, if it was killed by one."""
        if self.exit_code is not None and self.exit_code < 0:
            return -self.exit_code
        return None

    def _headline(self) -> str:
        where = f"model {self.model!r} replica {self.replica_id} rank {self.rank}"
        proc = f"pid {self.pid} on {self.host}" if self.pid else f"on {self.host}"
        what = self.reason or describe_exit_code(self.exit_code)
        if self.reason and self.exit_code is not None:
            what += f"; {describe_exit_code(self.exit_code)}"
        return f"actor {where} ({proc}) is dead: {what}"

    def __str__(self) -> str:
        parts = [self._headline()]
        if self.remote_traceback:
            parts.append("--- remote traceback ---\n" + self.remote_traceback.rstrip())
        if self.stderr_tail:
            parts.append("--- last lines of its stderr ---\n" + self.stderr_tail.rstrip())
        return "\n".join(parts)


class ActorTimeoutError(ActorDeadError, TimeoutError):
    """A call did not finish within its timeout; the actor is considered hung and is stopped."""

    def __init__(self, model: str, rank: int, host: str, *, method: str, timeout: float, **kw):
        self.method = method
        self.timeout = timeout
        kw.setdefault("reason", f"call {method!r} did not finish within {timeout:g} s (hung)")
        super().__init__(model, rank, host, **kw)


class ActorLostError(ActorDeadError):
    """An actor died, hung or (with ``restart_on_error``) failed, and the runtime is restarting
    it under the run's restart policy (``runtime.py``): its calls failed with this error. The
    caller may wait for ``ActorSystem.wait_ready(model, replica)`` and send them again.

    ``cause`` is what happened (an ``ActorDeadError``, or an ``ActorError`` from user code);
    ``attempt`` counts the restarts of the model so far, this one included.
    """

    def __init__(self, cause: BaseException, *, model: str, replica_id: int, attempt: int) -> None:
        self.cause = cause
        self.attempt = attempt
        super().__init__(
            model,
            int(getattr(cause, "rank", 0) or 0),
            str(getattr(cause, "host", "") or ""),
            replica_id=replica_id,
            pid=getattr(cause, "pid", None),
            exit_code=getattr(cause, "exit_code", None),
            reason=f"restarting (restart {attempt}): {one_line(_first_line(cause))}",
            stderr_tail=str(getattr(cause, "stderr_tail", "") or ""),
            remote_traceback=str(getattr(cause, "remote_traceback", "") or ""),
        )


class ActorSystemClosedError(RuntimeError):
    """The actor system was shut down (normally); no more calls can be made."""


class PlacementError(ConfigError):
    """The models' `num_gpu` / `num_cpu` / `*_per_process` requests do not fit the host.

    A `ConfigError` (so a `ValueError`): the message names the keys and what to change.
    """


class ModuleError(RuntimeError):
    """Raised by `BaseModule.error(msg)`: the module reports a fatal error of its own."""


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]
