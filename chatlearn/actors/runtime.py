"""The coordinator's actor runtime: spawns model processes, supervises them, stops them.

Runs in the coordinator.

    async with ActorSystem(config) as system:
        reference, policy = await system.launch(reference_template, policy_template)
        out = await reference.call(0, "forward_step", batch)

`ActorSystem.launch` plans placement for the given module templates (placement.py), spawns one
`python -m chatlearn.actors.worker` per process with its pinning and torch.distributed
environment, and waits — with `startup_timeout`, while watching every process — until each has
said HELLO and answered CONFIG with READY (after `setup()`). It returns a `ModelGroup` per model.
With `in_process=True` modules run inside the coordinator instead (inprocess.py), with the same
handles and errors.

Two loops run beside the caller's code:
- `_control_loop` consumes the actors' unsolicited messages (HELLO, HEARTBEAT, DEAD) and
  produces arrivals and liveness timestamps.
- `_supervise_loop` waits on nothing but a 0.1 s tick: it polls every process for an exit and
  checks heartbeat silence (`heartbeat_timeout`), and produces the run's failure.

Any failure (a dead or hung actor, a call timeout, and by default an error raised by user code)
is fatal for the whole run: every pending call fails with it, and every process tree is stopped
with terminate → bounded wait → kill; the runtime directory with its ipc files is removed.

Unless the model heals (`heal(model, ...)`, what the DPO engine asks for): then a process death,
a hang, a call timeout (and with `RestartPolicy.on_error` an error of user code) of one of its
actors restarts its *unit* — its replica, or every process of the model — within the policy's
budget (`max_restarts` per `window`): the unit's pending calls fail with `ActorLostError`, its
processes are killed, and new ones start on the same slots with the same pinning (`setup()`
again), then the model's `on_restart` hook primes them. Calls made meanwhile fail with
`ActorLostError` too; `wait_ready(model, replica)` returns once the unit is back. Each restart is
one log line and one `restarts` entry. Past the budget, the death is fatal as above, and its error
says how many restarts were tried.
`shutdown()` (or leaving `async with`) stops a healthy run in order: SHUTDOWN to every actor,
bounded wait for them to exit, then the same terminate/kill for stragglers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from chatlearn.actors.errors import (
    ActorDeadError,
    ActorError,
    ActorLostError,
    ActorSystemClosedError,
    shell_signal,
)
from chatlearn.actors.handles import ActorHandle, ModelGroup
from chatlearn.actors.hosts import Hosts, default_hosts
from chatlearn.actors.module import BaseModule, setup_allowance
from chatlearn.actors.placement import (
    HostResources,
    ModelResources,
    config_value,
    parse_colocation,
    plan_hosts,
    plan_placement,
    relocate,
)
from chatlearn.actors.process import (
    TERMINATE_SIGNAL,
    close_stdin,
    cpu_sample,
    descendants,
    exited,
    running,
    starved,
    terminate_processes,
)
from chatlearn.actors.remote import PRIMING, RemoteActor, spawn_model
from chatlearn.config.errors import one_line
from chatlearn.transport import ControlServer, MessageKind, RuntimeDir, security, tcp_endpoint

__all__ = ["ActorEvent", "ActorSystem", "Restart", "RestartPolicy", "SupervisionOptions"]

logger = logging.getLogger("chatlearn.actors")

# After a process exit is seen, wait this long for its last messages (ERROR, DEAD) to arrive,
# so the error names the real cause rather than just the exit code.
_EXIT_GRACE = 0.3
_TICK = 0.1
# How long an error of user code on a process with peers (the other ranks of its replica, or of
# a trainer) waits for a peer's death to explain it before it counts as the process's own.
_PEER_GRACE = 2.0


@dataclass(frozen=True)
class SupervisionOptions:
    """Timeouts of the runtime; defaults come from the `runtime:` config section."""

    heartbeat_interval: float = 0.5
    heartbeat_timeout: float = 5.0
    startup_timeout: float = 60.0  # spawn → READY, including setup()
    call_timeout: float | None = None
    shutdown_timeout: float = 5.0  # graceful stop, then terminate → kill_timeout → kill
    kill_timeout: float = 3.0
    dist_timeout: float = 600.0  # torch.distributed collectives
    fail_fast: bool = True  # an ActorError also stops the run
    in_process: bool = False
    # with call_timeout null, a call running this long is logged (again at twice the length,
    # and so on): nothing else would tell of a collective waiting for ever for a lost peer
    long_call_warning: float = 300.0

    @classmethod
    def from_config(cls, config: Any, **overrides: Any) -> SupervisionOptions:
        runtime = config_value(config, "runtime_args")
        values: dict[str, Any] = {}
        for f in fields(cls):
            value = config_value(runtime, f.name, None)
            if value is not None:
                values[f.name] = value
        values.update({k: v for k, v in overrides.items() if v is not None})
        options = cls(**values)
        if options.heartbeat_timeout <= options.heartbeat_interval:
            raise ValueError(
                f"heartbeat_timeout ({options.heartbeat_timeout}) must be larger than "
                f"heartbeat_interval ({options.heartbeat_interval})"
            )
        return options


@dataclass(frozen=True)
class RestartPolicy:
    """How often a model's actors are restarted: at most ``max_restarts`` within any
    ``window`` seconds (0: never); ``on_error``: also after an error raised by user code (by
    default that stops the run: running the same code again would raise again)."""

    max_restarts: int = 3
    window: float = 3600.0
    on_error: bool = False


@dataclass(slots=True)
class Restart:
    """One restart of a unit of actors (``ActorSystem.restarts``)."""

    model: str
    replica_id: int | None  # None: every replica of the model
    attempt: int  # the model's restarts so far, this one included
    reason: str  # one line: what happened to which actor
    started: float  # time.time() when the loss was noticed
    ready: float | None = None  # when the unit was back (after setup() and on_restart)
    tries: int = 1  # new processes started: more when a new one was lost while starting


@dataclass(slots=True)
class _Healing:
    unit: str  # "replica" or "model"
    policy: RestartPolicy
    on_restart: Callable[[int | None], Awaitable[None]] | None
    describe: Callable[[int | None], str] | None
    # awaited before new processes start (their start state must be final by then)
    before_start: Callable[[int | None], Awaitable[None]] | None = None
    times: deque[float] = field(default_factory=deque)  # monotonic times of recent restarts
    count: int = 0


@dataclass(frozen=True)
class ActorEvent:
    """One entry of the runtime's event log (`ActorSystem.events`)."""

    time: float
    kind: str  # spawn, hello, ready, error, dead, failure, shutdown, exit, stopped
    model: str = ""
    replica_id: int = 0
    rank: int = 0
    detail: str = ""


class ActorSystem:
    """Spawns, supervises and stops the actor processes of one run (see module docstring)."""

    def __init__(
        self,
        config: Any = None,
        *,
        host: HostResources | None = None,
        cluster: Hosts | None = None,
        **options: Any,
    ) -> None:
        """`config`: a `chatlearn.config.Config` (default: the modules' own config at launch).

        `cluster`: the hosts of a multi-host run (`chatlearn.launch.Cluster`); by default the one
        `chatlearn launch --hostfile` set up for this process, else this host only.

        `options` override `SupervisionOptions` fields (heartbeat_interval, heartbeat_timeout,
        startup_timeout, call_timeout, shutdown_timeout, kill_timeout, dist_timeout, fail_fast,
        in_process, long_call_warning).
        """
        self._config = config
        self._option_overrides = options
        self.options = SupervisionOptions.from_config(config, **options)
        self._host = host
        if cluster is None and not self.options.in_process:
            cluster = default_hosts()
        self.cluster = cluster
        self.remote_endpoint: str | None = None  # the control socket's tcp side (multi-host)
        self.groups: dict[str, ModelGroup] = {}
        self.failure: BaseException | None = None
        self.events: deque[ActorEvent] = deque(maxlen=10_000)
        self.server: ControlServer = None  # type: ignore[assignment]
        self.runtime_dir: RuntimeDir | None = None
        # What proves a process belongs to this run (handed to actors on stdin, security.py).
        self.security = security.RunSecurity(curve=cluster.keys if cluster is not None else None)
        self._num_unknown = 0
        self._actors: list[RemoteActor] = []
        self._by_routing_id: dict[bytes, RemoteActor] = {}
        self._local: list[Any] = []  # in-process actors
        self._popens: list[Any] = []  # shared with the exit-time finalizer
        self._tasks: list[asyncio.Task[Any]] = []
        self._stop_task: asyncio.Task[Any] | None = None
        # Self-healing (module docstring): per model, its policy; per unit being restarted,
        # what waits for it; every restart so far; what spawns a model's processes again.
        self._healing: dict[str, _Healing] = {}
        self._healing_stopped: set[str] = set()  # models whose losses fail the run (stop_healing)
        self._restarting: dict[tuple[str, int | None], asyncio.Future[None]] = {}
        self._lost_because: dict[tuple[str, int | None], BaseException] = {}  # what it was
        self._restart_tasks: set[asyncio.Task[None]] = set()
        self._spawn_args: dict[str, tuple[BaseModule, dict[str, str], dict, dict]] = {}
        self.restarts: list[Restart] = []
        self.on_restart_event: Callable[[Restart], None] | None = None
        # An actor was sent a signal from outside the run (STOP): whoever trains asks for the
        # run's graceful stop, ``(signal, who) -> True``; False, or no one: the actor is stopped
        self.on_stop_request: Callable[[int, str], bool] | None = None
        self._closing = False
        self._closed = False
        self._shutdown_task: asyncio.Future[None] | None = None
        # A coordinator that exits without shutdown() still leaves no processes behind.
        self._finalizer = weakref.finalize(self, terminate_processes, self._popens, grace=1.0)

    # -- context manager -----------------------------------------------------------------
    async def __aenter__(self) -> ActorSystem:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def host(self) -> HostResources:
        """The resources placement plans with (detected on first use unless given)."""
        if self._host is None:
            self._host = HostResources.detect()
        return self._host

    def record(self, kind: str, actor: Any = None, detail: str = "") -> None:
        if actor is None:
            self.events.append(ActorEvent(time.monotonic(), kind, detail=detail))
        else:
            who = actor.identity
            self.events.append(
                ActorEvent(time.monotonic(), kind, who.model, who.replica_id, who.rank, detail)
            )

    def event_kinds(self, model: str | None = None) -> list[str]:
        """The kinds of recorded events, optionally of one model only (for tests and logs)."""
        return [e.kind for e in self.events if model is None or e.model in ("", model)]

    # -- launch --------------------------------------------------------------------------
    async def launch(
        self,
        *modules: BaseModule,
        services: Mapping[str, Mapping[str, str]] | None = None,
    ) -> list[ModelGroup]:
        """Start every process of the given module templates; one `ModelGroup` per module.

        `services` maps a model name to its worker services, `{"name": "pkg.mod:Class"}`.
        Raises the first startup failure (`ActorError` from user code, `ActorDeadError` for a
        process that died or did not start in time), after stopping the whole run.
        """
        if self._closing or self._closed:
            raise ActorSystemClosedError("the actor system is shut down")
        if self.failure is not None:
            raise self.failure
        if not modules:
            return []
        for module in modules:
            if not isinstance(module, BaseModule):
                raise TypeError(f"launch() takes module templates, got {type(module).__name__}")
            if module.name in self.groups:
                raise ValueError(f"model {module.name!r} is already launched")
        config = self._config if self._config is not None else modules[0].global_args
        if self._config is None:
            self._config = config
            self.options = SupervisionOptions.from_config(config, **self._option_overrides)
        services = services or {}
        if self.options.in_process:
            from chatlearn.actors.inprocess import launch_in_process

            groups = await launch_in_process(self, modules, services)
        else:
            groups = await self._launch_processes(modules, services, config)
        for group in groups:
            self.groups[group.name] = group
        return groups

    async def _launch_processes(
        self, modules: Sequence[BaseModule], services: Mapping[str, Mapping[str, str]], config: Any
    ) -> list[ModelGroup]:
        resources = [ModelResources.from_config(m.name, m.module_args) for m in modules]
        runtime = config_value(config, "runtime_args")
        colocation = parse_colocation(config_value(runtime, "colocation", []))
        if self.cluster is not None:
            plan = plan_hosts(
                resources,
                self.cluster.host_resources(self.host),
                colocation=colocation,
                reserved={
                    h: (self._used("cpus", h), self._used("gpus", h))
                    for h in {a.identity.host for a in self._actors}
                },
            )
        else:
            plan = plan_placement(
                resources,
                self.host,
                colocation=colocation,
                reserved_cpus=self._used("cpus"),
                reserved_gpus=self._used("gpus"),
            )
        self._ensure_started()
        env_vars = dict(config_value(config_value(config, "env_args"), "env_vars", {}) or {})
        config_dict = config.to_dict()
        new: dict[str, list[RemoteActor]] = {}
        for module in modules:
            allowance = setup_allowance(module)
            self._spawn_args[module.name] = (
                module,
                dict(services.get(module.name, {})),
                config_dict,
                env_vars,
            )
            actors = spawn_model(
                self,
                module,
                plan.assignments[module.name],
                config_dict=config_dict,
                services=dict(services.get(module.name, {})),
                env_vars=env_vars,
            )
            for actor in actors:
                actor.setup_allowance = allowance
                self._popens.append(actor.popen)
                self._actors.append(actor)
                self._by_routing_id[actor.routing_id] = actor
                self.record("spawn", actor, f"pid {actor.pid}")
            new[module.name] = actors
        everyone = [a for group in new.values() for a in group]
        results = await asyncio.gather(*(a.start() for a in everyone), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors and self._healed_at_launch(errors):
            for name in {e.model for e in errors}:  # type: ignore[attr-defined]
                await self.wait_ready(name)  # the run's failure if a restart fails
            errors = []
        if errors:
            root = self.failure or errors[0]
            self.fail(root)
            if self._stop_task is not None:
                await asyncio.shield(self._stop_task)
            raise root
        return [ModelGroup(name, [ActorHandle(a) for a in group]) for name, group in new.items()]

    def _healed_at_launch(self, errors: list[BaseException]) -> bool:
        """Whether every start-up failure is a process death that is being healed (the model
        heals, and its restart is under way): then the launch waits for it instead of failing."""
        return self.failure is None and all(
            isinstance(e, ActorDeadError)
            and not isinstance(e, ActorError)
            and e.model in self._healing
            and (self.restarting(e.model) or any(r.model == e.model for r in self.restarts))
            for e in errors
        )

    def _used(self, kind: str, host: str | None = None) -> set[int]:
        return {
            d
            for a in self._actors
            if host is None or a.identity.host == host
            for d in getattr(a.assignment, kind)
        }

    def _ensure_started(self) -> None:
        if self.server is not None:
            return
        self.runtime_dir = RuntimeDir()
        # Before any socket: every connection to this process must present the run's secret
        # (ipc) or keys (tcp). Added to any other run this process coordinates at the moment.
        security.configure(self.security, add=True, identity=b"coordinator")
        self.server = ControlServer(
            self.runtime_dir.ipc_endpoint("control"), on_malformed=self._malformed_from
        )
        if self.cluster is not None:
            # Same-host actors stay on ipc; remote ones connect here, to one address only.
            self.remote_endpoint = self.server.bind(tcp_endpoint(self.cluster.master_addr))
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._control_loop(), name="ActorSystem._control_loop"),
            loop.create_task(self._supervise_loop(), name="ActorSystem._supervise_loop"),
        ]

    # -- loops ---------------------------------------------------------------------------
    async def _control_loop(self) -> None:
        """Consumes the actors' HELLO, HEARTBEAT and DEAD messages; updates their records."""
        while True:
            routing_id, msg = await self.server.recv_unsolicited()
            actor = self._by_routing_id.get(routing_id)
            if actor is None:
                self._unknown_peer(routing_id, msg.kind.name)
                continue
            actor.last_seen = time.monotonic()
            actor.cpu_sample = None
            if msg.kind == MessageKind.HELLO:
                self.record("hello", actor)
                if not actor.hello.done():
                    actor.hello.set_result(msg.payload)
            elif msg.kind == MessageKind.HEARTBEAT:
                if isinstance(msg.payload, dict):
                    self._heartbeat(actor, msg.payload)
            elif msg.kind == MessageKind.DEAD:
                actor.dead_payload = msg.payload
                actor.dead_at = time.monotonic()
                self.record("dead", actor, "reported a fatal error")
            elif msg.kind == MessageKind.STOP:
                self._stop_requested(actor, msg.payload)
            else:
                logger.debug("ignoring %s from %r", msg.kind.name, routing_id)

    def _stop_requested(self, actor: RemoteActor, payload: Any) -> None:
        """An actor received SIGTERM from outside the run (worker.py, `Worker._on_sigterm`): a
        scheduler or service manager stopping the job signals every process of it. The run
        stops gracefully, as on the coordinator's own SIGTERM (the engine's
        ``on_stop_request``); where nothing runs that could, the actor is stopped, as the
        signal asked."""
        said = payload if isinstance(payload, dict) else {}
        signum = said.get("signal")
        if signum not in (signal.SIGTERM,):
            signum = signal.SIGTERM
        name = signal.Signals(signum).name
        # the worker's own pid and host (a remote actor's process here is its launcher's)
        pid = said.get("pid") if isinstance(said.get("pid"), int) else actor.pid
        host = said.get("host") if isinstance(said.get("host"), str) else actor.identity.host
        who = (
            f"actor {actor.identity.model} replica {actor.identity.replica_id} rank "
            f"{actor.identity.rank} (pid {pid} on {host})"
        )
        self.record("stop", actor, f"received {name}")
        handler = self.on_stop_request
        if handler is not None and not self._closing and handler(signum, who):
            return
        logger.warning(
            "%s received %s and nothing stops the run gracefully: stopping it", who, name
        )
        popen = actor.popen
        if popen is not None and popen.poll() is None:
            with contextlib.suppress(OSError):
                popen.send_signal(TERMINATE_SIGNAL)

    def _heartbeat(self, actor: RemoteActor, payload: dict[str, Any]) -> None:
        """Notes what the actor's compute thread runs; warns of a call that has run for
        `long_call_warning` seconds (then twice that, ...) with no call_timeout to end it. Its
        process is alive and heartbeats, so nothing else would be said of a call that waits for
        ever (a collective whose peer is gone, a deadlock, a read that never returns)."""
        busy, seconds = payload.get("busy"), payload.get("busy_s")
        if not isinstance(busy, str) or not isinstance(seconds, int | float):
            actor.busy, actor.long_call_warn_at = None, None
            return
        if busy != actor.busy or seconds < actor.busy_seconds:  # another call
            actor.long_call_warn_at = self.options.long_call_warning
        actor.busy, actor.busy_seconds = busy, seconds
        if (
            self.options.call_timeout is not None
            or busy in ("setup", "close")  # bounded by startup_timeout, shutdown_timeout
            or actor.long_call_warn_at is None
            or seconds < actor.long_call_warn_at
        ):
            return
        actor.long_call_warn_at = 2 * max(seconds, actor.long_call_warn_at)
        logger.warning(
            "actor %s replica %d rank %d (pid %s) has been running %r for %.0f s, and "
            "runtime.call_timeout is null: nothing ends it if it waits for ever (a collective "
            "whose peer is gone, a deadlock). `py-spy dump --pid %s` on its host shows where "
            "it is; runtime.call_timeout bounds every call",
            actor.identity.model,
            actor.identity.replica_id,
            actor.identity.rank,
            actor.pid,
            busy,
            seconds,
            actor.pid,
        )

    def _malformed_from(self, routing_id: bytes, exc: Exception) -> None:
        """An actor of this run sent a message that cannot be decoded: it broke the protocol
        (only the run's processes get through, security.py), so the run stops naming it."""
        actor = self._by_routing_id.get(routing_id)
        if actor is not None and self.failure is None and not self._closing:
            self.fail(
                actor.dead_error(
                    f"broke the protocol: sent a message that cannot be decoded "
                    f"({type(exc).__name__}: {exc})"
                )
            )

    def _unknown_peer(self, routing_id: bytes, kind: str) -> None:
        """A message from a peer with the run's credentials but no actor's routing id (an actor of
        a run that ended, say): dropped, counted, and logged at a capped rate."""
        self._num_unknown += 1
        count = self._num_unknown
        if count <= 10 or count & (count - 1) == 0:  # the first ten, then at powers of two
            logger.warning(
                "dropped message %s from unknown peer %r (%d such messages so far)",
                kind,
                routing_id[:64],
                count,
            )

    async def _supervise_loop(self) -> None:
        """Every tick: notice exited processes and silent (hung or stopped) actors."""
        last_tick = time.monotonic()
        while True:
            await asyncio.sleep(_TICK)
            now = time.monotonic()
            # If our own loop was blocked (by the caller's code), actors were not silent: we
            # were deaf. Restart their silence clocks instead of declaring them dead.
            deaf = now - last_tick > max(1.0, self.options.heartbeat_timeout / 2)
            last_tick = now
            for actor in list(self._actors):
                self._check(actor, now, deaf)

    def _check(self, actor: RemoteActor, now: float, deaf: bool) -> None:
        if actor.state == "exited":
            return
        if actor.local_pid is not None and actor.popen.returncode is None and exited(actor.popen):
            # Before it is reaped: then its process group still finds the children it left.
            actor.leftovers = _merged(actor.leftovers, descendants([actor.popen]))
        code = actor.popen.poll()
        if code is not None:
            if actor.exit_seen_at is None:
                actor.exit_seen_at = now
            if now - actor.exit_seen_at >= _EXIT_GRACE or self._closing:
                self._on_exit(actor, code)
            return
        if self._closing or actor.state not in ("starting", "ready", "priming"):
            return
        if deaf:
            actor.last_seen = now
            actor.cpu_sample = None
        elif actor.dead_at is not None and now - actor.dead_at > 2.0:
            self.lose(actor, actor.dead_error("reported a fatal error but did not exit"))
        elif actor.hello.done():
            self._sample_cpu(actor, now)
            if now - actor.last_seen <= self.options.heartbeat_timeout:
                return
            if self._alive(actor, now):
                return
            silent = now - actor.last_seen
            self.record("hung", actor, f"silent for {silent:.1f} s")
            running = f" (last seen running {actor.busy!r})" if actor.busy else ""
            self.lose(
                actor,
                actor.dead_error(
                    f"no heartbeat for {silent:.1f} s (heartbeat_timeout="
                    f"{self.options.heartbeat_timeout:g} s): the process is hung or "
                    f"stopped{running}"
                ),
            )

    def _alive(self, actor: RemoteActor, now: float) -> bool:
        """Whether a silent local actor is starved of CPU (`process.starved`) or computing in a
        call that holds the interpreter lock (`process.running`) rather than hung, since the
        last sample, which is taken when it has been silent for half the timeout and again at
        each positive answer.

        So a starved actor stays alive as long as it keeps wanting CPU, a computing one as long
        as it computes (bounded, as any call, by startup_timeout in setup and call_timeout if
        set: its silence is only the lock's), and one that stops (hung, stopped) is still
        declared dead within 1.5 timeouts of its last message.
        """
        previous = actor.cpu_sample
        if actor.local_pid is None or previous is None:
            return False
        taken, before = previous
        if now - taken < self.options.heartbeat_timeout / 2:
            return True  # still inside the window a positive answer granted
        after = cpu_sample(actor.local_pid)
        if after is None:
            return False
        actor.cpu_sample = (now, after)
        if starved(before, after, now - taken):
            cause = "starved"
            why = "waiting for CPU time (other programs are using the cores): starved, not hung"
        elif running(before, after, now - taken):
            cause = "running"
            why = (
                f"running {actor.busy or 'a call'!r} on a CPU: a call that holds Python's "
                "interpreter lock (a C extension, a regex, a huge json.loads) keeps the "
                "heartbeat from running; computing, not hung"
            )
        else:
            return False
        if cause not in actor.silences_logged:
            actor.silences_logged.add(cause)
            logger.warning(
                "actor %s replica %d rank %d (pid %s): no heartbeat for %.1f s, but it is %s; "
                "waiting on",
                actor.identity.model,
                actor.identity.replica_id,
                actor.identity.rank,
                actor.pid,
                now - actor.last_seen,
                why,
            )
        return True

    def _sample_cpu(self, actor: RemoteActor, now: float) -> None:
        """Once silent for half the timeout, note the actor's CPU use for `_alive`."""
        if actor.cpu_sample is None and actor.local_pid is not None:
            if now - actor.last_seen > self.options.heartbeat_timeout / 2:
                sample = cpu_sample(actor.local_pid)
                if sample is not None:
                    actor.cpu_sample = (now, sample)

    def _on_exit(self, actor: RemoteActor, code: int) -> None:
        previous = actor.state
        actor.state = "exited"
        self.record("exit", actor, f"exit code {code}")
        if self._closing or self.failure is not None or previous in ("failed", "lost"):
            return
        reason = "exited during startup" if previous == "starting" else "exited unexpectedly"
        if self.cluster is not None:
            reason = self.cluster.describe_exit(actor.identity.host, code) or reason
        exc = actor.dead_error(reason)
        if not actor.hello.done():
            actor.hello.set_exception(exc)
            actor.hello.exception()  # a restart's start() may have stopped waiting already
        # (a restarted process that dies while starting fails its pending calls: the restart
        # then tries again)
        self.lose(actor, exc)

    # -- self-healing --------------------------------------------------------------------
    def heal(
        self,
        model: str,
        *,
        unit: str = "replica",
        policy: RestartPolicy | None = None,
        on_restart: Callable[[int | None], Awaitable[None]] | None = None,
        describe: Callable[[int | None], str] | None = None,
        before_start: Callable[[int | None], Awaitable[None]] | None = None,
    ) -> None:
        """Restart ``model``'s actors when they are lost (module docstring) instead of failing
        the run. ``unit``: ``"replica"`` restarts the lost actor's replica (all its ranks),
        ``"model"`` every process of the model (a trainer whose ranks share one optimizer step).
        ``on_restart(replica_id)`` primes the new processes before anyone may call them (None
        for a whole model); ``describe(replica_id)`` says, for the log line, what the caller
        will replay; ``before_start(replica_id)`` is awaited once the lost processes are gone,
        before new ones start with the model's start state (`BaseModule._start_state`).
        Processes only: in-process actors cannot be restarted.
        """
        if unit not in ("replica", "model"):
            raise ValueError(f"unit must be 'replica' or 'model', got {unit!r}")
        policy = policy or RestartPolicy()
        if self.options.in_process or policy.max_restarts <= 0:
            self._healing.pop(model, None)
            return
        self._healing[model] = _Healing(unit, policy, on_restart, describe, before_start)

    def stop_healing(self, model: str) -> None:
        """From now on a lost process of ``model`` fails the run instead of being restarted:
        a graceful stop is under way, and a trainer restarted now would rewind to its last
        checkpoint, load it and stop there, which is the checkpoint the run already has (the
        minutes of a large model's setup spent for nothing, past a scheduler's grace, say)."""
        self._healing_stopped.add(model)

    def _unit_key(self, actor: Any) -> tuple[str, int | None]:
        healing = self._healing.get(actor.identity.model)
        unit = healing.unit if healing is not None else "replica"
        return (actor.identity.model, actor.identity.replica_id if unit == "replica" else None)

    def restarting(self, model: str, replica_id: int | None = None) -> bool:
        """Whether a unit of ``model`` (holding ``replica_id``, if given) is being restarted."""
        return any(
            m == model and (replica_id is None or r is None or r == replica_id)
            for m, r in self._restarting
        )

    async def wait_ready(self, model: str, replica_id: int | None = None) -> None:
        """Return once no unit of ``model`` (holding ``replica_id``, if given) is being
        restarted; raises the run's failure if the restart fails (policy exhausted, say)."""
        for _ in range(1000):  # each round waits for a restart, and restarts are bounded
            if self.failure is not None:
                raise self.failure
            waiters = [
                waiter
                for (m, r), waiter in self._restarting.items()
                if m == model and (replica_id is None or r is None or r == replica_id)
            ]
            if not waiters:
                return
            shields = [asyncio.shield(w) for w in waiters]
            await asyncio.wait(shields)
            for shield in shields:  # a failed restart's error: raised above, as the failure
                if not shield.cancelled():
                    shield.exception()
        raise RuntimeError(f"model {model!r} did not come back after 1000 restarts")

    def lost_error(self, actor: Any) -> ActorLostError | None:
        """The error of a call to ``actor`` while it is being restarted (None: it is not)."""
        if self._unit_key(actor) not in self._restarting:
            return None
        healing = self._healing[actor.identity.model]
        cause = self._lost_because.get(self._unit_key(actor)) or actor.dead_error("restarting")
        return ActorLostError(
            cause,
            model=actor.identity.model,
            replica_id=actor.identity.replica_id,
            attempt=healing.count,
        )

    async def peer_loss(self, actor: Any) -> ActorLostError | None:
        """Whether an error ``actor``'s user code raised is the consequence of a peer's death.

        The ranks of a replica (or of a trainer) run collectives together: when one dies, the
        others' next collective fails at once ("Connection reset by peer"), before the process
        watch (`_check`, every `_TICK`) sees the death. So an error of a process that has peers
        waits up to `_PEER_GRACE` for the watch to restart their unit; then it returns the
        error of a lost actor. None at once for a process without peers, and None when nothing
        restarted their unit: the error is the process's own (or the run failed meanwhile)."""
        key = self._unit_key(actor)
        if not any(a is not actor and self._unit_key(a) == key for a in self._actors):
            return None
        deadline = time.monotonic() + _PEER_GRACE
        while self.failure is None and not self._closing:
            if key in self._restarting:
                return self.lost_error(actor)
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(_TICK / 5)
        return None

    def lose(
        self, actor: Any, exc: BaseException, *, user_error: bool = False
    ) -> ActorLostError | None:
        """``actor`` is lost (dead, hung, or its user code raised): restart its unit if the
        model heals and the policy allows, and return the error its callers get; otherwise make
        ``exc`` the run's failure and return None."""
        if self.failure is not None or self._closing or self._closed:
            return None
        healing = self._healing.get(actor.identity.model)
        if (
            healing is None
            or actor.identity.model in self._healing_stopped
            or (user_error and not healing.policy.on_error)
        ):
            self.fail(exc)
            return None
        key = self._unit_key(actor)
        if key in self._restarting:  # a unit already restarting (a rank, or a new process)
            lost = ActorLostError(
                exc,
                model=actor.identity.model,
                replica_id=actor.identity.replica_id,
                attempt=healing.count,
            )
            self.server.fail_pending(actor.routing_id, lost)
            return lost
        if not self._budget(healing, exc):
            self.fail(exc)
            return None
        healing.count += 1
        lost = ActorLostError(
            exc,
            model=actor.identity.model,
            replica_id=actor.identity.replica_id,
            attempt=healing.count,
        )
        members = [
            a
            for a in self._actors
            if a.identity.model == actor.identity.model
            and (key[1] is None or a.identity.replica_id == key[1])
        ]
        for member in members:
            if member.state != "exited":
                member.state = "lost"
            self.server.fail_pending(member.routing_id, lost)
        replayed = healing.describe(key[1]) if healing.describe is not None else ""
        what = f"replica {key[1]}" if key[1] is not None else "all its processes"
        reason = _headline(exc)
        policy = healing.policy
        logger.warning(
            "restarting model %r %s: %s (restart %d; at most %d per %s)%s",
            actor.identity.model,
            what,
            reason,
            healing.count,
            policy.max_restarts,
            _duration(policy.window),
            f"; {replayed}" if replayed else "",
        )
        self.record("restart", actor, reason)
        restart = Restart(actor.identity.model, key[1], healing.count, reason, time.time())
        self.restarts.append(restart)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._restarting[key] = waiter
        self._lost_because[key] = exc
        task = asyncio.get_running_loop().create_task(
            self._restart(key, members, restart, healing), name=f"ActorSystem._restart{key}"
        )
        self._restart_tasks.add(task)
        task.add_done_callback(self._restart_tasks.discard)
        return lost

    def _budget(self, healing: _Healing, exc: BaseException) -> bool:
        """Whether the policy allows one more restart now; if not, ``exc`` says so."""
        now = time.monotonic()
        policy = healing.policy
        while healing.times and now - healing.times[0] > policy.window:
            healing.times.popleft()
        if len(healing.times) >= policy.max_restarts:
            if hasattr(exc, "add_note"):
                exc.add_note(
                    f"not restarted again: {len(healing.times)} restart(s) within "
                    f"{_duration(policy.window)} already (max_restarts={policy.max_restarts}; "
                    f"{healing.count} in the whole run)"
                )
            return False
        healing.times.append(now)
        return True

    async def _restart(
        self,
        key: tuple[str, int | None],
        members: list[RemoteActor],
        restart: Restart,
        healing: _Healing,
    ) -> None:
        """Kill the unit's processes, start new ones (setup() runs again), prime them; a new
        process that dies while starting is one more restart under the same budget."""
        waiter = self._restarting[key]
        module, services, config_dict, env_vars = self._spawn_args[key[0]]
        host_failures = 0  # the unit's new processes that could not start on its host, in a row
        try:
            # Bounded by the policy: every failed start spends one restart of its budget (a
            # count of tries ended restarts the policy allowed, when starting took longer than
            # its window)
            while True:
                await asyncio.to_thread(
                    terminate_processes,
                    [m.popen for m in members if m.popen is not None],
                    grace=0.0,
                    kill_wait=self.options.kill_timeout,
                    extra=[p for m in members for p in m.leftovers],
                )
                for member in members:
                    self._by_routing_id.pop(member.routing_id, None)
                    if member.state != "exited":
                        member.state = "exited"
                        self.record("exit", member, f"exit code {member.popen.returncode}")
                if self._closing or self.failure is not None:
                    return
                if healing.before_start is not None:
                    await healing.before_start(key[1])
                    if self._closing or self.failure is not None:
                        return
                spawn_model(
                    self,
                    module,
                    [m.assignment for m in members],
                    config_dict=config_dict,
                    services=services,
                    env_vars=env_vars,
                    actors=members,
                )
                for member in members:
                    self._popens.append(member.popen)
                    self._by_routing_id[member.routing_id] = member
                    self.record("spawn", member, f"pid {member.pid} (restart {restart.attempt})")
                results = await asyncio.gather(
                    *(m.start(fatal=False) for m in members), return_exceptions=True
                )
                errors = [r for r in results if isinstance(r, BaseException)]
                if not errors and healing.on_restart is not None:
                    for member in members:
                        member.state = "priming"
                    token = PRIMING.set(True)
                    try:
                        await healing.on_restart(key[1])
                    except (ActorDeadError, ActorError) as exc:
                        errors = [exc]
                    finally:
                        PRIMING.reset(token)
                if not errors:
                    restart.ready = time.time()
                    self.record(
                        "restarted", members[0], f"in {restart.ready - restart.started:.1f} s"
                    )
                    logger.info(
                        "model %r %s is back after %.1f s (restart %d)",
                        key[0],
                        f"replica {key[1]}" if key[1] is not None else "(all processes)",
                        restart.ready - restart.started,
                        restart.attempt,
                    )
                    for member in members:
                        if member.state == "priming":
                            member.state = "ready"
                    del self._restarting[key]
                    if not waiter.done():
                        waiter.set_result(None)
                    if self.on_restart_event is not None:
                        self.on_restart_event(restart)
                    return
                if self._closing or self.failure is not None:
                    return  # the run stopped while they started: no failure of theirs
                error = errors[0]
                cause = getattr(error, "cause", error)
                if isinstance(cause, ActorError) and not healing.policy.on_error:
                    self.fail(cause)  # setup() raised: starting again would raise again
                    return
                if not self._budget(healing, cause):
                    self.fail(cause)
                    return
                healing.count += 1
                restart.attempt = healing.count
                restart.tries += 1
                logger.warning(
                    "model %r: the restarted process failed while starting (%s); restart %d",
                    key[0],
                    _headline(cause),
                    healing.count,
                )
                for member in members:
                    member.state = "lost"
                host_failures = host_failures + 1 if _host_failure(self.cluster, cause) else 0
                if host_failures >= 2 or (host_failures and self._ssh_failed(cause)):
                    self._move(members, str(getattr(cause, "host", "")))
                    host_failures = 0
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a bug here must not leave the run waiting forever
            self.fail(exc)
        finally:
            self._lost_because.pop(key, None)
            if self._restarting.get(key) is waiter:
                del self._restarting[key]
                if not waiter.done():
                    waiter.set_exception(self.failure or ActorSystemClosedError("shut down"))
                    waiter.exception()

    def _ssh_failed(self, cause: BaseException) -> bool:
        host = getattr(cause, "host", "")
        code = getattr(cause, "exit_code", None)
        return self.cluster is not None and bool(self.cluster.describe_exit(host, code))

    def _move(self, members: list[RemoteActor], lost_host: str) -> None:
        """A host that can no longer start the unit's processes is lost: the unit moves to
        another host with room for it, if there is one (else it keeps trying there, within the
        policy, and the run ends naming the host)."""
        assert self.cluster is not None
        used: dict[str, tuple[list[int], list[int]]] = {}
        for actor in self._actors:
            if actor not in members and actor.state not in ("exited", "failed"):
                cpus, gpus = used.setdefault(actor.identity.host, ([], []))
                cpus.extend(actor.assignment.cpus)
                gpus.extend(actor.assignment.gpus)
        moved = relocate(
            [m.assignment for m in members],
            self.cluster.host_resources(self.host),
            used,
            avoid=lost_host,
        )
        if moved is None:
            logger.warning(
                "host %s cannot start model %r's processes and no other host has room for them",
                lost_host,
                members[0].identity.model,
            )
            return
        for member, assignment in zip(members, moved, strict=True):
            member.assignment = assignment
            member.identity = assignment.identity
        logger.warning(
            "host %s cannot start model %r's processes: moving them to host %s",
            lost_host,
            members[0].identity.model,
            moved[0].host,
        )
        self.record("moved", members[0], f"{lost_host} -> {moved[0].host}")

    # -- failure and shutdown ------------------------------------------------------------
    def fail(self, exc: BaseException) -> None:
        """Make `exc` the run's failure: fail every pending call and stop every process."""
        if self.failure is not None or self._closed:
            return
        self.failure = exc
        self.record("failure", detail=f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
        line = (
            getattr(exc, "config_error_line", lambda: None)()
            or ((str(exc).splitlines() or [type(exc).__name__])[0])
        )
        logger.error("stopping all actors: %s", line)
        for actor in self._actors:
            if self.server is not None:
                self.server.fail_pending(actor.routing_id, exc)
            if not actor.hello.done():
                actor.hello.set_exception(exc)
                actor.hello.exception()  # retrieved: nobody may be waiting any more
        for local in self._local:
            local.fail(exc)
        for waiter in self._restarting.values():
            if not waiter.done():
                waiter.set_exception(exc)
                waiter.exception()  # retrieved: the run's failure reaches the callers anyway
        self._stop_task = asyncio.get_running_loop().create_task(self._stop_processes())

    async def _stop_processes(self) -> None:
        """Terminate → bounded wait → kill every process tree (off the event loop)."""
        popens = [a.popen for a in self._actors if a.popen is not None]
        for actor in self._actors:
            if actor.state not in ("exited",):
                actor.state = "stopping" if not exited(actor.popen) else actor.state
        await asyncio.to_thread(
            terminate_processes,
            popens,
            grace=self.options.kill_timeout,
            kill_wait=self.options.kill_timeout,
            extra=[p for a in self._actors for p in a.leftovers],
        )
        for actor in self._actors:
            if actor.state != "exited" and actor.popen.poll() is not None:
                actor.state = "exited"
                self.record("exit", actor, f"exit code {actor.popen.returncode}")
        self.record("stopped")

    async def shutdown(self) -> None:
        """Stop the run: SHUTDOWN to healthy actors, wait (bounded), then terminate/kill.

        Runs to its end even when the caller is cancelled meanwhile (the cancellation is raised
        after it): a second cancel of a stopping run left an actor, the runtime directory and
        its sockets behind, and no later call could finish the stop. Every call waits for the
        same stop."""
        if self._closed:
            return
        if self._shutdown_task is None:
            self._closing = True
            self.record("shutdown")
            self._shutdown_task = asyncio.ensure_future(self._shutdown())
        cancelled = False
        while True:
            try:
                await asyncio.shield(self._shutdown_task)
                break
            except asyncio.CancelledError:
                if not self._shutdown_task.done():
                    cancelled = True  # finish the stop first (bounded by shutdown_timeout)
                    continue
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
                break  # the stop itself was cancelled (the loop closing): not this caller
        if cancelled:
            raise asyncio.CancelledError

    async def _shutdown(self) -> None:
        try:
            ready = [a for a in self._actors if a.state == "ready" and a.popen.poll() is None]
            if self.failure is None and ready:
                # An actor stops its children before it exits; should it die first, they are
                # stopped from here (`_stop_processes`): found now, as it may be reaped unseen.
                # (each a scan of the host's processes: off the loop)
                found = await asyncio.to_thread(lambda: [descendants([a.popen]) for a in ready])
                for actor, procs in zip(ready, found, strict=True):
                    actor.leftovers = _merged(actor.leftovers, procs)
                await asyncio.gather(
                    *(self._request_shutdown(a) for a in ready), return_exceptions=True
                )
                await asyncio.to_thread(
                    _wait_all, [a.popen for a in ready], self.options.shutdown_timeout
                )
            if self._stop_task is not None:
                await asyncio.shield(self._stop_task)
            else:
                await self._stop_processes()
            for local in self._local:
                await local.close_services()
            await asyncio.gather(*(local.close() for local in self._local))
        finally:
            await self._close_runtime()

    async def _request_shutdown(self, actor: RemoteActor) -> None:
        actor.state = "stopping"
        with contextlib.suppress(Exception):
            await self.server.request(
                actor.routing_id, MessageKind.SHUTDOWN, timeout=self.options.shutdown_timeout
            )

    async def _close_runtime(self) -> None:
        for task in list(self._restart_tasks):
            task.cancel()
        await asyncio.gather(*self._restart_tasks, return_exceptions=True)
        if self._restart_tasks:
            await self._stop_processes()  # what a cancelled restart had started
        if self._stop_task is not None:  # a failure may have come in during shutdown
            await asyncio.gather(self._stop_task, return_exceptions=True)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for actor in self._actors:
            if actor.stderr is not None:
                await asyncio.to_thread(actor.stderr.join, 1.0)
        if self.server is not None:
            await self.server.aclose(0)
        self._release()

    def _release(self) -> None:
        """The end of every stop, once the server is closed: the runtime directory, the run's
        keys and the actors' stdin pipes go, and the system is closed."""
        if self.runtime_dir is not None:
            self.runtime_dir.close()
        if self.server is not None:
            security.remove(self.security)
        close_stdin(a.popen for a in self._actors if a.popen is not None)
        self._closed = True
        self._finalizer.detach()
        self.record("closed")

    @property
    def loop_closed(self) -> bool:
        """Whether the event loop the run started on is closed (it ended without ``shutdown()``:
        a second ``asyncio.run`` cannot await what the first one left)."""
        return bool(self._tasks) and self._tasks[0].get_loop().is_closed()

    def stop_abandoned(self) -> None:
        """``shutdown()`` of a run whose event loop is closed (`loop_closed`): terminate and
        kill every process tree from here, synchronously, and release the runtime directory."""
        if self._closed:
            return
        self._closing = True
        self.record("shutdown", detail="its event loop is closed")
        terminate_processes(
            [a.popen for a in self._actors if a.popen is not None],
            grace=self.options.kill_timeout,
            kill_wait=self.options.kill_timeout,
            extra=[p for a in self._actors for p in a.leftovers],
        )
        self._tasks = []
        if self.server is not None:
            self.server.close(0)
        self._release()

    def identities(self) -> dict[str, list[bytes]]:
        """Each model's actors' routing identities (secret to the run: for diagnostics)."""
        result: dict[str, list[bytes]] = {}
        for actor in self._actors:
            result.setdefault(actor.identity.model, []).append(actor.routing_id)
        return result

    @property
    def num_restarts(self) -> int:
        """Restarts so far: every new set of processes a lost unit got."""
        return sum(restart.tries for restart in self.restarts)

    def raise_if_failed(self) -> None:
        if self.failure is not None:
            raise self.failure

    async def send_ping(self, handle: ActorHandle, timeout: float = 5.0) -> float:
        """Round trip of a PING to one actor's socket loop (not its compute thread), in s."""
        backend = handle._backend
        if not isinstance(backend, RemoteActor):
            return 0.0
        start = time.perf_counter()
        await self.server.request(backend.routing_id, MessageKind.PING, timeout=timeout)
        return time.perf_counter() - start


def _host_failure(cluster: Hosts | None, cause: BaseException) -> bool:
    """Whether a restarted process failed in a way that blames its host: on a multi-host run, it
    ended by itself (not by a signal, also one its remote shell reports as 128 + signal) while
    starting, e.g. ssh failed or the host has no such interpreter any more."""
    code = getattr(cause, "exit_code", None)
    return (
        cluster is not None
        and isinstance(cause, ActorDeadError)
        and code is not None
        and code >= 0
        and shell_signal(code) is None
    )


def _headline(exc: BaseException) -> str:
    """The first line of an error (an actor's error goes on with its stderr and traceback)."""
    return one_line((str(exc).splitlines() or [type(exc).__name__])[0])


def _duration(seconds: float) -> str:
    if seconds >= 60:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"


def _wait_all(popens: list[Any], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for popen in popens:
        with contextlib.suppress(Exception):
            popen.wait(max(0.0, deadline - time.monotonic()))


def _merged(known: list[Any], found: list[Any]) -> list[Any]:
    """``known`` leftover processes and newly ``found`` ones, each once (by pid): a child seen
    at SHUTDOWN that has left the tree by the actor's exit is still stopped."""
    return list({proc.pid: proc for proc in (*known, *found)}.values())
