"""Async channels for asyncio (uvloop): control plane (ROUTER/DEALER), data plane (PUSH/PULL).

- `ControlServer` (ROUTER, the coordinator, one for all actors) and `ControlClient` (DEALER, one
  per actor, its identity is its name). The server allocates request ids and maps each one to a
  future: `request()` resolves with the peer's REPLY/READY payload or raises `RemoteError` for
  its ERROR; many requests may be in flight per peer. Everything else the peers send (HELLO,
  HEARTBEAT, DEAD, late replies) is queued for `recv_unsolicited()`. Incoming messages are
  dispatched straight from the socket's reader callback (no receive task, no task switch); a
  malformed one is counted (`num_malformed`), logged at a capped rate and dropped, never fatal.
- `DataSender` (PUSH) and `DataReceiver` (PULL) carry codec-encoded objects (micro-batches).
  Both ends set a high-water mark of ``hwm`` messages, so a slow consumer makes ``send()`` wait
  (backpressure) instead of letting queues grow: at most about ``2 * hwm`` messages plus what
  fits in the kernel's socket buffer are in flight.

Decoding never stalls the event loop: a message whose header is larger than
``DECODE_IN_STEPS_ABOVE`` bytes (e.g. 16 MiB of prompts) is decoded in steps that yield to the
loop every couple of milliseconds, so heartbeats and control go on meanwhile; later messages of
the same channel wait for it (the order of messages is kept). What a header may hold is bounded
by `Limits` (see codec.py). Malformed messages are dropped, counted and logged: the first few in
full, then one summary line per interval, so a flood of garbage cannot flood the log.

Frames are sent with ``copy=False`` (tensor memory goes to ZeroMQ as is: do not modify a tensor
in place after sending it until the send has completed) and received with ``copy=False`` (decoded
tensors alias the received frames). Receiving sockets enforce ``Limits.max_message_bytes`` per
frame in libzmq too (``ZMQ_MAXMSGSIZE``: a peer sending more is disconnected before we buffer it).
Every socket is closed with a bounded linger, and a bound ipc endpoint's socket file is removed.

Closing a `DataSender` while its receiver is still a full queue behind can drop the queued tail
even within the linger (libzmq #4660 / pyzmq #1934, reproduced here): close a sender only after
the receiver has confirmed what it needs (the engine's credits do exactly that).

Sockets come from a `zmq.asyncio.Context` unless one is given: a connecting `DataSender`'s from
`contexts.sending_context` (its I/O thread batched), every other's from the process-wide instance
(`contexts.process_context`); they are driven by `sockets.AsyncSocket`. All channels of a
process must be used from one event loop; `close()` is synchronous so it can run in ``finally``
blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Generator
from typing import Any, Self, TypeVar

import zmq
import zmq.asyncio

from chatlearn.transport.codec import (
    DEFAULT_INLINE_THRESHOLD,
    DEFAULT_LIMITS,
    Limits,
    decode,
    decode_steps,
    encode,
)
from chatlearn.transport.contexts import sending_context
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
    decode_message_steps,
    encode_message,
)
from chatlearn.transport.security import peer_name
from chatlearn.transport.sockets import AsyncSocket

log = logging.getLogger(__name__)

# Long enough for queued messages to reach a live peer, short enough that closing never hangs.
DEFAULT_LINGER_MS = 1000
# Data-plane messages are micro-batches of megabytes: a few in flight keep the pipe busy.
DEFAULT_DATA_HWM = 8
# Malformed messages logged one by one; after that, one summary line per interval.
NUM_MALFORMED_LOGGED = 10
MALFORMED_SUMMARY_SECONDS = 10.0
# Headers above this many bytes are decoded in steps, yielding to the event loop at least every
# _STEP_SECONDS. Decoding 64 KiB takes well under a millisecond for real payloads and at most a
# few for hostile ones (the `Limits` bound the rest), so smaller headers decode inline.
DECODE_IN_STEPS_ABOVE = 64 * 1024
_STEP_SECONDS = 0.002
_CLOSED = object()
T = TypeVar("T")


async def _run_steps(steps: Generator[None, None, T]) -> T:
    """Drive a stepped decode, letting the loop run other callbacks every _STEP_SECONDS."""
    clock = time.perf_counter
    deadline = clock() + _STEP_SECONDS
    try:
        while True:
            try:
                next(steps)
            except StopIteration as stop:
                return stop.value
            if clock() >= deadline:
                await asyncio.sleep(0)
                deadline = clock() + _STEP_SECONDS
    finally:
        steps.close()  # cancelled midway: end the decode (and its pause of the collector) now


class MalformedLog:
    """Counts the malformed messages a channel dropped and logs them at a capped rate.

    The first `NUM_MALFORMED_LOGGED` are logged one by one (at WARNING, with the traceback if
    the codec itself failed); after that, one line per `MALFORMED_SUMMARY_SECONDS` says how many
    more were dropped, so 5,000 garbage messages make about a dozen lines, not 5,000.
    """

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self.count = 0
        self._unlogged = 0
        self._summary: asyncio.TimerHandle | None = None

    def record(self, peer: bytes | None, exc: BaseException) -> None:
        self.count += 1
        if self.count <= NUM_MALFORMED_LOGGED:
            log.warning(
                "%s: dropped malformed message #%d%s: %s: %s",
                self.channel,
                self.count,
                f" from {peer!r}" if peer is not None else "",
                type(exc).__name__,
                exc,
                exc_info=not isinstance(exc, DecodeError),
            )
            return
        self._unlogged += 1
        if self._summary is None:
            loop = asyncio.get_running_loop()
            self._summary = loop.call_later(MALFORMED_SUMMARY_SECONDS, self.flush)

    def flush(self) -> None:
        """Log the summary of what was dropped since the last line (also at close)."""
        if self._summary is not None:
            self._summary.cancel()
            self._summary = None
        if self._unlogged:
            log.warning(
                "%s: dropped %d more malformed messages (%d in all)",
                self.channel,
                self._unlogged,
                self.count,
            )
            self._unlogged = 0


class _Channel:
    """What the four channels share: a socket, and closing it with ``close()`` (synchronous, so
    it can run in ``finally`` blocks), ``aclose()`` or either context-manager protocol. A
    channel whose close does more (`_Decoding` flushes its malformed-message log,
    `ControlServer` also fails its pending requests) extends ``close()``; the rest call it."""

    _socket: AsyncSocket

    @property
    def closed(self) -> bool:
        return self._socket.closed

    def close(self, linger: int | None = None) -> None:
        """Close the socket with a bounded linger (``linger`` ms, else the channel's own);
        closing again does nothing."""
        self._socket.close(linger)

    async def aclose(self, linger: int | None = None) -> None:
        """``close()``, async for symmetry with other closables (there is nothing to wait for)."""
        self.close(linger)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()


class _Decoding(_Channel):
    """A channel that decodes what it receives (`ControlServer`, `ControlClient`,
    `DataReceiver`): it counts and logs the messages it cannot decode, and its close flushes
    that log."""

    _limits: Limits
    _malformed: MalformedLog
    _drop_malformed: bool = True
    # the header frame of the message `_recv_decoded` last returned or refused (small): its
    # sender's name is looked up only when asked (`DataReceiver.last_peer`), not for every one
    _last_header: zmq.Frame | None = None

    @property
    def num_malformed(self) -> int:
        """Messages dropped because they could not be decoded."""
        return self._malformed.count

    def close(self, linger: int | None = None) -> None:
        self._malformed.flush()
        super().close(linger)

    async def _recv_decoded(
        self,
        decode_frames: Callable[..., T],
        decode_in_steps: Callable[..., Generator[None, None, T]],
    ) -> T:
        """The next message the socket receives, decoded by `decode_frames`, or by
        `decode_in_steps` (yielding to the loop) if its header is large. A malformed one is
        dropped (counted, logged at a capped rate), or raises its `DecodeError` if the channel
        was made with ``drop_malformed=False``."""
        while True:
            frames = await self._socket.recv()
            self._last_header = frames[0] if frames else None
            try:
                if _is_large(frames, 0):
                    return await _run_steps(decode_in_steps(frames, limits=self._limits))
                return decode_frames(frames, limits=self._limits)
            except DecodeError as exc:
                if not self._drop_malformed:
                    raise
                self._malformed.record(None, exc)


class ControlServer(_Decoding):
    """The coordinator's ROUTER: requests to actors by identity, and their unsolicited messages."""

    def __init__(
        self,
        endpoint: str,
        *,
        context: zmq.Context | None = None,
        limits: Limits = DEFAULT_LIMITS,
        linger_ms: int = DEFAULT_LINGER_MS,
        on_malformed: Callable[[bytes, Exception], None] | None = None,
    ) -> None:
        """`on_malformed(identity, error)` is told of every message that cannot be decoded
        (after it is counted and logged): the owner decides whether that peer broke the run."""
        self._limits = limits
        self._on_malformed = on_malformed
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
        self._malformed = MalformedLog(f"control server {self.endpoint}")
        # While a large message is decoded in steps, later ones wait here (their order is kept).
        self._backlog: deque[list[zmq.Frame]] | None = None
        self._decoding: asyncio.Task[None] | None = None

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
            self._socket.set_handler(self._on_message)

    def _on_message(self, frames: list[zmq.Frame]) -> None:
        """Handles each incoming message, from the socket's reader callback (no task switch);
        a large one is decoded in steps by a task, and what arrives meanwhile waits for it."""
        if self._backlog is not None:
            self._backlog.append(frames)
        elif _is_large(frames, 1):
            self._backlog = deque()
            self._decoding = asyncio.get_running_loop().create_task(self._decode_large(frames))
        else:
            self._dispatch(frames)

    def _dispatch(self, frames: list[zmq.Frame]) -> None:
        """Decodes and delivers one message. Bad input is counted, logged at a capped rate and
        dropped; nothing raises out of here."""
        identity = frames[0].bytes
        try:
            if len(frames) < 2:
                raise DecodeError("no message frames after the identity")
            msg = decode_message(frames[1:], limits=self._limits)
        except Exception as exc:  # DecodeError, or a codec bug: neither may kill the loop
            self._bad_message(identity, exc)
            return
        self._deliver(identity, msg)

    def _bad_message(self, identity: bytes, exc: Exception) -> None:
        self._malformed.record(identity, exc)
        if self._on_malformed is not None:
            try:
                self._on_malformed(identity, exc)
            except Exception:  # the owner's bug must not stop the socket
                log.exception("on_malformed handler failed")

    async def _decode_large(self, frames: list[zmq.Frame]) -> None:
        """Decodes large messages in steps, then delivers those that waited behind them, in
        order of arrival, until none is left (the reader callback then dispatches again)."""
        backlog = self._backlog
        assert backlog is not None
        while True:
            identity = frames[0].bytes
            try:
                msg = await _run_steps(decode_message_steps(frames[1:], limits=self._limits))
            except Exception as exc:  # as in _dispatch
                self._bad_message(identity, exc)
            else:
                self._deliver(identity, msg)
            while backlog:
                frames = backlog.popleft()
                if _is_large(frames, 1):
                    break
                self._dispatch(frames)
            else:
                self._backlog = None
                self._decoding = None
                return

    def _deliver(self, identity: bytes, msg: Message) -> None:
        """Resolves the pending request ``msg`` answers, or queues it as unsolicited."""
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

    def close(self, linger: int | None = None) -> None:
        """Fail pending requests and waiters, close the socket (bounded linger)."""
        if self._closed:
            return
        self._closed = True
        closed = ChannelClosedError("control server closed")
        for _, future in list(self._pending.values()):
            _set_exception(future, closed)
        self._unsolicited.put_nowait(_CLOSED)
        if self._decoding is not None:
            self._decoding.cancel()
        super().close(linger)  # flushes the malformed-message log too


class ControlClient(_Decoding):
    """An actor's DEALER: connects to the coordinator's `ControlServer` under ``identity``."""

    def __init__(
        self,
        endpoint: str,
        identity: bytes,
        *,
        context: zmq.Context | None = None,
        limits: Limits = DEFAULT_LIMITS,
        linger_ms: int = DEFAULT_LINGER_MS,
        drop_malformed: bool = True,
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
        self._drop_malformed = drop_malformed
        self._malformed = MalformedLog(f"control client {identity!r}")

    async def send(self, msg: Message) -> None:
        """Send one message (an answer copies the request's ``request_id``)."""
        await self._socket.send(encode_message(msg))

    async def recv(self) -> Message:
        """The next message from the server. A malformed one is dropped (counted, logged at a
        capped rate), or raises a `DecodeError` if the client was made with
        ``drop_malformed=False``."""
        return await self._recv_decoded(decode_message, decode_message_steps)


class DataSender(_Channel):
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
        if context is None and not bind:
            # Connecting, it can use the batched context; a binding socket authenticates its
            # peers through the ZAP handler security.py runs on the process context.
            context = sending_context()
        self._socket = AsyncSocket(
            context,
            zmq.PUSH,
            linger_ms=linger_ms,
            options={zmq.SNDHWM: hwm},
        )
        self.endpoint = self._socket.bind_or_connect(endpoint, bind=bind, sends_data=True)

    async def send(self, obj: Any) -> None:
        """Encode and send ``obj``; returns once ZeroMQ has queued it (tensors are not copied)."""
        await self._socket.send(encode(obj, inline_threshold=self._inline_threshold))


class DataReceiver(_Decoding):
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
        drop_malformed: bool = True,
    ) -> None:
        if hwm < 1:
            raise ValueError(f"hwm must be >= 1 (0 would mean unbounded), got {hwm}")
        self._limits = limits
        self._drop_malformed = drop_malformed
        self._socket = AsyncSocket(
            context,
            zmq.PULL,
            linger_ms=linger_ms,
            options={zmq.RCVHWM: hwm, zmq.MAXMSGSIZE: limits.max_message_bytes},
        )
        self.endpoint = self._socket.bind_or_connect(endpoint, bind=bind)
        self._malformed = MalformedLog(f"data receiver {self.endpoint}")

    @property
    def last_peer(self) -> str | None:
        """The authenticated name of the sender of the message `recv` last returned or refused
        (security.py), if the connection had one."""
        return peer_name(self._last_header) if self._last_header is not None else None

    async def recv(self) -> Any:
        """The next object. A malformed message is dropped (counted, logged at a capped rate),
        or raises `DecodeError` if the receiver was made with ``drop_malformed=False`` (the
        channel stays usable). One task at a time should receive: messages are decoded in the
        order they are received, but a large one finishes after a small one received later."""
        return await self._recv_decoded(decode, decode_steps)


def _is_large(frames: list[zmq.Frame], header_index: int) -> bool:
    return len(frames) > header_index and len(frames[header_index]) > DECODE_IN_STEPS_ABOVE


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        with contextlib.suppress(RuntimeError):  # the loop may already be closed
            future.set_exception(exc)
