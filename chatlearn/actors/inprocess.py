"""In-process actors: modules run inside the coordinator, with the same handles and errors.

Runs in the coordinator: here the actors live in the coordinator's own process.

For debugging and unit tests (`ActorSystem(in_process=True)`): no processes, no sockets, no
pinning. Each actor still has its own compute thread (calls run in order, off the event loop),
services get a `WorkerContext` on the coordinator's loop, and user exceptions come back as
`ActorError` with the traceback. Arguments and results go through an encode/decode round trip
of the wire codec, so a value that could not cross a process boundary fails here too, and the
actor never shares mutable objects with the caller.

Differences from real actors: the replicas' `setup()` calls run one after another (they share
one interpreter, whose imports are not all thread-safe), the module shares the coordinator's
config object (changes are visible both ways), a replica must have a single rank (no
torch.distributed group), and a call that times out leaves its compute thread running (the run
is still stopped; its stop waits for the thread up to `shutdown_timeout`, as long as an actor
process gets to exit).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from chatlearn.actors.errors import ActorError, ActorSystemClosedError, ActorTimeoutError
from chatlearn.actors.handles import ActorHandle, ModelGroup
from chatlearn.actors.identity import ActorIdentity
from chatlearn.actors.module import BaseModule
from chatlearn.actors.placement import ModelResources
from chatlearn.actors.worker_core import (
    USER_CODE_ERRORS,
    ActorCore,
    ActorSpec,
    ComputeThread,
    WorkerContext,
    user_error,
)
from chatlearn.transport import EncodeError, RuntimeDir, decode, encode, process_context

if TYPE_CHECKING:
    from chatlearn.actors.runtime import ActorSystem

__all__ = ["LocalActor", "launch_in_process"]

logger = logging.getLogger("chatlearn.actors")


def _wire_copy(obj: Any) -> Any:
    """What the other side of a socket would get (bytes copied: no aliasing with the sender)."""
    return decode([bytes(frame) for frame in encode(obj)])


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


class LocalActor:
    """One in-process actor (the backend of its `ActorHandle`)."""

    def __init__(
        self,
        system: ActorSystem,
        template: BaseModule,
        *,
        replica_id: int,
        num_replica: int,
        services: Mapping[str, str],
    ) -> None:
        self.system = system
        # a single rank per replica, on this host
        self.identity = ActorIdentity(
            model=template.name, replica_id=replica_id, num_replica=num_replica
        )
        self.info: dict[str, Any] = {}
        self._failure: BaseException | None = None
        self.compute = ComputeThread(f"chatlearn-inproc-{template.name}-{replica_id}")
        spec = ActorSpec(
            identity=self.identity,
            class_ref=None,  # the class object is used directly
            services=dict(services),
            # Services bind their ipc endpoints (trainer inboxes) in the run's directory.
            runtime_dir=str(system.runtime_dir.path) if system.runtime_dir else None,
            runtime_state=template._start_state(),
        )
        ctx = WorkerContext(
            spec,
            routing_id=f"{self.identity.label}.inproc".encode(),
            loop=asyncio.get_running_loop(),
            compute=self.compute,
            zmq_context=process_context(),
            in_process=True,
        )
        self.core = ActorCore(spec, ctx, config_args=template.global_args, klass=type(template))

    @property
    def pid(self) -> int:
        return os.getpid()

    def where(self, method: str) -> dict[str, Any]:
        return self.identity.where(self.pid, method)

    async def start(self) -> None:
        try:
            self.info = await asyncio.wrap_future(self.compute.submit("setup", self.core.start))
            self.core.build_services()
            self.info["services"] = sorted(self.core.services)
        except USER_CODE_ERRORS as exc:
            err = ActorError.from_remote(user_error(exc, self.where(self.core.phase)))
            self.system.record("error", self, f"{err.type_name} in {err.method}")
            self.system.fail(err)
            raise err from None
        self.system.record("ready", self)

    async def request(
        self, method: str, args: list[Any], kwargs: dict[str, Any], timeout: float | None
    ) -> Any:
        if self._failure is not None:
            raise self._failure
        if timeout is None:
            timeout = self.system.options.call_timeout
        args, kwargs = _wire_copy([args, kwargs])
        call = asyncio.ensure_future(self._call(method, args, kwargs))
        # Its error fails the run (`_call`), which may cancel this caller before it looks.
        call.add_done_callback(_retrieve)
        try:
            result = await asyncio.wait_for(asyncio.shield(call), timeout)
        except TimeoutError:
            assert timeout is not None
            timed_out = ActorTimeoutError.of(
                self.identity, method=method, timeout=timeout, pid=self.pid
            )
            self.system.fail(timed_out)
            raise timed_out from None
        return result

    async def _call(self, method: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        """The call's result as the caller would receive it; a user error (an unsendable
        result too) as the `ActorError` an actor process would send back.

        Converted here, inside the call's task: a SystemExit (KeyboardInterrupt) that ends a
        task is re-raised by asyncio out of the event loop itself, and `sys.exit(5)` in a hook
        ended the user's program with exit code 5 and no message."""
        try:
            result = await self.core.call(method, args, kwargs)
            try:
                return _wire_copy(result)
            except EncodeError as exc:
                raise EncodeError(
                    f"the return value of {method!r} cannot be sent back: {exc}"
                ) from None
        except USER_CODE_ERRORS as exc:
            if self._failure is not None and exc is self._failure:
                raise
            err = ActorError.from_remote(user_error(exc, self.where(method)))
            if self.system.options.fail_fast:
                self.system.fail(err)
            raise err from None

    def fail(self, exc: BaseException) -> None:
        self._failure = exc

    async def close_services(self) -> None:
        """Close the services' sockets (trainer inboxes, senders) on this event loop."""
        for service in list(self.core.services.values()):
            close = getattr(service, "close", None)
            if close is None:
                continue
            with contextlib.suppress(Exception):  # best effort: the run is ending
                result = close()
                if inspect.isawaitable(result):
                    await asyncio.wait_for(result, 1.0)

    async def close(self) -> None:
        """Stop the compute thread and wait for it (up to `shutdown_timeout`, as an actor
        process gets to exit): a daemon thread still inside torch when the interpreter exits
        can abort it ("terminate called without an active exception", exit 134)."""
        if self._failure is None:  # what calls still queued fail with
            self._failure = ActorSystemClosedError(
                f"in-process actor {self.identity.model} is closed"
            )
        self.compute.stop(self._failure)
        timeout = self.system.options.shutdown_timeout
        if not await asyncio.to_thread(self.compute.join, timeout):
            logger.warning(
                "in-process actor %s replica %d is still running %r after %g s; not waiting",
                self.identity.model,
                self.identity.replica_id,
                self.compute.current,
                timeout,
            )


async def launch_in_process(
    system: ActorSystem,
    modules: Sequence[BaseModule],
    services: Mapping[str, Mapping[str, str]],
) -> list[ModelGroup]:
    """Build and start every replica of `modules` in this process."""
    planned: list[tuple[BaseModule, int]] = []
    for module in modules:
        resources = ModelResources.from_config(module.name, module.module_args)
        num_processes, per_replica = resources.layout()
        if per_replica > 1:
            raise ValueError(
                f"model {module.name!r} has {per_replica} ranks per replica, which need a "
                "torch.distributed group across processes; in-process mode runs single-rank "
                "replicas only (use in_process=False, or give the model one process)"
            )
        planned.append((module, num_processes))
    if system.runtime_dir is None:
        system.runtime_dir = RuntimeDir()  # removed by the system's shutdown
    groups: list[ModelGroup] = []
    actors: list[LocalActor] = []
    for module, num_replica in planned:
        replicas = [
            LocalActor(
                system,
                module,
                replica_id=r,
                num_replica=num_replica,
                services=services.get(module.name, {}),
            )
            for r in range(num_replica)
        ]
        system._local.extend(replicas)
        actors.extend(replicas)
        groups.append(ModelGroup(module.name, [ActorHandle(a) for a in replicas]))
    # One setup() at a time: here they share one interpreter, whose imports are not all
    # thread-safe (two HF modules setting up at once failed with "cannot import name
    # 'PreTrainedTokenizerFast' from 'transformers'", a lazy module half imported by the other
    # thread); each actor process imports alone. Every replica is still started, as before.
    errors: list[Exception] = []
    for actor in actors:
        try:
            await actor.start()
        except Exception as exc:
            errors.append(exc)
    if errors:
        raise system.failure or errors[0]
    return groups
