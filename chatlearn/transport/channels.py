"""Async channels for asyncio (uvloop): control plane (ROUTER/DEALER), data plane (PUSH/PULL).

- `ControlServer` (ROUTER, the coordinator, one for all actors) and `ControlClient` (DEALER, one
  per actor, its identity is its name). The server allocates request ids and maps each one to a
  future: `request()` resolves with the peer's REPLY/READY payload or raises `RemoteError` for
  its ERROR; many requests may be in flight per peer. Everything else the peers send (HELLO,
  HEARTBEAT, DEAD, late replies) is queued for `recv_unsolicited()`. Incoming messages are
  dispatched straight from the socket's reader callback (no receive task, no task switch); a
  malformed one is logged, counted (`num_malformed`) and dropped, never fatal.
- `DataSender` (PUSH) and `DataReceiver` (PULL) carry codec-encoded objects (micro-batches).
  Both ends set a high-water mark of ``hwm`` messages, so a slow consumer makes ``send()`` wait
  (backpressure) instead of letting queues grow: at most about ``2 * hwm`` messages plus what
  fits in the kernel's socket buffer are in flight.

Frames are sent with ``copy=False`` (tensor memory goes to ZeroMQ as is: do not modify a tensor
in place after sending it until the send has completed) and received with ``copy=False`` (decoded
tensors alias the received frames). Receiving sockets enforce ``Limits.max_message_bytes`` per
frame in libzmq too (``ZMQ_MAXMSGSIZE``: a peer sending more is disconnected before we buffer it).
Every socket is closed with a bounded linger, and a bound ipc endpoint's socket file is removed.

Closing a `DataSender` while its receiver is still a full queue behind can drop the queued tail
even within the linger (libzmq #4660 / pyzmq #1934, reproduced here): close a sender only after
the receiver has confirmed what it needs (the engine's credits do exactly that).

Sockets come from a `zmq.asyncio.Context` (the process-wide instance unless one is given) and
are driven by `sockets.AsyncSocket`. All channels of a process must be used from one event loop;
`close()` is synchronous so it can run in ``finally`` blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from typing import Any

import zmq
import zmq.asyncio

from chatlearn.transport.codec import (
    DEFAULT_INLINE_THRESHOLD,
    DEFAULT_LIMITS,
    Limits,
    decode,
    encode,
)
from chatlearn.transport.errors import (
    ChannelClosedError,
    DecodeError,
    RemoteError,
    RequestTimeoutError,
)
from chatlearn.transport.messages import (
    REPLY_KINDS,
    Message,
    MessageKind,
    decode_message,
    encode_message,
)
from chatlearn.transport.sockets import AsyncSocket

log = logging.getLogger(__name__)

# Long enough for queued messages to reach a live peer, short enough that closing never hangs.
DEFAULT_LINGER_MS = 1000
# Data-plane messages are micro-batches of megabytes: a few in flight keep the pipe busy.
DEFAULT_DATA_HWM = 8
# Malformed messages logged at WARNING before we drop to DEBUG (a flood must not flood the log).
_NUM_MALFORMED_LOGGED = 10
_CLOSED = object()


class ControlServer:
    """The coordinator's ROUTER: requests to actors by identity, and their unsolicited messages."""

    def __init__(
        self,
        endpoint: str,
        *,
        context: zmq.Context | None = None,
        limits: Limits = DEFAULT_LIMITS,
        linger_ms: int = DEFAULT_LINGER_MS,
    ) -> None:
        self._limits = limits
        self._socket = AsyncSocket(
            context,
            zmq.ROUTER,
            linger_ms=linger_ms,
            options={
                # Sending to an unknown identity is an error, not a silent drop.
                zmq.ROUTER_MANDATORY: 1,
                # A restarted actor reconnecting under its old identity takes over the route.
                zmq.ROUTER_HANDOVER: 1,
                zmq.MAXMSGSIZE: limits.max_message_bytes,
            },
        )
        self.endpoint: str = self._socket.bind_or_connect(endpoint, bind=True)
        self._pending: dict[int, tuple[bytes, asyncio.Future[Any]]] = {}
        self._request_ids = itertools.count(1)
        self._unsolicited: asyncio.Queue[Any] = asyncio.Queue()
        self._started = False
        self._closed = False
        self.num_malformed = 0

    @property
    def closed(self) -> bool:
        return self._closed

    def bind(self, endpoint: str) -> str:
        """Also accept peers on `endpoint` (e.g. tcp for remote hosts); returns it resolved."""
        return self._socket.bind_or_connect(endpoint, bind=True)

    @property
    def num_pending(self) -> int:
        """Requests sent and not yet answered (or timed out)."""
        return len(self._pending)

    async def request(
        self,
        identity: bytes,
        kind: MessageKind,
        payload: Any = None,
        *,
        timeout: float | None = None,
    ) -> Any:
        """Send a request to ``identity`` and return the payload of its REPLY/READY.

        Raises `RemoteError` for an ERROR answer, `RequestTimeoutError` after ``timeout``
        seconds, `PeerUnreachableError` if no peer has that identity, `ChannelClosedError` if
        the server closes (or `fail_pending` gives another error) meanwhile.
        """
        self._start()
        request_id = next(self._request_ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = (identity, future)
        try:
            frames = encode_message(Message(kind=kind, request_id=request_id, payload=payload))
            await self._socket.send([identity, *frames])
            if timeout is None:
                return await future
            try:
                async with asyncio.timeout(timeout):
                    return await future
            except TimeoutError:
                raise RequestTimeoutError(
                    f"no answer to {kind.name} request {request_id} from {identity!r}"
                    f" within {timeout:g}s"
                ) from None
        finally:
            self._pending.pop(request_id, None)

    async def send(self, identity: bytes, msg: Message) -> None:
        """Send one message to ``identity`` without waiting for an answer."""
        self._start()
        await self._socket.send([identity, *encode_message(msg)])

    async def recv_unsolicited(self) -> tuple[bytes, Message]:
        """The next message that is not an answer to a pending request: ``(identity, msg)``."""
        self._start()
        item = await self._unsolicited.get()
        if item is _CLOSED:
            self._unsolicited.put_nowait(_CLOSED)  # wake the next waiter too
            raise ChannelClosedError("control server closed")
        return item

    def fail_pending(self, identity: bytes, exc: BaseException) -> None:
        """Fail every in-flight request to ``identity`` with ``exc`` (e.g. the actor died)."""
        for peer, future in list(self._pending.values()):
            if peer == identity:
                _set_exception(future, exc)

    def _start(self) -> None:
        if self._closed:
            raise ChannelClosedError("control server is closed")
        if not self._started:
            self._started = True
            self._socket.set_handler(self._dispatch)

    def _dispatch(self, frames: list[zmq.Frame]) -> None:
        """Handles each incoming message, from the socket's reader callback (no task switch):
        resolves the pending request it answers, or queues it as unsolicited. Bad input is
        logged, counted and dropped; nothing raises out of here."""
        identity = frames[0].bytes
        try:
            if len(frames) < 2:
                raise DecodeError("no message frames after the identity")
            msg = decode_message(frames[1:], limits=self._limits)
        except Exception as exc:  # DecodeError, or a codec bug: neither may kill the loop
            self._malformed(identity, exc)
            return
        if msg.kind in REPLY_KINDS:
            entry = self._pending.get(msg.request_id)
            if entry is not None and entry[0] == identity:
                future = entry[1]
                if not future.done():
                    if msg.kind is MessageKind.ERROR:
                        future.set_exception(RemoteError.from_payload(msg.payload))
                    else:
                        future.set_result(msg.payload)
                return
        self._unsolicited.put_nowait((identity, msg))

    def _malformed(self, identity: bytes, exc: Exception) -> None:
        self.num_malformed += 1
        level = logging.WARNING if self.num_malformed <= _NUM_MALFORMED_LOGGED else logging.DEBUG
        log.log(
            level,
            "control server %s: dropped malformed message #%d from %r: %s: %s",
            self.endpoint,
            self.num_malformed,
            identity,
            type(exc).__name__,
            exc,
            exc_info=not isinstance(exc, DecodeError),
        )

    def close(self, linger: int | None = None) -> None:
        """Fail pending requests and waiters, close the socket (bounded linger)."""
        if self._closed:
            return
        self._closed = True
        closed = ChannelClosedError("control server closed")
        for _, future in list(self._pending.values()):
            _set_exception(future, closed)
        self._unsolicited.put_nowait(_CLOSED)
        self._socket.close(linger)

    async def aclose(self, linger: int | None = None) -> None:
        """`close()` (kept async for symmetry with other closables; nothing to wait for)."""
        self.close(linger)

    def __enter__(self) -> ControlServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> ControlServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class ControlClient:
    """An actor's DEALER: connects to the coordinator's `ControlServer` under ``identity``."""

    def __init__(
        self,
        endpoint: str,
        identity: bytes,
        *,
        context: zmq.Context | None = None,
        limits: Limits = DEFAULT_LIMITS,
        linger_ms: int = DEFAULT_LINGER_MS,
    ) -> None:
        if not identity or identity.startswith(b"\0"):
            raise ValueError("identity must be non-empty and must not start with a NUL byte")
        self.identity = identity
        self._limits = limits
        self._socket = AsyncSocket(
            context,
            zmq.DEALER,
            linger_ms=linger_ms,
            options={zmq.ROUTING_ID: identity, zmq.MAXMSGSIZE: limits.max_message_bytes},
        )
        self.endpoint = self._socket.bind_or_connect(endpoint, bind=False)

    @property
    def closed(self) -> bool:
        return self._socket.closed

    async def send(self, msg: Message) -> None:
        """Send one message (an answer copies the request's ``request_id``)."""
        await self._socket.send(encode_message(msg))

    async def recv(self) -> Message:
        """The next message from the server; a malformed one raises a `DecodeError`."""
        return decode_message(await self._socket.recv(), limits=self._limits)

    def close(self, linger: int | None = None) -> None:
        self._socket.close(linger)

    async def aclose(self, linger: int | None = None) -> None:
        self.close(linger)

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> ControlClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()


class DataSender:
    """PUSH end of the data plane: ``await send(obj)`` waits while the receiver is far behind."""

    def __init__(
        self,
        endpoint: str,
        *,
        bind: bool = False,
        hwm: int = DEFAULT_DATA_HWM,
        context: zmq.Context | None = None,
        linger_ms: int = DEFAULT_LINGER_MS,
        inline_threshold: int = DEFAULT_INLINE_THRESHOLD,
    ) -> None:
        if hwm < 1:
            raise ValueError(f"hwm must be >= 1 (0 would mean unbounded), got {hwm}")
        self._inline_threshold = inline_threshold
        self._socket = AsyncSocket(
            context, zmq.PUSH, linger_ms=linger_ms, options={zmq.SNDHWM: hwm}
        )
        self.endpoint = self._socket.bind_or_connect(endpoint, bind=bind)

    @property
    def closed(self) -> bool:
        return self._socket.closed

    async def send(self, obj: Any) -> None:
        """Encode and send ``obj``; returns once ZeroMQ has queued it (tensors are not copied)."""
        await self._socket.send(encode(obj, inline_threshold=self._inline_threshold))

    def close(self, linger: int | None = None) -> None:
        self._socket.close(linger)

    async def aclose(self, linger: int | None = None) -> None:
        self.close(linger)

    def __enter__(self) -> DataSender:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> DataSender:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()


class DataReceiver:
    """PULL side of the data plane: ``await recv()`` returns the next decoded object."""

    def __init__(
        self,
        endpoint: str,
        *,
        bind: bool = True,
        hwm: int = DEFAULT_DATA_HWM,
        context: zmq.Context | None = None,
        limits: Limits = DEFAULT_LIMITS,
        linger_ms: int = DEFAULT_LINGER_MS,
    ) -> None:
        if hwm < 1:
            raise ValueError(f"hwm must be >= 1 (0 would mean unbounded), got {hwm}")
        self._limits = limits
        self._socket = AsyncSocket(
            context,
            zmq.PULL,
            linger_ms=linger_ms,
            options={zmq.RCVHWM: hwm, zmq.MAXMSGSIZE: limits.max_message_bytes},
        )
        self.endpoint = self._socket.bind_or_connect(endpoint, bind=bind)

    @property
    def closed(self) -> bool:
        return self._socket.closed

    async def recv(self) -> Any:
        """The next object; a malformed message raises `DecodeError` (the channel stays usable)."""
        return decode(await self._socket.recv(), limits=self._limits)

    def close(self, linger: int | None = None) -> None:
        self._socket.close(linger)

    async def aclose(self, linger: int | None = None) -> None:
        self.close(linger)

    def __enter__(self) -> DataReceiver:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> DataReceiver:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        with contextlib.suppress(RuntimeError):  # the loop may already be closed
            future.set_exception(exc)
