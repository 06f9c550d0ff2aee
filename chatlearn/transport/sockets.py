"""One ZeroMQ socket driven by the asyncio (uvloop) event loop: the building block of every channel.

`zmq.asyncio` sockets wrap every operation in a future plus several EVENTS polls and deferred
callbacks. Measured between two processes on the 2-core target machine that bookkeeping costs
~25-30 µs per side of a control round trip (see BENCHMARKS.md), so the channels drive a plain
ZeroMQ socket (created from the same `zmq.asyncio.Context`) with a minimal reactor instead:

- a send is first tried directly with DONTWAIT, and once more after reading EVENTS if the queue
  looked full (libzmq notices that its queue was drained only when it reads its commands); a
  receive first reads EVENTS (a receive that fails costs more: pyzmq raises), unless the
  previous one found a message waiting (then it receives at once: a consumer behind its
  producer reads no EVENTS at all); only if they cannot proceed does the caller wait, on a
  future resolved by the reader callback the loop runs when the socket's fd becomes readable;
- a socket can instead have a *handler* (`set_handler`): the reader callback then hands every
  incoming message to it as it arrives, without a task switch (the control server resolves
  request futures this way).

ZeroMQ's fd is edge-like: it signals "state may have changed", and any operation or EVENTS read
consumes the signal. So after every operation that can consume it, `_rearm` reads EVENTS and, if
a waiter can now proceed, schedules the reader callback; and the callback always reads EVENTS,
which also tells libzmq to signal again for the next message (except when no one waits any more:
the next receive reads EVENTS first anyway). After a handler took a message, the callback reads
EVENTS once more only after the tasks the handler woke have run: a request answered by that
message is usually followed by the next one at once, whose send would read EVENTS too, so one
read serves both. Per message that is one or two EVENTS reads, each ~1-2 µs in pyzmq (it
converts the option to an enum); the reactor calls pyzmq's Cython methods directly with
plain-int flags, and sends frames below pyzmq's copy threshold (which it copies in any case)
as copies. Errors come out as the transport's typed errors. Closing removes the reader before
the socket (and its fd) goes away, fails the waiters, and removes the socket file of a bound ipc
endpoint, which libzmq 4.3 leaves behind. One socket must be used from one event loop.

The ZeroMQ contexts the sockets come from are contexts.py's.

A socket that sends data (`DataSender`) asks the kernel for a 4 MiB send buffer on each of its
ipc connections (`AsyncSocket.enlarge_ipc_send_buffers`): libzmq applies ZMQ_SNDBUF to tcp
connections only, and at the kernel's default (208 KiB) a 1 MiB micro-batch crossed in six
writes, each waiting for the receiver to read the last. Where net.core.wmem_max allows it, ipc
then moves 1 MiB messages as fast as tcp over loopback does (BENCHMARKS.md).

Every socket takes the options of the process's security (security.py) when it binds or
connects: once a run's credentials are configured, no connection without them delivers anything.
Without them, tcp may only be bound on loopback addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import socket
import stat
import struct
from collections import deque
from collections.abc import Callable
from typing import Any, Final

import zmq
import zmq.asyncio

from chatlearn.transport.contexts import async_context
from chatlearn.transport.errors import ChannelClosedError, PeerUnreachableError, TransportError
from chatlearn.transport.security import socket_options

log = logging.getLogger(__name__)

# Messages handled per reader callback before yielding to other tasks (fairness under floods).
_MAX_BATCH = 256
# pyzmq's constants are enum.IntFlag members: `events & zmq.POLLIN` runs two Python-level enum
# calls (~1 µs each), several per message. Plain ints keep the reactor's arithmetic in C.
_POLLIN: Final = int(zmq.POLLIN)
_POLLOUT: Final = int(zmq.POLLOUT)
_EVENTS: Final = int(zmq.EVENTS)
_DONTWAIT: Final = int(zmq.DONTWAIT)
_SNDMORE_DONTWAIT: Final = int(zmq.SNDMORE | zmq.DONTWAIT)
# The Cython methods under pyzmq's Python wrappers: send_multipart/recv_multipart check every
# frame in Python and read ZMQ_RCVMORE once more per frame although each received frame already
# carries `more`; the reactor calls the base methods directly.
_base_send = zmq.backend.Socket.send
_base_recv = zmq.backend.Socket.recv
_base_get = zmq.backend.Socket.get
# pyzmq's default copy threshold: smaller frames are copied into the zmq message in any case.
_COPY_BELOW: Final = zmq.COPY_THRESHOLD
# The kernel send buffer asked for each ipc connection of a socket that sends data (see
# `AsyncSocket.enlarge_ipc_send_buffers`); the kernel caps it at net.core.wmem_max.
IPC_SEND_BUFFER_BYTES: Final = 4 * 1024 * 1024
_CONNECTION_EVENTS: Final = int(zmq.EVENT_CONNECTED | zmq.EVENT_ACCEPTED)
_monitor_names = itertools.count()


class AsyncSocket:
    """A ZeroMQ socket with awaitable `send`/`recv` (or a message handler); see the module doc."""

    def __init__(
        self,
        context: zmq.Context | None,
        socket_type: int,
        *,
        linger_ms: int,
        options: dict[int, int | bytes],
    ) -> None:
        # Created through the context so that it tracks the socket: `Context.destroy` can then
        # close it (a socket the context does not know would make its termination hang).
        self.sock = async_context(context).socket(socket_type, socket_class=zmq.Socket)
        try:
            self.sock.setsockopt(zmq.LINGER, linger_ms)
            for option, value in options.items():
                self.sock.setsockopt(option, value)
        except BaseException:
            self.sock.close(linger=0)
            raise
        self.closed = False
        self._fd: int = self.sock.FD
        self._loop: asyncio.AbstractEventLoop | None = None
        self._recv_waiters: deque[asyncio.Future[list[zmq.Frame]]] = deque()
        self._send_waiters: deque[tuple[asyncio.Future[None], list[Any]]] = deque()
        self._handler: Callable[[list[zmq.Frame]], None] | None = None
        self._scheduled = False
        self._rechecking = False  # the scheduled callback is the check after a handled message
        self._recv_hit = False  # the last direct receive found a message (see recv)
        self._ipc_paths: list[str] = []
        # see enlarge_ipc_send_buffers
        self._monitor: zmq.Socket[bytes] | None = None
        self._monitor_loop: asyncio.AbstractEventLoop | None = None

    def bind_or_connect(self, endpoint: str, *, bind: bool, sends_data: bool = False) -> str:
        """Bind (returning the resolved endpoint, e.g. the ephemeral port) or connect; a socket
        that ``sends_data`` gets larger send buffers over ipc (`enlarge_ipc_send_buffers`)."""
        try:
            for option, value in socket_options(endpoint, bind=bind).items():
                self.sock.setsockopt(option, value)
            if sends_data:  # before: the connection's event must not be missed
                self.enlarge_ipc_send_buffers(endpoint)
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

    def enlarge_ipc_send_buffers(self, endpoint: str) -> None:
        """Give every ipc connection of this socket a send buffer of IPC_SEND_BUFFER_BYTES.

        libzmq sets its ZMQ_SNDBUF on tcp connections only, so an ipc connection keeps the
        kernel's default (net.core.wmem_default, 208 KiB): a 1 MiB message then takes six
        writes, each waiting for the receiving process to read the last, and crosses at half
        the rate of tcp over loopback (whose buffers the kernel grows by itself). A connection's
        descriptor is known only from libzmq's monitor events (CONNECTED, ACCEPTED), handled on
        the event loop as they come (a reconnection gets the larger buffer too); the first few
        messages may leave with the default one. The kernel caps the request at
        net.core.wmem_max: where that is the default, nothing changes."""
        if not endpoint.startswith("ipc://") or self._monitor is not None or self.closed:
            return
        self._monitor = monitor_connections(self.sock)
        with contextlib.suppress(RuntimeError):  # no running loop: the first send watches
            self._watch_monitor(asyncio.get_running_loop())

    def _watch_monitor(self, loop: asyncio.AbstractEventLoop) -> None:
        """Handle the monitor's events on ``loop`` from now on (a send may never wait, so the
        socket itself may never be attached to the loop)."""
        assert self._monitor is not None
        self._monitor_loop = loop
        loop.add_reader(self._monitor.FD, self._on_monitor_events)
        loop.call_soon(self._on_monitor_events)  # events may be queued already

    def _on_monitor_events(self) -> None:
        """Reader callback of the monitor socket: enlarge each new connection's send buffer."""
        monitor = self._monitor
        if monitor is None:
            return
        for fd in new_connections(monitor):
            enlarge_send_buffer(fd)

    # -- operations ---------------------------------------------------------------------------

    async def send(self, frames: list[Any]) -> None:
        """Send one multipart message (``copy=False``); waits while the peer's queue is full."""
        if self.closed:
            raise ChannelClosedError("socket is closed")
        if self._monitor is not None and self._monitor_loop is None:  # not yet watched
            self._watch_monitor(asyncio.get_running_loop())
        # Never overtake an earlier send that is still waiting. A non-blocking send that finds
        # the queue full does not look at libzmq's command mailbox (it does at most once a
        # millisecond), where the I/O thread's note that it has drained the queue is most often
        # waiting already: reading ZMQ_EVENTS processes it, and the send is retried at once
        # instead of waiting for the loop (4 of 5 "full" queues at hwm 4, each wait ~10 µs).
        if not self._send_waiters and (
            self._try_send(frames) or (self._events() & _POLLOUT and self._try_send(frames))
        ):
            self._rearm()
            return
        future: asyncio.Future[None] = self._new_waiter()
        self._send_waiters.append((future, frames))
        self._rearm()
        await self._wait(future, "send")

    async def recv(self) -> list[zmq.Frame]:
        """Receive one multipart message as `zmq.Frame` objects (``copy=False``)."""
        if self.closed:
            raise ChannelClosedError("socket is closed")
        if self._handler is not None:
            raise RuntimeError("this socket hands its messages to a handler")
        self._attach()  # the reader callback serves waiters and `_rearm`'s checks
        # When the last receive found a message waiting, the next one most likely does too (a
        # consumer behind its producer): receive at once, which costs no system call, while
        # reading ZMQ_EVENTS polls libzmq's mailbox (one). Otherwise read ZMQ_EVENTS first: it
        # is cheaper than a receive that fails (pyzmq raises an Again that costs ~2 µs), and it
        # re-arms the fd, so nothing else needs to be checked before waiting.
        tried = False
        if not self._recv_waiters and (self._recv_hit or self._events() & _POLLIN):
            tried = True
            try:
                frames = self._recv_frames()
            except zmq.Again:
                self._recv_hit = False
            except zmq.ZMQError as exc:
                raise self._translate(exc) from exc
            else:
                self._recv_hit = True
                self._rearm()
                return frames
        future: asyncio.Future[list[zmq.Frame]] = self._new_waiter()
        self._recv_waiters.append(future)
        if tried or self._send_waiters:
            self._rearm()
        return await self._wait(future, "recv")

    def set_handler(self, handler: Callable[[list[zmq.Frame]], None]) -> None:
        """Hand every incoming message to ``handler`` from the reader callback (must not raise)."""
        self._handler = handler
        self._attach()
        self._schedule()  # messages may already be queued

    def _new_waiter(self) -> asyncio.Future[Any]:
        """A future for a caller that cannot proceed. The socket may have closed since the
        caller checked (reading ZMQ_EVENTS closes it when its context is being terminated), and
        closing fails only the waiters it finds: a later one would never be resolved."""
        if self.closed:
            raise ChannelClosedError("socket is closed")
        return self._attach().create_future()

    async def _wait(self, future: asyncio.Future[Any], what: str) -> Any:
        try:
            return await future
        except asyncio.CancelledError:
            if self.closed and not _cancelled_by_us():
                raise ChannelClosedError(f"socket closed during {what}") from None
            raise

    # -- the reactor --------------------------------------------------------------------------

    def _attach(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
            loop.add_reader(self._fd, self._on_events)
        return loop

    def _rearm(self) -> None:
        """After an operation: if a waiter can proceed now, run the reader callback soon."""
        if self._scheduled or self.closed:
            return
        if self._recv_waiters or self._send_waiters or self._handler is not None:
            events = self._events()
            if (events & _POLLIN and (self._recv_waiters or self._handler is not None)) or (
                events & _POLLOUT and self._send_waiters
            ):
                self._schedule()

    def _events(self) -> int:
        """ZMQ_EVENTS; 0 once the socket is unusable: its context is being terminated under it
        (e.g. at process exit) while a callback was scheduled. Then it is closed right away,
        which is also what the terminating context waits for."""
        try:
            # pyzmq's stubs type get() as int | bytes for every option; EVENTS is an int
            return _base_get(self.sock, _EVENTS)  # type: ignore[return-value]
        except zmq.ZMQError:
            with contextlib.suppress(zmq.ZMQError):
                self.close(0)
            return 0

    def _schedule(self) -> None:
        if not self._scheduled and self._loop is not None:
            self._scheduled = True
            self._loop.call_soon(self._on_events)

    def _on_events(self) -> None:
        """Reader callback: serve waiters (or the handler) while the socket is ready."""
        self._scheduled = False
        rechecking, self._rechecking = self._rechecking, False
        for _ in range(_MAX_BATCH):
            if self.closed:
                return
            events = self._events()  # also re-arms the fd for the next change
            progressed = False
            if events & _POLLIN:
                progressed = self._deliver_one()
            if events & _POLLOUT and self._send_waiters:
                progressed = self._send_one() or progressed
            if not progressed:
                return
            if self._handler is None and not self._recv_waiters and not self._send_waiters:
                # Nobody waits: whoever waits next reads ZMQ_EVENTS itself (see recv), so the
                # read that would find nothing to do can be skipped.
                return
            if self._handler is not None and not rechecking:
                # The handler has most likely just woken a task that will send on this socket
                # (a reply resolved a request that is followed by the next one). Reading EVENTS
                # now and again after that send (`_rearm`) is one read too many: read once,
                # after the tasks woken so far have run (a send meanwhile skips its own read, a
                # check being scheduled). A flood is drained by that check, in batches.
                self._rechecking = True
                self._schedule()
                return
        self._schedule()  # more to do: let other tasks run first

    def _deliver_one(self) -> bool:
        handler = self._handler
        if handler is None:
            while self._recv_waiters and self._recv_waiters[0].done():
                self._recv_waiters.popleft()  # cancelled
            if not self._recv_waiters:
                return False
        try:
            frames = self._recv_frames()
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            self._fail_all(self._translate(exc))
            return False
        if handler is not None:
            try:
                handler(frames)
            except Exception:  # a handler bug must not stop the socket
                log.exception("message handler failed")
        else:
            self._recv_waiters.popleft().set_result(frames)
        return True

    def _send_one(self) -> bool:
        while self._send_waiters and self._send_waiters[0][0].done():
            self._send_waiters.popleft()  # cancelled
        if not self._send_waiters:
            return False
        future, frames = self._send_waiters[0]
        try:
            if not self._try_send(frames):
                return False
        except TransportError as exc:
            self._send_waiters.popleft()
            future.set_exception(exc)
            return True
        self._send_waiters.popleft()
        future.set_result(None)
        return True

    def _try_send(self, frames: list[Any]) -> bool:
        """Send without waiting: False if the queue is full."""
        try:
            self._send_frames(frames)
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            raise self._translate(exc) from exc
        return True

    def _send_frames(self, frames: list[Any]) -> None:
        """Send a multipart message without waiting (zmq.Again if the queue is full: libzmq
        queues all parts of a message once it has accepted the first)."""
        sock = self.sock
        last = len(frames) - 1
        for index, frame in enumerate(frames):
            # pyzmq copies frames below its copy threshold even with copy=False, after making a
            # memoryview and checking it; copy=True goes straight to the copy (~1 µs less).
            copy = type(frame) is bytes and len(frame) < _COPY_BELOW
            _base_send(sock, frame, _SNDMORE_DONTWAIT if index < last else _DONTWAIT, copy)

    def _recv_frames(self) -> list[zmq.Frame]:
        """Receive a multipart message without waiting (zmq.Again if there is none)."""
        sock = self.sock
        frame = _base_recv(sock, _DONTWAIT, False)
        frames = [frame]
        while frame.more:
            frame = _base_recv(sock, _DONTWAIT, False)
            frames.append(frame)
        return frames

    def _translate(self, exc: zmq.ZMQError) -> TransportError:
        if exc.errno == errno.EHOSTUNREACH:
            return PeerUnreachableError("no connected peer has that identity")
        if self.closed or exc.errno in (errno.ENOTSOCK, zmq.ETERM):
            return ChannelClosedError(f"socket closed: {exc}")
        return TransportError(f"zmq error: {exc}")

    def _fail_all(self, exc: BaseException) -> None:
        waiters: list[asyncio.Future[Any]] = [
            *self._recv_waiters,
            *(future for future, _ in self._send_waiters),
        ]
        self._recv_waiters.clear()
        self._send_waiters.clear()
        for future in waiters:
            if not future.done():
                with contextlib.suppress(RuntimeError):  # the loop may already be closed
                    future.set_exception(exc)

    def close(self, linger: int | None = None) -> None:
        """Close with the socket's (bounded) linger; pending operations fail."""
        if self.closed:
            return
        self.closed = True
        monitor, self._monitor = self._monitor, None
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._fd)  # before the fd can be closed and reused
        if monitor is not None and self._monitor_loop and not self._monitor_loop.is_closed():
            self._monitor_loop.remove_reader(monitor.FD)
        self._fail_all(ChannelClosedError("socket closed"))
        if monitor is not None:
            with contextlib.suppress(zmq.ZMQError):
                self.sock.disable_monitor()
            monitor.close(linger=0)
        self.sock.close(linger=linger)
        # libzmq 4.3 leaves the socket file of a bound ipc endpoint behind; remove it (only if
        # it is still a socket: never delete anything else that took its name).
        for path in self._ipc_paths:
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)


def monitor_connections(sock: zmq.Socket[Any]) -> zmq.Socket[bytes]:
    """A PAIR socket on which ``sock``'s new connections (libzmq's CONNECTED and ACCEPTED
    monitor events) arrive, for `new_connections`; call before ``sock`` binds or connects."""
    address = f"inproc://chatlearn-monitor-{os.getpid()}-{next(_monitor_names)}"
    monitor: zmq.Socket[bytes] = sock.context.socket(zmq.PAIR, socket_class=zmq.Socket)
    try:
        sock.monitor(address, _CONNECTION_EVENTS)
        monitor.connect(address)
    except BaseException:
        monitor.close(linger=0)
        raise
    return monitor


def new_connections(monitor: zmq.Socket[bytes]) -> list[int]:
    """The descriptors of the connections reported on ``monitor`` since the last call (without
    waiting; reading until none is left also re-arms the monitor's fd)."""
    fds: list[int] = []
    while True:
        try:
            event = monitor.recv_multipart(zmq.NOBLOCK)
        except zmq.ZMQError:  # zmq.Again: drained; or closed under us
            return fds
        # [event id (16 bits) and value (32 bits: the descriptor), endpoint]
        if len(event[0]) == 6:
            event_id, fd = struct.unpack("=Hi", event[0])
            if event_id & _CONNECTION_EVENTS:
                fds.append(fd)


def enlarge_send_buffer(fd: int) -> None:
    """Ask for IPC_SEND_BUFFER_BYTES of send buffer on connection ``fd`` (libzmq's). It may have
    been closed since the event, its number even reused: only a unix socket is touched, and
    errors are ignored (a larger buffer is an optimisation, never needed)."""
    try:
        dup = os.dup(fd)
    except OSError:
        return
    try:
        conn = socket.socket(fileno=dup)
    except OSError:  # not a socket (any more)
        os.close(dup)
        return
    with conn, contextlib.suppress(OSError):
        if conn.family == socket.AF_UNIX and conn.type == socket.SOCK_STREAM:
            if conn.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < IPC_SEND_BUFFER_BYTES:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, IPC_SEND_BUFFER_BYTES)


def _cancelled_by_us() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
