"""What an actor is told on its stdin at start-up, and never on its command line.

Runs on both sides: the coordinator writes the line (``remote.py``), the actor reads it
(``worker.py``).

Everything in a command line or an environment block is readable by every user of the machine
(``ps``, ``/proc/<pid>/cmdline``; the environment by the same user in ``/proc/<pid>/environ``
and, for remote actors, in the ssh command). So the coordinator writes one JSON line to each
actor's stdin and keeps the pipe open:

- ``identity``: its routing identity (with a random part, so another process cannot guess it),
- ``security``: the run's secret and CURVE keys (`chatlearn.transport.security.RunSecurity`),
- ``env``: the variables forwarded to it that are not needed to start the interpreter (on a
  remote host: everything but `STARTUP_NAMES`; here: the secret-looking names, see `is_secret`),
  set in its environment before any user code or heavy import runs,
- ``cleanup``: directories it removes if the coordinator dies without removing them (the run's
  ipc directory; on the coordinator's machine only).

The end of stdin then tells the actor that its coordinator (or the ssh connection to it) is gone.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import IO, Any

from chatlearn.transport.security import RunSecurity

__all__ = ["STARTUP_NAMES", "Bootstrap", "is_secret", "split_environment"]

# Variables the interpreter or the dynamic loader read before our code runs: they must be in the
# spawn command's environment. Anything else reaches the actor on stdin.
STARTUP_NAMES = frozenset(
    {"PATH", "LD_LIBRARY_PATH", "LD_PRELOAD", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"}
)
_STARTUP_PREFIXES = ("PYTHON",)

_SECRET_NAME = re.compile(
    r"TOKEN|SECRET|PASSWORD|PASSWD|PASSPHRASE|CREDENTIAL|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|AUTH",
    re.IGNORECASE,
)
_MAX_LINE = 1 << 20


def is_secret(name: str) -> bool:
    """Whether a variable's name says it holds a secret (HF_TOKEN, WANDB_API_KEY, ...)."""
    return bool(_SECRET_NAME.search(name))


def split_environment(
    env: Mapping[str, str], *, remote: bool
) -> tuple[dict[str, str], dict[str, str]]:
    """``(command, stdin)``: the variables for the spawn command and those sent on stdin.

    A secret-looking name always goes on stdin. On a remote host every variable does, except
    those the interpreter needs at start-up (`STARTUP_NAMES`, ``PYTHON*``).
    """
    command: dict[str, str] = {}
    stdin: dict[str, str] = {}
    for name, value in env.items():
        startup = name in STARTUP_NAMES or name.startswith(_STARTUP_PREFIXES)
        if is_secret(name) or (remote and not startup):
            stdin[name] = value
        else:
            command[name] = value
    return command, stdin


@dataclass(frozen=True, kw_only=True)
class Bootstrap:
    """One actor's start-up line (see the module docstring)."""

    identity: str
    security: RunSecurity | None = None
    env: dict[str, str] = field(default_factory=dict)
    cleanup: list[str] = field(default_factory=list)

    def to_line(self) -> bytes:
        payload: dict[str, Any] = {
            "identity": self.identity,
            "security": self.security.to_payload() if self.security is not None else None,
            "env": self.env,
            "cleanup": self.cleanup,
        }
        return json.dumps(payload).encode() + b"\n"

    @classmethod
    def from_line(cls, line: bytes) -> Bootstrap:
        try:
            payload = json.loads(line)
            identity = payload["identity"]
            security = payload.get("security")
            env = payload.get("env") or {}
            cleanup = payload.get("cleanup") or []
            if not isinstance(identity, str) or not identity:
                raise ValueError("identity must be a non-empty string")
            if not isinstance(env, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in env.items()
            ):
                raise ValueError("env must map names to strings")
            if not isinstance(cleanup, list) or not all(isinstance(p, str) for p in cleanup):
                raise ValueError("cleanup must be a list of paths")
            return cls(
                identity=identity,
                security=None if security is None else RunSecurity.from_payload(security),
                env=dict(env),
                cleanup=list(cleanup),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"bad start-up line on stdin: {exc}") from None

    @classmethod
    def read(cls, stream: IO[bytes]) -> Bootstrap:
        """The first line of `stream` (the actor's stdin)."""
        line = stream.readline(_MAX_LINE)
        if not line.endswith(b"\n"):
            raise ValueError("no start-up line on stdin (actors are started by a coordinator)")
        return cls.from_line(line)

    def __repr__(self) -> str:  # the env may hold secrets
        return f"Bootstrap(identity={self.identity!r}, env={sorted(self.env)}, ...)"
