"""One ZeroMQ socket on asyncio, with fast paths; the building block of every channel.

`zmq.asyncio` creates a future and polls EVENTS several times per operation. When the socket is
ready we send or receive directly on a synchronous shadow of the same socket with DONTWAIT
instead (what zmq.asyncio would do, minus the bookkeeping), and fall back to the awaitable path
on EAGAIN; on the control plane's small messages this is a sizeable part of the round trip.
Errors come out as the transport's typed errors, and closing also removes the socket file of a
bound ipc endpoint, which libzmq 4.3 leaves behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import stat
from typing import Any

import zmq
import zmq.asyncio

from chatlearn.transport.errors import ChannelClosedError, PeerUnreachableError, TransportError


def async_context(context: zmq.Context | None) -> zmq.asyncio.Context:
    if context is None:
        return zmq.asyncio.Context.instance()
    if isinstance(context, zmq.asyncio.Context):
        return context
    if isinstance(context, zmq.Context):
        return zmq.asyncio.Context.shadow(context)
    raise TypeError(f"context must be a zmq.Context, got {type(context).__qualname__}")


def _cancelled_by_us() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class AsyncSocket:
    """A `zmq.asyncio` socket plus a synchronous shadow for fast paths (see the module doc).

    A direct operation can consume the edge of ZeroMQ's edge-triggered fd, so afterwards we read
    EVENTS through the async socket, which makes it reschedule any waiter that is now ready.
    """

    __slots__ = ("sock", "sync", "closed", "_num_send_waiting", "_ipc_paths")

    def __init__(
        self,
        context: zmq.Context | None,
        socket_type: int,
        *,
        linger_ms: int,
        options: dict[int, int | bytes],
    ) -> None:
        self.sock = async_context(context).socket(socket_type)
        try:
            self.sock.setsockopt(zmq.LINGER, linger_ms)
            for option, value in options.items():
                self.sock.setsockopt(option, value)
        except BaseException:
            self.sock.close(linger=0)
            raise
        self.sync = zmq.Socket.shadow(self.sock.underlying)
        self.closed = False
        self._num_send_waiting = 0
        self._ipc_paths: list[str] = []

    def bind_or_connect(self, endpoint: str, *, bind: bool) -> str:
        """Bind (returning the resolved endpoint, e.g. the ephemeral port) or connect."""
        try:
            if bind:
                self.sock.bind(endpoint)
                resolved = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
                if resolved.startswith("ipc://"):
                    self._ipc_paths.append(resolved.removeprefix("ipc://"))
                return resolved
            self.sock.connect(endpoint)
            return endpoint
        except BaseException:
            self.close(0)
            raise

    async def send(self, frames: list[Any]) -> None:
        if self.closed:
            raise ChannelClosedError("socket is closed")
        try:
            # Keep order: only jump ahead if no earlier send is still waiting for room.
            if not self._num_send_waiting:
                try:
                    self.sync.send_multipart(frames, zmq.DONTWAIT, copy=False)
                except zmq.Again:
                    pass
                else:
                    self.sock.get(zmq.EVENTS)
                    return
            self._num_send_waiting += 1
            try:
                await self.sock.send_multipart(frames, copy=False)
            finally:
                self._num_send_waiting -= 1
        except asyncio.CancelledError:
            if self.closed and not _cancelled_by_us():
                raise ChannelClosedError("socket closed during send") from None
            raise
        except zmq.ZMQError as exc:
            raise self._translate(exc) from exc

    async def recv(self) -> list[zmq.Frame]:
        if self.closed:
            raise ChannelClosedError("socket is closed")
        try:
            try:
                frames = self.sync.recv_multipart(zmq.DONTWAIT, copy=False)
            except zmq.Again:
                return await self.sock.recv_multipart(copy=False)
            self.sock.get(zmq.EVENTS)
            return frames
        except asyncio.CancelledError:
            if self.closed and not _cancelled_by_us():
                raise ChannelClosedError("socket closed during recv") from None
            raise
        except zmq.ZMQError as exc:
            raise self._translate(exc) from exc

    def _translate(self, exc: zmq.ZMQError) -> TransportError:
        if exc.errno == errno.EHOSTUNREACH:
            return PeerUnreachableError("no connected peer has that identity")
        if self.closed or exc.errno in (errno.ENOTSOCK, zmq.ETERM):
            return ChannelClosedError(f"socket closed: {exc}")
        return TransportError(f"zmq error: {exc}")

    def close(self, linger: int | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.sock.close(linger=linger)
        except RuntimeError:
            # The event loop is already closed and cannot unregister the fd: close the socket
            # itself, which is what matters (no fd, no ipc file left behind).
            zmq.Socket.close(self.sock, linger=linger)
        # libzmq 4.3 leaves the socket file of a bound ipc endpoint behind; remove it (only if
        # it is still a socket: never delete anything else that took its name).
        for path in self._ipc_paths:
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)
