"""The sending process of `chatlearn bench transport`.

Run as ``python -m chatlearn.benchmarks.transport_peer CONTROL_ENDPOINT [CORE]`` (pinned to
``CORE`` if given, see `pin_threads`). It connects a
`ControlClient` to the benchmark's `ControlServer`, says HELLO, then serves until SHUTDOWN:

- PING: REPLY with the same payload (the round-trip latency measurement);
- CALL ``{"mode", "endpoint", "size", "count", "hwm"}``: builds one float32 tensor of ``size``
  bytes and sends ``{"x": tensor}`` ``count`` times to ``endpoint`` — through our `DataSender`
  ("ours"), raw pyzmq zero-copy multipart ("raw"), our codec over raw pyzmq ("codec"), or
  pickle over pyzmq ("pickle") — then
  REPLYs with the count;
- CALL ``{"mode": "echo", "endpoint", "count"}``: connects a blocking DEALER and echoes
  ``count`` messages (the raw round-trip baseline);
- CALL ``{"mode": "stream-echo", "endpoint", "count", "size", "blocking"}``: connects to the unix
  stream socket at path ``endpoint`` and echoes ``count`` messages of ``size`` bytes, with
  blocking calls or on the event loop (the machine's round-trip floors).

It also holds what both processes use (the benchmark imports it from here): the plain sockets
of the baselines, the pinning, the blocking receives that wait in stop-aware slices, and the
pickle baseline's loader.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.util
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

import zmq

from chatlearn.transport import (
    ControlClient,
    DataSender,
    Message,
    MessageKind,
    encode,
    error_message,
    keep_receive_buffers,
    process_context,
    run,
    sending_context,
)
from chatlearn.transport.sockets import enlarge_send_buffer, monitor_connections, new_connections

PEER_IDENTITY = b"bench-peer"

# No single measurement may take longer than this: a stall is an error, not a hang.
RECV_TIMEOUT = 300.0
# The blocking receivers (run in worker threads) wait in slices this long and look at their stop
# flag in between: waiting out RECV_TIMEOUT at once kept a Ctrl-C'd benchmark alive for up to
# 5 minutes (the event loop's shutdown waits for its worker threads). A slice ends a blocking
# call only when nothing arrives: messages flowing pay nothing for it.
STOP_SLICE = 0.1


class BenchStopped(Exception):
    """A blocking receiver saw its stop flag: the benchmark is being interrupted."""


def waited_slice(waited: float, stop: threading.Event) -> float:
    """One more slice waited for a message: raises once ``stop`` is set or the wait reaches
    RECV_TIMEOUT (a stall is an error, not a hang)."""
    if stop.is_set():
        raise BenchStopped
    waited += STOP_SLICE
    if waited >= RECV_TIMEOUT:
        raise TimeoutError(f"no message from the benchmark peer for {RECV_TIMEOUT:.0f} s")
    return waited


# The naive pickle baseline lives outside the package (which never imports pickle): in a source
# checkout, benchmarks/pickle_baseline.py at the repository root.
PICKLE_BASELINE = Path(__file__).resolve().parents[2] / "benchmarks" / "pickle_baseline.py"


@functools.lru_cache(maxsize=1)
def pickle_baseline() -> Any:
    """The pickle baseline module (loaded once), or None when this is not a source checkout."""
    if not PICKLE_BASELINE.is_file():
        return None
    spec = importlib.util.spec_from_file_location("chatlearn_pickle_baseline", PICKLE_BASELINE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def recv_exactly(conn: socket.socket, size: int, stop: threading.Event | None = None) -> bytes:
    """``size`` bytes from ``conn``; with ``stop``, ``conn`` has a timeout of STOP_SLICE and the
    wait ends when ``stop`` is set (`BenchStopped`) or after RECV_TIMEOUT."""
    data = b""
    waited = 0.0
    while len(data) < size:
        if stop is None:
            chunk = conn.recv(size - len(data))
        else:
            try:
                chunk = conn.recv(size - len(data))
            except TimeoutError:
                waited = waited_slice(waited, stop)
                continue
        if not chunk:
            raise ConnectionError("the echoing peer closed the stream")
        data += chunk
    return data


class Sender:
    """Runs send orders; keeps each order's socket open until the next order arrives.

    Closing a PUSH socket while the receiver is still a full queue behind drops the queued tail
    even with a linger (libzmq #4660, pyzmq #1934), so a socket is closed only once the
    benchmark has confirmed it received everything, which it does by sending the next order.
    """

    def __init__(self) -> None:
        self._open: list[Any] = []

    def close(self) -> None:
        for sock in self._open:
            sock.close()
        self._open.clear()

    async def run(self, order: dict[str, Any]) -> int:
        import torch

        self.close()
        if order["mode"] == "echo":
            return _echo(order["endpoint"], order["count"])
        if order["mode"] == "stream-echo":
            return await _stream_echo(order)
        tensor = torch.ones(order["size"] // 4, dtype=torch.float32)
        count, endpoint, hwm, mode = order["count"], order["endpoint"], order["hwm"], order["mode"]
        if mode == "ours":
            sender = DataSender(endpoint, hwm=hwm)
            self._open.append(sender)
            payload = {"x": tensor}
            for _ in range(count):
                await sender.send(payload)
            return count
        # The baselines use plain blocking pyzmq, the fastest way to drive it; the peer has
        # nothing else to do meanwhile.
        sock: zmq.Socket[bytes] = raw_socket(zmq.PUSH, sending=True)
        self._open.append(sock)
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.LINGER, 1000)
        _connect_as_ours(sock, endpoint)
        if mode == "raw":
            # numpy's stubs declare ndarray.__buffer__ only for Python >= 3.12
            memory = memoryview(tensor.numpy())  # type: ignore[arg-type]
            frames: list[bytes | memoryview] = [b"float32", memory]
            for _ in range(count):
                sock.send_multipart(frames, copy=False)
        elif mode == "codec":
            # what ours does to a message, without asyncio: our encoder, blocking pyzmq
            payload = {"x": tensor}
            for _ in range(count):
                sock.send_multipart(encode(payload), copy=False)
        elif mode == "pickle":
            pickle_baseline().send_pickled(sock, {"x": tensor}, count)
        else:
            raise ValueError(f"unknown mode {mode!r}")
        return count


def _echo(endpoint: str, count: int) -> int:
    sock: zmq.Socket[bytes] = raw_socket(zmq.DEALER, sending=False)
    sock.setsockopt(zmq.RCVTIMEO, 60_000)  # the benchmark side failed: give up, don't hang
    sock.setsockopt(zmq.LINGER, 1000)
    try:
        sock.connect(endpoint)
        for _ in range(count):
            sock.send(sock.recv(copy=False), copy=False)
    finally:
        sock.close()
    return count


async def _stream_echo(order: dict[str, Any]) -> int:
    count, size = order["count"], order["size"]
    if order["blocking"]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(60)  # the benchmark side failed: give up, don't hang
            sock.connect(order["endpoint"])
            for _ in range(count):
                sock.sendall(recv_exactly(sock, size))
        return count
    reader, writer = await asyncio.open_unix_connection(order["endpoint"])
    try:
        async with asyncio.timeout(60):
            for _ in range(count):
                writer.write(await reader.readexactly(size))
            await writer.drain()
    finally:
        writer.close()
    return count


async def serve(control_endpoint: str) -> None:
    sender = Sender()
    try:
        with ControlClient(control_endpoint, PEER_IDENTITY) as client:
            await client.send(Message(kind=MessageKind.HELLO))
            while True:
                msg = await client.recv()
                if msg.kind is MessageKind.SHUTDOWN:
                    return
                rid = msg.request_id
                if msg.kind is MessageKind.PING:
                    reply = Message(kind=MessageKind.REPLY, request_id=rid, payload=msg.payload)
                else:
                    try:
                        result = await sender.run(msg.payload)
                    except Exception as exc:
                        reply = error_message(rid, exc, {"role": "bench peer"})
                    else:
                        reply = Message(kind=MessageKind.REPLY, request_id=rid, payload=result)
                await client.send(reply)
    finally:
        sender.close()


def _connect_as_ours(sock: zmq.Socket[bytes], endpoint: str) -> None:
    """Connect a baseline's sending socket with the send buffer ours gets over ipc
    (`AsyncSocket.enlarge_ipc_send_buffers`): the baselines then differ from ours only in
    what runs above libzmq. Waits up to 10 s for the connection (the receiver is bound); a
    baseline that could not get the buffer would compare unlike with like: an error."""
    if not endpoint.startswith("ipc://"):
        sock.connect(endpoint)
        return
    monitor = monitor_connections(sock)
    try:
        sock.connect(endpoint)
        fds = new_connections(monitor) if monitor.poll(10_000) else []
        if not fds:
            raise RuntimeError(f"no connection to {endpoint} within 10 s")
        for fd in fds:
            enlarge_send_buffer(fd)
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)


def raw_socket(socket_type: int, *, sending: bool) -> zmq.Socket[bytes]:
    """A plain (blocking) socket for the raw pyzmq baselines, from the context ours would use:
    sending data, the one whose I/O thread runs batched (`sending_context`), else the process's
    (`chatlearn.transport.sockets`), so that every mode runs on the same I/O threads."""
    context: zmq.Context = sending_context() if sending else process_context()
    sock: zmq.Socket[bytes] = context.socket(socket_type, socket_class=zmq.Socket)
    return sock


def pin_threads(core: int) -> None:
    """Pin every thread of this process to ``core``, as the runtime pins a one-core actor
    (threads started later inherit it from the thread that starts them). Linux only."""
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that has ended meanwhile
            os.sched_setaffinity(int(tid), {core})


if __name__ == "__main__":
    # Ctrl-C reaches the peer with the benchmark (one process group): it ends at once, quietly
    # (it owns nothing to clean up: the benchmark owns the runtime directory). As a
    # KeyboardInterrupt it printed a 30-line traceback, or, in a blocking call, was noticed only
    # at that call's timeout.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if len(sys.argv) > 2:
        pin_threads(int(sys.argv[2]))
    keep_receive_buffers()
    run(serve(sys.argv[1]))
