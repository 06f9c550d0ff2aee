"""Coordinator-side handles: `ActorHandle` (one actor process) and `ModelGroup` (one model).

Runs in the coordinator.

Both are plain asyncio objects, usable from any coroutine of the coordinator:

    handle = group[0]
    out = await handle.call("forward_step", batch)             # one rank
    outs = await group.call_all("before_episode")               # every rank, in rank order
    outs = await group.scatter("forward_step", [b0, b1])        # item i to process i
    await handle.options(timeout=30).call("save_checkpoint", 10) # with a call timeout

A handle talks to an actor backend: a worker process over the control socket, or the in-process
actor (same interface, no sockets). Errors are the runtime's: `ActorError` when the user's code
raised (with the remote traceback), `ActorDeadError` when the process died or hung.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from chatlearn.actors.identity import ActorIdentity

__all__ = ["ActorHandle", "ModelGroup"]

_DEFAULT = object()


class ActorBackend(Protocol):
    """What a handle needs from an actor (remote process or in-process)."""

    identity: ActorIdentity
    info: dict[str, Any]

    @property
    def pid(self) -> int | None: ...

    async def request(
        self, method: str, args: list[Any], kwargs: dict[str, Any], timeout: float | None
    ) -> Any: ...


class ActorHandle:
    """An async handle to one actor: `await handle.call("method", *args, **kwargs)`."""

    __slots__ = ("_backend", "_timeout")

    def __init__(self, backend: ActorBackend, *, timeout: float | None = None) -> None:
        self._backend = backend
        self._timeout = timeout

    @property
    def identity(self) -> ActorIdentity:
        """Which actor this is: model, replica, rank, world size, replica count, host (the host
        changes when a restart moves the actor to another one)."""
        return self._backend.identity

    # the parts of `identity` callers read most
    @property
    def model(self) -> str:
        return self._backend.identity.model

    @property
    def replica_id(self) -> int:
        return self._backend.identity.replica_id

    @property
    def rank(self) -> int:
        return self._backend.identity.rank

    @property
    def world_size(self) -> int:
        return self._backend.identity.world_size

    @property
    def host(self) -> str:
        return self._backend.identity.host

    @property
    def pid(self) -> int | None:
        return self._backend.pid

    @property
    def incarnation(self) -> int:
        """How many times the actor's process was restarted (self-healing; 0 at first)."""
        return int(getattr(self._backend, "incarnation", 0))

    @property
    def info(self) -> dict[str, Any]:
        """What the actor reported when it became ready: pid, host, cpus, gpus, torch_threads."""
        return self._backend.info

    def options(self, *, timeout: float | None | object = _DEFAULT) -> ActorHandle:
        """A handle to the same actor whose calls use these options.

        `timeout` (seconds, None for none) bounds each call; a call that exceeds it raises
        `ActorTimeoutError` and stops the run, since the actor's compute thread is stuck.
        """
        new_timeout = self._timeout if timeout is _DEFAULT else timeout
        return ActorHandle(self._backend, timeout=new_timeout)  # type: ignore[arg-type]

    async def call(self, method: str, /, *args: Any, **kwargs: Any) -> Any:
        """Run `method` on the actor (a module method, or `"service.method"`) and return it."""
        return await self._backend.request(method, list(args), kwargs, self._timeout)

    def __repr__(self) -> str:
        return (
            f"ActorHandle({self.model!r}, replica={self.replica_id}, rank={self.rank}, "
            f"pid={self.pid})"
        )


async def gather_calls(calls: Sequence[Any]) -> list[Any]:
    """Await all calls; if any failed, raise one error (the run's root cause when it is one).

    Waiting for all (instead of failing on the first) leaves no orphaned exceptions behind; a
    fatal failure fails every pending call at once, so this never waits on a dead run.
    """
    results = await asyncio.gather(*calls, return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        from chatlearn.actors.errors import ActorDeadError

        dead = [e for e in errors if isinstance(e, ActorDeadError)]
        raise (dead or errors)[0]
    return results


class ModelGroup:
    """All actor processes of one model, ordered by (replica, rank)."""

    def __init__(self, name: str, handles: Sequence[ActorHandle]) -> None:
        self.name = name
        self.handles = list(handles)

    @property
    def num_replica(self) -> int:
        return self.handles[0].identity.num_replica if self.handles else 0

    @property
    def world_size(self) -> int:
        """Ranks per replica (the torch.distributed group size)."""
        return self.handles[0].world_size if self.handles else 0

    @property
    def replicas(self) -> list[list[ActorHandle]]:
        """Handles grouped by replica: `replicas[r][rank]`."""
        out: list[list[ActorHandle]] = [[] for _ in range(self.num_replica)]
        for handle in self.handles:
            out[handle.replica_id].append(handle)
        return out

    def __len__(self) -> int:
        return len(self.handles)

    def __iter__(self) -> Iterator[ActorHandle]:
        return iter(self.handles)

    def __getitem__(self, index: int) -> ActorHandle:
        return self.handles[index]

    def options(self, *, timeout: float | None | object = _DEFAULT) -> ModelGroup:
        """The same group whose calls use these options (see `ActorHandle.options`)."""
        return ModelGroup(self.name, [h.options(timeout=timeout) for h in self.handles])

    async def call(self, index: int, method: str, /, *args: Any, **kwargs: Any) -> Any:
        """Call one process (index into `handles`, i.e. replica-major rank order)."""
        return await self.handles[index].call(method, *args, **kwargs)

    async def call_all(self, method: str, /, *args: Any, **kwargs: Any) -> list[Any]:
        """Call every process with the same arguments; results in process order."""
        return await gather_calls([h.call(method, *args, **kwargs) for h in self.handles])

    async def scatter(
        self, method: str, items: Sequence[Any], /, *args: Any, **kwargs: Any
    ) -> list[Any]:
        """Call process i with `items[i]` as first argument (then `args`, `kwargs`)."""
        if len(items) != len(self.handles):
            raise ValueError(
                f"scatter over model {self.name!r}: {len(items)} items for "
                f"{len(self.handles)} processes"
            )
        calls = [
            h.call(method, item, *args, **kwargs)
            for h, item in zip(self.handles, items, strict=True)
        ]
        return await gather_calls(calls)

    def __repr__(self) -> str:
        return f"ModelGroup({self.name!r}, processes={len(self.handles)})"
