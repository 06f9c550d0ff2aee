"""Where an actor system starts its processes: this machine, or the hosts of a multi-host run.

Runs in the coordinator.

The actor runtime needs a few things from whatever spreads a run over several machines; `Hosts`
says what. `chatlearn launch` implements it (`chatlearn.launch.Cluster`) and, for the script it
runs in its own process, installs it with `set_default_hosts`; an `ActorSystem` created without
hosts then uses it. The runtime never imports the launcher: it only knows this interface.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from chatlearn.config.entry import LAUNCH_ENV_VAR

if TYPE_CHECKING:
    from chatlearn.actors.bootstrap import Bootstrap
    from chatlearn.actors.placement import HostResources
    from chatlearn.transport.security import TcpSecurity

__all__ = ["LAUNCH_ENV_VAR", "Hosts", "default_hosts", "is_local_host", "set_default_hosts"]

#: set by ``chatlearn launch`` in a coordinator it restarted (launch/supervise.py): how many
#: times it did; the engine reports it (not secret)
COORDINATOR_RESTARTS_ENV_VAR = "CHATLEARN_COORDINATOR_RESTARTS"
#: a repeat of the first stop signal within this many seconds is the same request, for the
#: engine's handlers and for ``chatlearn launch``'s coordinator before they are in place: a
#: signal to the launch's process group reaches the coordinator twice, directly and forwarded
#: by the supervisor; a person pressing Ctrl-C again to stop at once takes longer than that
SIGNAL_REPEAT_WINDOW = 1.0
_LOCAL_NAMES = {"localhost", "127.0.0.1", "::1"}


class Hosts(Protocol):
    """The hosts of a multi-host run, as the runtime plans over them and starts actors on them."""

    keys: TcpSecurity  # the run's CURVE keys (cross-host sockets)

    @property
    def master_addr(self) -> str:
        """This machine's address that every host reaches (the coordinator's tcp endpoint)."""
        ...

    def host_resources(self, local: HostResources) -> list[HostResources]:
        """Each host's usable devices (`local`: this machine's, detected)."""
        ...

    def address_of(self, host: str) -> str: ...

    def rendezvous_port(self, host: str) -> int:
        """A port for torch.distributed's store on `host`."""
        ...

    def spawn(
        self, host: str, worker_args: Sequence[str], extra_env: Mapping[str, str], boot: Bootstrap
    ) -> subprocess.Popen[bytes]:
        """Start one worker on `host`, handing it `boot` on its stdin (kept open)."""
        ...

    def describe_exit(self, host: str, code: int | None) -> str:
        """Why a worker's launcher process ended, if the launcher knows ("" otherwise)."""
        ...


def is_local_host(name: str) -> bool:
    """Whether `name` is this machine (host names are case-insensitive)."""
    name = name.lower()
    return name in _LOCAL_NAMES or name == socket.gethostname().lower()


_default: Hosts | None = None


def set_default_hosts(hosts: Hosts | None) -> None:
    """The hosts of the `chatlearn launch` running in this process (None: it ended)."""
    global _default
    _default = hosts


def default_hosts() -> Hosts | None:
    """The hosts an `ActorSystem` uses when given none: a launch's, or None (this machine)."""
    if _default is None and os.environ.get(LAUNCH_ENV_VAR):
        raise RuntimeError(
            f"{LAUNCH_ENV_VAR} is set, but this process was not started by `chatlearn launch`: "
            "run the script with `chatlearn launch --hostfile ...`, or unset it"
        )
    return _default
