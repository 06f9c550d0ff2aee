"""The hosts of a multi-host run, as the coordinator's `ActorSystem` uses them.

`chatlearn launch --hostfile ...` makes a `Cluster` (a `LaunchSpec`: hosts, master address, how to
reach hosts, the exported environment; and the run's CURVE keys, in memory only), sets
``CHATLEARN_LAUNCH`` and runs the script in its own process, where it is the default hosts of
every `ActorSystem` (`chatlearn.actors.hosts.set_default_hosts`). The `ActorSystem` then plans
placement over `Cluster.hosts` and starts each actor with `Cluster.spawn`:

- on this machine: ``python -m chatlearn.actors.worker`` as in a single-host run (ipc control);
- on another host: ``ssh HOST 'cd CWD && exec env K=V... PYTHON -m chatlearn.actors.worker ...'``
  (the ssh command is configurable; ``launcher="local"`` runs the same shell command here, for
  hosts that are other addresses of this machine). The actor connects back to the coordinator's
  tcp endpoint on `LaunchSpec.master_addr`.

Every actor reads its start-up line (identity, the run's credentials, the forwarded environment:
actors/bootstrap.py) from its stdin, never from its command line, and then keeps watching stdin: end
of file means its coordinator (or the ssh connection to it) is gone, and it exits. Stopping the ssh
client therefore stops the remote actor too.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from chatlearn.actors.bootstrap import Bootstrap, split_environment
from chatlearn.actors.errors import describe_exit_code, shell_signal
from chatlearn.actors.hosts import LAUNCH_ENV_VAR, is_local_host
from chatlearn.actors.placement import HostResources
from chatlearn.actors.process import free_tcp_port, worker_environment, write_startup_line
from chatlearn.launch.hostfile import HostSlots
from chatlearn.transport.security import TcpSecurity

__all__ = [
    "LAUNCH_ENV_VAR",
    "Cluster",
    "LaunchSpec",
    "check_master_addr",
    "local_address_towards",
]

DEFAULT_SSH_COMMAND = ("ssh", "-T", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10")
LAUNCHERS = ("ssh", "local")
SSH_FAILED = 255  # ssh's exit code for its own failures (unreachable host, auth, ...)

# What the processes between the coordinator and a remote actor (the ssh client, the shells of
# `remote_command` and of the "local" launcher) run with. A scheduler or service manager
# stopping a job sends SIGTERM to every process of it (SLURM, systemd): they died of it, the
# actor was lost with them ("exited unexpectedly", or ssh's 255), and the run's graceful stop
# that the SIGTERM asked for was lost too (a restart, or a failure). Ignoring it, they stay
# while the actor hands the SIGTERM to the coordinator (worker.py); the coordinator stops them
# with `TERMINATE_SIGNAL`, whose default action ends them. ssh keeps a SIGTERM ignored at its
# start ignored; the worker sets it back to the default first thing.
_IGNORE_SIGTERM = "trap '' TERM"


@dataclass(kw_only=True)
class LaunchSpec:
    """What `chatlearn launch` hands the coordinator (JSON, no secrets in it)."""

    hosts: list[HostSlots]
    master_addr: str
    launcher: str = "ssh"
    ssh_command: list[str] = field(default_factory=lambda: list(DEFAULT_SSH_COMMAND))
    env: dict[str, str] = field(default_factory=dict)
    cwd: str = field(default_factory=os.getcwd)
    slots_are: str = "auto"  # "gpus", "cpus", or "auto" (gpus if this machine has any)
    python: str = sys.executable

    def __post_init__(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"launcher must be one of {LAUNCHERS}, got {self.launcher!r}")
        if self.slots_are not in ("auto", "gpus", "cpus"):
            raise ValueError(f"slots_are must be auto, gpus or cpus, got {self.slots_are!r}")
        if self.master_addr in ("0.0.0.0", "::", "*", ""):
            raise ValueError("master_addr must be one address reachable from every host")

    def save(self, path: str | Path) -> None:
        data = asdict(self)
        data["hosts"] = [{"name": h.name, "slots": list(h.slots)} for h in self.hosts]
        Path(path).write_text(json.dumps(data))

    @classmethod
    def load(cls, path: str | Path) -> LaunchSpec:
        data = json.loads(Path(path).read_text())
        data["hosts"] = [HostSlots(h["name"], tuple(h["slots"])) for h in data["hosts"]]
        return cls(**data)


def local_address_towards(host: str) -> str:
    """This machine's address on the route to `host` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect((socket.gethostbyname(host), 9))
        except OSError:
            return "127.0.0.1"
        return str(sock.getsockname()[0])


def check_master_addr(address: str) -> None:
    """Refuse a master address this machine cannot bind, in one line naming ``--master-addr``.

    The coordinator binds its tcp control endpoint there once the script builds its first
    `ActorSystem`; an address that is not this machine's ended the run there in a ZMQError
    traceback ("Cannot assign requested address"). A bind of an ephemeral port is the same test,
    made before anything starts.
    """
    host, colon, port = address.rpartition(":")
    if colon and address.count(":") == 1 and port.isdigit():
        raise ValueError(
            f"--master-addr {address}: an address without a port (the coordinator picks its "
            f"ports); give --master-addr {host}"
        )
    if ":" in address:  # ZeroMQ binds IPv4 unless told otherwise, which nothing here does
        raise ValueError(
            f"--master-addr {address}: an IPv6 address, which chatlearn launch does not support "
            "yet; give an IPv4 address of this machine that every host can reach"
        )
    try:
        infos = socket.getaddrinfo(address.strip("[]"), 0, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ValueError(
            f"--master-addr {address}: cannot resolve it ({exc.strerror or exc}); give an "
            "address of this machine that every host can reach"
        ) from None
    family, kind, proto, _, sockaddr = infos[0]
    try:
        with socket.socket(family, kind, proto) as sock:
            sock.bind(sockaddr)
    except OSError as exc:
        raise ValueError(
            f"--master-addr {address}: this machine cannot listen there "
            f"({exc.strerror or exc}); give one of this machine's addresses that every host can "
            "reach, or leave the option out to use its address towards the first remote host"
        ) from None


class Cluster:
    """The run's hosts, keys and spawn commands (see the module docstring); the runtime's
    `chatlearn.actors.hosts.Hosts`."""

    def __init__(self, spec: LaunchSpec, keys: TcpSecurity) -> None:
        self.spec = spec
        self.keys = keys

    @property
    def master_addr(self) -> str:
        return self.spec.master_addr

    def host_resources(self, local: HostResources) -> list[HostResources]:
        """Each host's usable devices: its slot indices as GPUs or as CPU cores."""
        gpus = self.spec.slots_are == "gpus" or (self.spec.slots_are == "auto" and local.gpus)
        result = []
        for host in self.spec.hosts:
            if is_local_host(host.name):
                if gpus:
                    result.append(HostResources(host.name, local.cpus, host.slots))
                else:
                    cpus = tuple(c for i, c in enumerate(local.cpus) if i in host.slots)
                    result.append(HostResources(host.name, cpus, ()))
            elif gpus:
                # Cores of GPU hosts are not pinned: GPU processes are not pinned to cores.
                result.append(HostResources(host.name, tuple(range(len(host.slots))), host.slots))
            else:
                result.append(HostResources(host.name, host.slots, ()))
        return result

    def address_of(self, host: str) -> str:
        """The address peers reach `host` at (the coordinator's for this machine)."""
        return self.master_addr if is_local_host(host) else host

    def rendezvous_port(self, host: str) -> int:
        """A port for torch.distributed's store on `host` (probed when it is ours)."""
        address = self.address_of(host)
        try:
            return free_tcp_port(address)
        except OSError:  # not an address of this machine: pick one, collisions are unlikely
            return random.randint(20000, 29999)

    def spawn(
        self, host: str, worker_args: Sequence[str], extra_env: Mapping[str, str], boot: Bootstrap
    ) -> subprocess.Popen[bytes]:
        """Start one actor on `host` and hand it `boot` (bootstrap.py) on stdin (kept open).

        Forwarded variables travel in `boot`, not in the command, but for those the interpreter
        needs to start (`bootstrap.STARTUP_NAMES`); the run's directory is left to actors on
        this machine to remove.
        """
        worker_args = [*worker_args, "--network-host", self.address_of(host)]
        here = is_local_host(host) or self.spec.launcher == "local"
        boot = replace(boot, cleanup=boot.cleanup if here else [])
        if is_local_host(host):
            argv = [sys.executable, "-m", "chatlearn.actors.worker", *worker_args]
            env, boot_env = split_environment(worker_environment(extra_env), remote=False)
        else:
            remote_env = worker_environment(extra_env, base=self.spec.env)
            command_env, boot_env = split_environment(remote_env, remote=True)
            command = self.remote_command(worker_args, command_env)
            if self.spec.launcher == "local":
                argv = ["/bin/sh", "-c", f"{_IGNORE_SIGTERM}; {command}"]
                env = {
                    k: os.environ[k] for k in ("PATH", "HOME", "USER", "LANG") if k in os.environ
                }
            else:
                # exec'd with SIGTERM ignored, which ssh keeps ignored (`_IGNORE_SIGTERM`)
                ssh = self.ssh_argv(host, command)
                argv = ["/bin/sh", "-c", f'{_IGNORE_SIGTERM}; exec "$@"', "sh", *ssh]
                env = dict(os.environ)
        popen = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.PIPE,
            stderr=subprocess.PIPE,
            close_fds=True,
            process_group=0,  # as spawn_worker: the coordinator stops actors in order
        )
        write_startup_line(popen, replace(boot, env=boot_env).to_line())
        return popen

    def remote_command(self, worker_args: Sequence[str], env: Mapping[str, str]) -> str:
        """The shell command a remote host runs: same directory, explicit environment.

        The worker runs under ``sh``, which exits with its status (128 + signal when a signal
        killed it) rather than being replaced by it: ssh exits 255 both for its own failures and
        for a remote command killed by a signal, so a ``kill -9`` of a remote actor (or the
        OOM killer) read as a lost host, and a restart that met one moved the model's processes
        off a healthy host. The shell ignores SIGTERM (`_IGNORE_SIGTERM`)."""
        assignments = [f"{k}={v}" for k, v in sorted(env.items())]
        argv = ["env", *assignments, self.spec.python, "-m", "chatlearn.actors.worker"]
        script = f"{_IGNORE_SIGTERM}; {shlex.join([*argv, *worker_args])}; exit $?"
        return f"cd {shlex.quote(self.spec.cwd)} && exec sh -c {shlex.quote(script)}"

    def ssh_argv(self, host: str, command: str) -> list[str]:
        """The ssh command line: ``{host}`` in the configured command is replaced, else the host
        is appended; the remote command comes last."""
        template = list(self.spec.ssh_command)
        if any("{host}" in part for part in template):
            return [part.replace("{host}", host) for part in template] + [command]
        return [*template, host, command]

    def describe_exit(self, host: str, code: int | None) -> str:
        """Why an actor's launcher process ended, as said in its error."""
        if is_local_host(host) or code is None:
            return ""
        if code == SSH_FAILED and self.spec.launcher == "ssh":
            return f"ssh to host {host} failed or the connection was lost (exit code 255)"
        signum = shell_signal(code)
        if signum is not None:  # the remote shell's status (remote_command)
            killed = describe_exit_code(-signum).split(" (")[0]  # "killed by SIGKILL"
            return f"{killed} on host {host} (its shell's exit status {code})"
        return ""
