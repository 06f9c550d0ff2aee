"""The coordinator's side of one worker process: spawn it, handshake with it, call it.

Runs in the coordinator.

`RemoteActor` is the record the `ActorSystem` keeps per process (its `Popen`, stderr tail,
liveness timestamps, state) and the backend of the process's `ActorHandle`. `spawn_model` starts
a model's processes with their pinning and torch.distributed environment; `RemoteActor.start`
runs the HELLO → CONFIG → READY handshake within `startup_timeout`, while the system's
supervisor watches the process so that a crash ends the wait at once.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import secrets
import sys
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from chatlearn.actors.bootstrap import Bootstrap, split_environment
from chatlearn.actors.errors import (
    ActorDeadError,
    ActorError,
    ActorSystemClosedError,
    ActorTimeoutError,
)
from chatlearn.actors.hosts import Hosts, is_local_host
from chatlearn.actors.loader import ClassRef
from chatlearn.actors.module import BaseModule
from chatlearn.actors.placement import ProcessAssignment, config_value
from chatlearn.actors.process import (
    CpuSample,
    StderrTail,
    free_tcp_port,
    spawn_worker,
    worker_environment,
)
from chatlearn.actors.worker_core import ActorSpec
from chatlearn.transport import (
    ChannelClosedError,
    MessageKind,
    PeerUnreachableError,
    RemoteError,
    RequestTimeoutError,
)

if TYPE_CHECKING:
    from chatlearn.actors.runtime import ActorSystem

__all__ = ["PRIMING", "RemoteActor", "spawn_model"]

# Set while a restarted unit's `on_restart` hook primes it (runtime.py): only the hook's calls
# reach an actor in state "priming"; everyone else's fail as if it were still restarting.
PRIMING: contextvars.ContextVar[bool] = contextvars.ContextVar("chatlearn_priming", default=False)

# How long a call to a peer that is no longer connected waits for the supervisor to name the
# cause (the process exit it is about to notice) before reporting a generic death.
_UNREACHABLE_WAIT = 2.0


class RemoteActor:
    """The coordinator's record of one worker process (the backend of its `ActorHandle`)."""

    def __init__(self, system: ActorSystem, assignment: ProcessAssignment, spec: ActorSpec):
        self.system = system
        self.assignment = assignment
        self.identity = assignment.identity  # follows the assignment when it moves (runtime.py)
        self.spec = spec
        self.incarnation = -1  # how many times the process was restarted (runtime.py)
        # time its module's setup() may take beyond startup_timeout, and why (runtime.py)
        self.setup_allowance: tuple[float, str] = (0.0, "")
        self.renew(spec)

    def renew(self, spec: ActorSpec) -> None:
        """A new process for this actor (the first, or a restart): a new routing id and a fresh
        record; the object stays, so every handle to the actor reaches the new process."""
        self.spec = spec
        self.incarnation += 1
        # The control channel's name for the process. The random part makes it unguessable (it
        # is never on a command line), and a restarted actor's differs from its predecessor's.
        token = secrets.token_hex(8)
        self.routing_id = f"{self.identity.label}.{token}".encode()
        self.info: dict[str, Any] = {}
        # spawning, starting, ready, failed, stopping, exited; lost, priming (restarts)
        self.state = "spawning"
        self.hello: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.last_seen = time.monotonic()
        self.busy: str | None = None  # what its compute thread runs (from heartbeats)
        # the running call's length at which runtime.py next warns of it (doubles each time)
        self.long_call_warn_at: float | None = None
        self.busy_seconds = 0.0  # how long that call has run, at the last heartbeat
        self.exit_seen_at: float | None = None
        self.dead_payload: Any = None
        self.dead_at: float | None = None
        self.popen: Any = None
        self.local_pid: int | None = None  # the worker's own pid when it runs on this host
        # the processes it started, found as it exited or stopped (stopped with it: runtime.py)
        self.leftovers: list[Any] = []
        self.cpu_sample: tuple[float, CpuSample] | None = None  # see ActorSystem._alive
        self.silences_logged: set[str] = set()  # causes of silence while alive, logged once each
        self.stderr: StderrTail | None = None

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    def where(self, method: str | None = None) -> dict[str, Any]:
        return self.identity.where(self.pid, method)

    def dead_error(self, reason: str = "") -> ActorDeadError:
        """An `ActorDeadError` with everything known: exit code, DEAD traceback, stderr tail."""
        tb = ""
        if isinstance(self.dead_payload, dict):
            tb = str(self.dead_payload.get("traceback", ""))
        return ActorDeadError.of(
            self.identity,
            pid=self.pid,
            exit_code=self.popen.poll() if self.popen is not None else None,
            reason=reason,
            stderr_tail=self.stderr.text() if self.stderr is not None else "",
            remote_traceback=tb,
        )

    async def start(self, *, fatal: bool = True) -> None:
        """HELLO → CONFIG → READY within `startup_timeout`; a failure stops the whole run
        (with ``fatal=False`` it only raises: a restart decides for itself)."""
        system = self.system
        extra, why = self.setup_allowance
        timeout = system.options.startup_timeout + extra
        deadline = time.monotonic() + timeout
        try:
            async with asyncio.timeout(timeout):
                await self.hello  # failed by the supervisor if the process exits first
            remaining = max(0.1, deadline - time.monotonic())
            info = await system.server.request(
                self.routing_id, MessageKind.CONFIG, self.spec.to_payload(), timeout=remaining
            )
        except RemoteError as err:  # the actor reported a startup failure (import, setup, ...)
            self.state = "failed"  # its exit is expected now: not a second failure
            exc = ActorError.from_remote(err, **self.where(None))
            exc.exit_code = await self._wait_exit(system.options.kill_timeout)
            system.record("error", self, f"{exc.type_name} in {exc.method}")
            if fatal:
                system.fail(exc)
            raise exc from None
        except (TimeoutError, RequestTimeoutError):
            allowed = f"startup_timeout={system.options.startup_timeout:g} s"
            if extra:
                allowed += f" + {extra:.0f} s {why}"
            late = self.dead_error(
                f"did not become ready within {allowed} (a setup() that takes longer, such as "
                "loading a large model, needs a larger runtime.startup_timeout)"
            )
            if fatal:
                system.fail(late)
            raise late from None
        self.info = dict(info or {})
        self.state = "ready"
        system.record("ready", self)

    async def _wait_exit(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while self.popen.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return self.popen.poll()

    async def request(
        self, method: str, args: list[Any], kwargs: dict[str, Any], timeout: float | None
    ) -> Any:
        """One CALL; user errors become `ActorError`, a hang `ActorTimeoutError` (fatal)."""
        system = self.system
        if system.failure is not None:
            raise system.failure
        if self.state != "ready" and not (self.state == "priming" and PRIMING.get()):
            lost = system.lost_error(self)
            if lost is not None:  # being restarted: the caller may wait for it and retry
                raise lost
            who = self.identity
            raise ActorSystemClosedError(f"actor {who.model} rank {who.rank} is {self.state}")
        if timeout is None:
            timeout = system.options.call_timeout
        payload = {"method": method, "args": args, "kwargs": kwargs}
        try:
            return await system.server.request(
                self.routing_id, MessageKind.CALL, payload, timeout=timeout
            )
        except RemoteError as err:
            if isinstance(err, ActorError):  # the run's failure, set by fail_pending
                raise
            exc = ActorError.from_remote(err, **self.where(method))
            system.record("error", self, f"{exc.type_name} in {method}")
            if system.options.fail_fast:
                # a collective that failed because a peer died is that death, not a bug here
                lost = await system.peer_loss(self)
                if lost is None and system.failure is None:
                    lost = system.lose(self, exc, user_error=True)
                if lost is not None:
                    raise lost from None
                if system.failure is not None:
                    raise system.failure from None
            raise exc from None
        except RequestTimeoutError:
            assert timeout is not None
            timed_out = ActorTimeoutError.of(
                self.identity, method=method, timeout=timeout, pid=self.pid
            )
            lost = system.lose(self, timed_out)
            raise (lost or timed_out) from None
        except ChannelClosedError:
            if system.failure is not None:
                raise system.failure from None
            raise ActorSystemClosedError("the actor system shut down during the call") from None
        except PeerUnreachableError:
            deadline = time.monotonic() + _UNREACHABLE_WAIT
            while time.monotonic() < deadline:
                if system.failure is not None:
                    raise system.failure from None
                lost = system.lost_error(self)
                if lost is not None:
                    raise lost from None
                await asyncio.sleep(0.05)
            raise self.dead_error("not connected to the coordinator") from None


def spawn_model(
    system: ActorSystem,
    module: BaseModule,
    assignments: list[ProcessAssignment],
    *,
    config_dict: dict[str, Any],
    services: dict[str, str],
    env_vars: dict[str, str],
    actors: list[RemoteActor] | None = None,
) -> list[RemoteActor]:
    """Start one worker per assignment (not yet configured: see `RemoteActor.start`).

    ``actors``: restart these (one per assignment, same order) in new processes instead of
    creating new actors; a replica's ranks meet at a new rendezvous port."""
    reuse = list(actors) if actors is not None else None
    class_ref = ClassRef.of(type(module))
    nice = int(config_value(module.module_args, "nice", 0) or 0)
    idle_priority = bool(config_value(module.module_args, "idle_priority", False))
    options = system.options
    cluster = system.cluster
    rendezvous: dict[int, tuple[str, int]] = {}
    spawned = []
    for number, a in enumerate(assignments):
        # Also for a replica of one process (the group is formed only for more): ChatLearn sets
        # these for every process of a model, and its modules' setup() calls
        # init_process_group() (env://) or Megatron's/DeepSpeed's init at any world size,
        # which without them failed with "environment variable RANK expected, but not set".
        if a.replica_id not in rendezvous:
            rendezvous[a.replica_id] = _rendezvous(cluster, assignments, a.replica_id)
        addr, port = rendezvous[a.replica_id]
        peers_here = [p for p in assignments if p.replica_id == a.replica_id and p.host == a.host]
        dist_env = {
            "MASTER_ADDR": addr,
            "MASTER_PORT": str(port),
            "RANK": str(a.rank),
            "WORLD_SIZE": str(a.world_size),
            "LOCAL_RANK": str(a.local_rank),
            "LOCAL_WORLD_SIZE": str(len(peers_here)),
        }
        local = cluster is None or is_local_host(a.host)
        spec = ActorSpec(
            identity=a.identity,
            class_ref=class_ref,
            config=config_dict,
            argv=list(sys.argv),
            sys_path=[p for p in sys.path if p],
            pinning=a.pinning_payload(),
            services=services,
            # A remote actor has no access to our directory (and must never remove it).
            runtime_dir=str(system.runtime_dir.path) if system.runtime_dir and local else None,
            dist_timeout=options.dist_timeout,
            nice=nice,
            idle_priority=idle_priority,
            runtime_state=module._start_state(),
        )
        if reuse is None:
            actor = RemoteActor(system, a, spec)
        else:
            actor = reuse[number]
            actor.renew(spec)
        endpoint = system.server.endpoint if local else system.remote_endpoint
        assert endpoint is not None
        argv = [
            *("--endpoint", endpoint),
            # A remote actor's parent is not us: it watches its stdin (the ssh channel) instead.
            *("--coordinator-pid", str(os.getpid() if local else 0)),
            *("--heartbeat-interval", str(options.heartbeat_interval)),
            *("--startup-timeout", str(options.startup_timeout)),
            *("--label", a.identity.label),
        ]
        extra_env = {**env_vars, **a.env, **dist_env}
        boot = Bootstrap(
            identity=actor.routing_id.decode(),
            security=system.security,
            # Removed by the actor if we die first (`Cluster.spawn` drops it for other hosts).
            cleanup=[str(system.runtime_dir.path)] if system.runtime_dir else [],
        )
        # Spawned from the event loop's thread: PR_SET_PDEATHSIG follows the forking thread.
        if cluster is None:
            env, boot_env = split_environment(worker_environment(extra_env), remote=False)
            actor.popen = spawn_worker(argv, env, replace(boot, env=boot_env).to_line())
            actor.local_pid = actor.popen.pid
        else:
            actor.popen = cluster.spawn(a.host, argv, extra_env, boot)
        where = f" @{a.host}" if cluster is not None else ""
        actor.stderr = StderrTail(
            actor.popen.stderr, f"[{module.name} r{a.replica_id}.{a.rank}{where}]"
        )
        actor.state = "starting"
        spawned.append(actor)
    return spawned


def _rendezvous(
    cluster: Hosts | None, assignments: list[ProcessAssignment], replica_id: int
) -> tuple[str, int]:
    """torch.distributed's MASTER_ADDR/PORT for a replica: on its rank 0's host, at an address
    every rank can reach (loopback on a single host)."""
    if cluster is None:
        return "127.0.0.1", free_tcp_port()
    first = next(p for p in assignments if p.replica_id == replica_id and p.rank == 0)
    hosts = {p.host for p in assignments if p.replica_id == replica_id}
    if len(hosts) == 1 and is_local_host(first.host):
        return "127.0.0.1", free_tcp_port()
    return cluster.address_of(first.host), cluster.rendezvous_port(first.host)
