"""Channels in one process, real sockets: requests, errors, robustness, backpressure, cleanup."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
import threading
import time
from collections.abc import Awaitable, Callable

import msgpack
import psutil
import pytest
import torch
import zmq
import zmq.asyncio

from chatlearn.transport import (
    ChannelClosedError,
    ControlClient,
    ControlServer,
    DataReceiver,
    DataSender,
    DecodeError,
    Message,
    MessageKind,
    PeerUnreachableError,
    RemoteError,
    RequestTimeoutError,
    RuntimeDir,
    encode,
    error_message,
    new_event_loop,
    run,
    tcp_endpoint,
)
from chatlearn.transport.sockets import IPC_SEND_BUFFER_BYTES, AsyncSocket, enlarge_send_buffer


@pytest.fixture
def runtime_dir():
    with RuntimeDir() as directory:
        yield directory


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def echo_actor(client: ControlClient) -> Callable[[], Awaitable[None]]:
    """An in-process actor loop: REPLY with the payload, ERROR for payload "boom"."""

    async def serve() -> None:
        await client.send(Message(kind=MessageKind.HELLO, payload="hi"))
        while True:
            msg = await client.recv()
            if msg.kind is MessageKind.SHUTDOWN:
                return
            if msg.payload == "boom":
                reply = error_message(msg.request_id, ValueError("boom!"), {"rank": 3})
            elif msg.payload == "ignore":
                continue
            else:
                reply = Message(
                    kind=MessageKind.REPLY, request_id=msg.request_id, payload=msg.payload
                )
            await client.send(reply)

    return serve


async def test_requests_replies_errors_and_unsolicited(runtime_dir: RuntimeDir) -> None:
    async with ControlServer(runtime_dir.ipc_endpoint("ctl")) as server:
        async with ControlClient(server.endpoint, b"actor") as client:
            actor = asyncio.create_task(echo_actor(client)())
            identity, hello = await asyncio.wait_for(server.recv_unsolicited(), 30)
            assert (identity, hello.kind, hello.payload) == (b"actor", MessageKind.HELLO, "hi")

            payload = {"t": torch.randn(1000, 100), "n": [1, (2, 3)]}
            out = await server.request(identity, MessageKind.CALL, payload, timeout=30)
            assert torch.equal(out["t"], payload["t"]) and out["n"] == [1, (2, 3)]

            with pytest.raises(RemoteError) as info:
                await server.request(identity, MessageKind.CALL, "boom", timeout=30)
            assert (info.value.type_name, info.value.message) == ("ValueError", "boom!")
            assert info.value.context == {"rank": 3} and "boom!" in info.value.remote_traceback
            assert "rank=3" in str(info.value)

            results = await asyncio.gather(
                *(server.request(identity, MessageKind.PING, i, timeout=30) for i in range(200))
            )
            assert results == list(range(200)) and server.num_pending == 0

            await server.send(identity, Message(kind=MessageKind.SHUTDOWN))
            await asyncio.wait_for(actor, 30)


async def test_timeout_late_reply_and_wrong_identity(runtime_dir: RuntimeDir) -> None:
    async with ControlServer(runtime_dir.ipc_endpoint("ctl")) as server:
        async with ControlClient(server.endpoint, b"a") as client:
            await client.send(Message(kind=MessageKind.HELLO))
            identity, _ = await asyncio.wait_for(server.recv_unsolicited(), 30)
            with pytest.raises(RequestTimeoutError):
                await server.request(identity, MessageKind.CALL, "x", timeout=0.2)
            assert server.num_pending == 0
            late = await asyncio.wait_for(client.recv(), 30)
            await client.send(Message(kind=MessageKind.REPLY, request_id=late.request_id))
            # Nobody waits for that id any more: it is unsolicited, not lost and not an error.
            _, msg = await asyncio.wait_for(server.recv_unsolicited(), 30)
            assert (msg.kind, msg.request_id) == (MessageKind.REPLY, late.request_id)

            # A reply carrying another peer's request id does not resolve that request.
            async with ControlClient(server.endpoint, b"b") as intruder:
                await intruder.send(Message(kind=MessageKind.HELLO))
                await asyncio.wait_for(server.recv_unsolicited(), 30)
                pending = asyncio.ensure_future(server.request(b"a", MessageKind.CALL, 1))
                request = await asyncio.wait_for(client.recv(), 30)
                forged = Message(kind=MessageKind.REPLY, request_id=request.request_id, payload=2)
                await intruder.send(forged)
                identity, msg = await asyncio.wait_for(server.recv_unsolicited(), 30)
                assert identity == b"b" and not pending.done()
                await client.send(
                    Message(kind=MessageKind.REPLY, request_id=request.request_id, payload=1)
                )
                assert await asyncio.wait_for(pending, 30) == 1


async def test_unreachable_peer_fail_pending_and_close(runtime_dir: RuntimeDir) -> None:
    server = ControlServer(runtime_dir.ipc_endpoint("ctl"))
    client = ControlClient(server.endpoint, b"actor")
    try:
        with pytest.raises(PeerUnreachableError):
            await server.request(b"nobody", MessageKind.CALL, None, timeout=5)
        await client.send(Message(kind=MessageKind.HELLO))
        await asyncio.wait_for(server.recv_unsolicited(), 30)

        died = RuntimeError("actor died")
        first = asyncio.ensure_future(server.request(b"actor", MessageKind.CALL, "ignore"))
        await wait_until(lambda: server.num_pending == 1)
        server.fail_pending(b"actor", died)
        with pytest.raises(RuntimeError, match="actor died"):
            await first

        second = asyncio.ensure_future(server.request(b"actor", MessageKind.CALL, "ignore"))
        waiter = asyncio.ensure_future(server.recv_unsolicited())
        await wait_until(lambda: server.num_pending == 1)
        await server.aclose()
        for task in (second, waiter):
            with pytest.raises(ChannelClosedError):
                await asyncio.wait_for(task, 10)
        with pytest.raises(ChannelClosedError):
            await server.request(b"actor", MessageKind.CALL, None)
        server.close()  # idempotent
    finally:
        client.close()
        await server.aclose()


async def test_malformed_messages_never_stop_the_server(runtime_dir: RuntimeDir) -> None:
    ctx = zmq.asyncio.Context.instance()
    async with ControlServer(runtime_dir.ipc_endpoint("ctl")) as server:
        raw = ctx.socket(zmq.DEALER)
        raw.setsockopt(zmq.ROUTING_ID, b"evil")
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(server.endpoint)
        try:
            garbage = [
                [b""],
                [b"\xc1"],
                [b"\x94\x09\x01\x00\xc0"],  # wrong protocol version
                [msgpack.packb([1, 77, 0, None])],  # unknown kind
                [msgpack.packb([1, 5, 1, msgpack.ExtType(2, msgpack.packb(["f32", [1], 1]))])],
                [encode({"t": torch.ones(10_000)})[0]],  # references a missing frame
                [b"\x94\x01\x05\x00\xdd\xff\xff\xff\xff"],  # claims 4 billion elements
            ]
            for frames in garbage:
                await raw.send_multipart(frames)
            await raw.send_multipart([msgpack.packb([1, int(MessageKind.HELLO), 0, "still ok"])])
            identity, msg = await asyncio.wait_for(server.recv_unsolicited(), 30)
            assert (identity, msg.payload) == (b"evil", "still ok")
            assert server.num_malformed == len(garbage)
            # ... and requests still work afterwards.
            reply = asyncio.ensure_future(server.request(b"evil", MessageKind.PING, 7, timeout=30))
            request = await asyncio.wait_for(raw.recv_multipart(), 30)
            rid = msgpack.unpackb(request[0])[2]
            await raw.send_multipart([msgpack.packb([1, int(MessageKind.REPLY), rid, 8])])
            assert await reply == 8
        finally:
            raw.close()


@pytest.mark.parametrize("transport", ["ipc", "tcp"])
async def test_data_channel_roundtrip_and_bad_message(
    runtime_dir: RuntimeDir, transport: str
) -> None:
    where = runtime_dir.ipc_endpoint("data") if transport == "ipc" else tcp_endpoint()
    # over ipc a malformed message raises, over tcp it is dropped (the default)
    async with DataReceiver(where, drop_malformed=transport == "tcp") as receiver:
        assert "*" not in receiver.endpoint
        async with DataSender(receiver.endpoint) as sender:
            batches = [{"x": torch.randn(64, 512), "i": i} for i in range(10)]
            for batch in batches:
                await sender.send(batch)
            for batch in batches:
                got = await asyncio.wait_for(receiver.recv(), 30)
                assert got["i"] == batch["i"] and torch.equal(got["x"], batch["x"])
            # A malformed message raises a typed error or is dropped; the channel keeps working.
            await sender._socket.send([b"\x94\x01\x0a\x00\xc1"])
            if transport == "ipc":
                with pytest.raises(DecodeError):
                    await asyncio.wait_for(receiver.recv(), 30)
            await sender.send("after")
            assert await asyncio.wait_for(receiver.recv(), 30) == "after"
            assert receiver.num_malformed == (transport == "tcp")


async def test_slow_consumer_bounds_the_producer(runtime_dir: RuntimeDir) -> None:
    hwm, size, count = 2, 1 << 20, 24
    # In flight at most: the sender's and receiver's queues, plus what the kernel's socket
    # buffer and each side's I/O thread hold of 1 MiB messages (< 1 message each).
    bound = 2 * hwm + 3
    async with DataReceiver(runtime_dir.ipc_endpoint("data"), hwm=hwm) as receiver:
        async with DataSender(receiver.endpoint, hwm=hwm) as sender:
            payload = torch.zeros(size // 4)
            num_sent = num_received = max_in_flight = 0

            async def produce() -> None:
                nonlocal num_sent, max_in_flight
                for _ in range(count):
                    await sender.send(payload)
                    num_sent += 1
                    max_in_flight = max(max_in_flight, num_sent - num_received)

            producer = asyncio.create_task(produce())
            try:
                # Not consuming at all: the producer stalls after a bounded number of sends.
                await asyncio.sleep(1.0)
                assert hwm <= num_sent <= bound and not producer.done()
                # A slow consumer: the producer advances only as fast as it is consumed.
                while num_received < count:
                    await asyncio.wait_for(receiver.recv(), 30)
                    num_received += 1
                    await asyncio.sleep(0.01)
                await asyncio.wait_for(producer, 30)
            finally:
                producer.cancel()
            assert num_sent == count and max_in_flight <= bound


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _socket_files(runtime_dir: RuntimeDir) -> set[str]:
    # dot files (the directory's owner record) belong to the directory, not to a socket
    return {p.name for p in runtime_dir.path.iterdir() if not p.name.startswith(".")}


async def test_nothing_remains_after_close() -> None:
    ctx = zmq.asyncio.Context()
    # pyzmq's collector of zero-copy frames (a thread on a context of its own) starts with the
    # first zero-copy frame and stays for the process: start it before counting descriptors
    # (run alone, the test counted its seven as ours)
    assert len(zmq.Frame(bytearray(2 * zmq.COPY_THRESHOLD), copy=False)) > 0  # made and freed
    fds_before = _open_fds()
    runtime_dir = RuntimeDir()
    try:
        assert stat.S_IMODE(runtime_dir.path.stat().st_mode) == 0o700
        server = ControlServer(runtime_dir.ipc_endpoint("ctl"), context=ctx)
        client = ControlClient(server.endpoint, b"a", context=ctx)
        receiver = DataReceiver(runtime_dir.ipc_endpoint("data"), context=ctx)
        sender = DataSender(receiver.endpoint, context=ctx)
        tcp_receiver = DataReceiver(tcp_endpoint(), context=ctx)
        tcp_sender = DataSender(tcp_receiver.endpoint, context=ctx)
        port = int(tcp_receiver.endpoint.rsplit(":", 1)[1])
        assert tcp_receiver.endpoint.startswith("tcp://127.0.0.1:")
        await client.send(Message(kind=MessageKind.HELLO))
        await asyncio.wait_for(server.recv_unsolicited(), 30)
        for s, r in ((sender, receiver), (tcp_sender, tcp_receiver)):
            await s.send({"x": torch.ones(100_000)})
            await asyncio.wait_for(r.recv(), 30)
        assert _socket_files(runtime_dir) == {"ctl", "data"}

        for channel in (client, sender, receiver, tcp_sender, tcp_receiver):
            channel.close()
        await server.aclose()
        assert not _socket_files(runtime_dir)  # ipc socket files are gone with the sockets
        # libzmq closes the tcp listener in its I/O thread, right after close.
        me = psutil.Process()
        await wait_until(lambda: all(c.laddr.port != port for c in me.net_connections("tcp")))
        ctx.term()  # returns promptly: every socket is closed and lingers are bounded
        assert _open_fds() <= fds_before
    finally:
        runtime_dir.close()
        if not ctx.closed:
            ctx.destroy(linger=0)
    assert not runtime_dir.path.exists() and runtime_dir.closed


def _send_buffers_to(path: str) -> list[int]:
    """SO_SNDBUF of this process's unix stream connections to the socket file ``path``."""
    sizes = []
    for name in os.listdir("/proc/self/fd"):
        try:
            dup = os.dup(int(name))
        except OSError:
            continue  # closed meanwhile
        try:
            conn = socket.socket(fileno=dup)
        except OSError:
            os.close(dup)  # not a socket
            continue
        with conn, contextlib.suppress(OSError):  # getpeername: a listening socket
            if conn.family == socket.AF_UNIX and conn.getpeername() == path:
                sizes.append(conn.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))
    return sizes


def _sysctl(name: str) -> int:
    with open(f"/proc/sys/net/core/{name}") as f:
        return int(f.read())


@pytest.mark.skipif(
    not os.path.exists("/proc/sys/net/core/wmem_max")
    or _sysctl("wmem_max") <= _sysctl("wmem_default"),
    reason="the kernel allows no send buffer above its default (net.core.wmem_max)",
)
async def test_ipc_data_senders_get_large_send_buffers_on_every_connection(
    runtime_dir: RuntimeDir,
) -> None:
    # libzmq leaves an ipc connection at the kernel's default buffer (6 writes per MiB); the
    # kernel doubles what is asked (its bookkeeping) and caps the request at wmem_max.
    expected = 2 * min(IPC_SEND_BUFFER_BYTES, _sysctl("wmem_max"))
    endpoint = runtime_dir.ipc_endpoint("data")
    path = endpoint.removeprefix("ipc://")
    with DataSender(endpoint, hwm=2) as sender:
        for _ in range(2):  # the second receiver: the sender reconnects, to a new connection
            with DataReceiver(endpoint, hwm=2) as receiver:
                # until the sender has seen the first receiver go, what it sends may go down
                # the connection just closed, and be lost (libzmq): sent again until one arrives
                for _ in range(20):
                    await sender.send({"x": torch.ones(300_000)})
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(receiver.recv(), 1.5)
                        break
                else:
                    pytest.fail("20 messages sent, none reached the new receiver")
                for _ in range(2):
                    await sender.send({"x": torch.ones(300_000)})
                    await asyncio.wait_for(receiver.recv(), 30)
                await wait_until(lambda: _send_buffers_to(path) == [expected])


def test_enlarging_what_is_no_longer_a_connection_touches_nothing() -> None:
    # the event's descriptor may be closed, or reused by a pipe or a tcp socket, by the time it
    # is handled: nothing is changed and nothing leaks
    read_end, write_end = os.pipe()
    tcp = socket.socket()
    try:
        before = _open_fds()
        tcp_buffer = tcp.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        for fd in (read_end, tcp.fileno(), 10_000):
            enlarge_send_buffer(fd)
        assert _open_fds() == before
        assert tcp.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == tcp_buffer
    finally:
        tcp.close()
        os.close(read_end)
        os.close(write_end)


async def test_messages_right_behind_a_reply_are_delivered(runtime_dir: RuntimeDir) -> None:
    # The server's reader reads ZMQ_EVENTS once after a reply, after the task it woke has sent
    # its next request: whatever arrives right behind a reply (here a heartbeat, at once) must
    # still be seen then, not only when the next request happens to be sent; concurrent
    # requests answered in a burst too.
    rounds = 300
    async with ControlServer(runtime_dir.ipc_endpoint("ctl")) as server:
        client = ControlClient(server.endpoint, b"actor")

        async def serve() -> None:
            await client.send(Message(kind=MessageKind.HELLO))
            while True:
                msg = await client.recv()
                rid = msg.request_id
                if msg.payload == "burst":
                    held = [rid] + [(await client.recv()).request_id for _ in range(49)]
                    for rid in reversed(held):
                        await client.send(Message(kind=MessageKind.REPLY, request_id=rid))
                    continue
                await client.send(Message(kind=MessageKind.REPLY, request_id=rid, payload=rid))
                await client.send(Message(kind=MessageKind.HEARTBEAT, payload=msg.payload))

        actor = asyncio.ensure_future(serve())
        try:
            await asyncio.wait_for(server.recv_unsolicited(), 10)  # HELLO
            for i in range(rounds):
                await server.request(b"actor", MessageKind.CALL, i, timeout=10)
            beats = [await asyncio.wait_for(server.recv_unsolicited(), 10) for _ in range(rounds)]
            assert [msg.payload for _, msg in beats] == list(range(rounds))
            burst = [
                asyncio.ensure_future(server.request(b"actor", MessageKind.CALL, "burst"))
                for _ in range(50)
            ]
            assert await asyncio.wait_for(asyncio.gather(*burst), 10) == [None] * 50
            assert server.num_pending == 0 and server.num_malformed == 0
        finally:
            actor.cancel()
            client.close()


async def test_a_receiver_that_found_messages_waiting_still_wakes_for_the_next(
    runtime_dir: RuntimeDir,
) -> None:
    # After a receive that found a message waiting, the next one receives at once without
    # reading ZMQ_EVENTS (sockets.py). When the queue has run dry meanwhile, that receive fails
    # and must still arm the wake-up: messages sent in bursts separated by pauses, with the
    # receiver sometimes ahead and sometimes behind, all arrive in order.
    bursts = (1, 7, 2, 30, 1, 1, 12, 50)
    async with DataReceiver(runtime_dir.ipc_endpoint("data"), hwm=4) as receiver:
        async with DataSender(receiver.endpoint, hwm=4) as sender:

            async def receive(count: int) -> list[int]:
                return [(await receiver.recv())["i"] for _ in range(count)]

            receiving = asyncio.ensure_future(receive(sum(bursts)))
            waiting: list[asyncio.Future[object]] = [receiving]
            try:
                sent = 0
                for burst in bursts:
                    for _ in range(burst):
                        await sender.send({"i": sent})
                        sent += 1
                    await asyncio.sleep(0.005)  # the receiver catches up and waits
                assert await asyncio.wait_for(receiving, 10) == list(range(sent))
                for pause in (0.0, 0.02, 0.05):  # the queue is empty: receive first, send later
                    pending = asyncio.ensure_future(receiver.recv())
                    waiting.append(pending)
                    await asyncio.sleep(pause)
                    await sender.send({"i": sent})
                    assert (await asyncio.wait_for(pending, 10))["i"] == sent
                    sent += 1
            finally:  # a failed assertion leaves no task waiting on a closed receiver
                for task in waiting:
                    task.cancel()


async def test_a_send_right_after_the_receiver_drained_the_queue_does_not_wait() -> None:
    """libzmq's non-blocking send does not read its command mailbox (at most once a
    millisecond), so the queue can look full after the receiver has drained it: the note that
    it did waits in the mailbox. `send` must process it and send at once, not go to the loop
    (the sender then waits a loop cycle for nothing: 4 of 5 waits of a 4 KiB stream)."""
    ctx = zmq.asyncio.Context()
    pull = AsyncSocket(ctx, zmq.PULL, linger_ms=0, options={zmq.RCVHWM: 2})
    push = AsyncSocket(ctx, zmq.PUSH, linger_ms=0, options={zmq.SNDHWM: 2})
    try:
        pull.bind_or_connect("inproc://drained", bind=True)
        push.bind_or_connect("inproc://drained", bind=False)
        for round_ in range(10):
            queued = 0
            while push._try_send([b"x"]):  # fill the queue
                queued += 1
                assert queued < 100
            assert queued >= 2
            for _ in range(queued):  # drain it
                assert bytes(zmq.backend.Socket.recv(pull.sock, zmq.DONTWAIT, False)) == b"x"
            sending = push.send([b"y"])
            try:
                sending.send(None)
            except StopIteration:  # sent without suspending
                pass
            else:
                sending.close()
                pytest.fail(f"round {round_}: the send waited for the loop")
            assert bytes(zmq.backend.Socket.recv(pull.sock, zmq.DONTWAIT, False)) == b"y"
    finally:
        push.close(0)
        pull.close(0)
        ctx.term()


async def test_a_socket_whose_context_is_being_terminated_fails_instead_of_waiting() -> None:
    # At process exit the context can be terminated under a socket still in use: the next
    # operation finds it unusable while reading ZMQ_EVENTS, which closes the socket; the
    # operation must then fail, not wait forever on a socket nothing will wake again.
    ctx = zmq.asyncio.Context()
    pull = AsyncSocket(ctx, zmq.PULL, linger_ms=0, options={})
    pull.bind_or_connect("inproc://terminated", bind=True)
    terminating = threading.Thread(target=ctx.term, daemon=True)
    terminating.start()
    try:
        await asyncio.sleep(0.1)  # ctx.term has begun: operations now fail with ETERM
        with pytest.raises(ChannelClosedError):
            await asyncio.wait_for(pull.recv(), 5)
        terminating.join(5)
        assert not terminating.is_alive() and pull.closed
    finally:
        pull.close(0)


async def test_close_wakes_a_pending_recv(runtime_dir: RuntimeDir) -> None:
    receiver = DataReceiver(runtime_dir.ipc_endpoint("data"))
    client = ControlClient(runtime_dir.ipc_endpoint("nobody"), b"x")
    waiters = [asyncio.ensure_future(receiver.recv()), asyncio.ensure_future(client.recv())]
    await asyncio.sleep(0.05)
    receiver.close()
    client.close()
    for waiter in waiters:
        with pytest.raises(ChannelClosedError):
            await asyncio.wait_for(waiter, 10)
    with pytest.raises(ChannelClosedError):
        await receiver.recv()


def test_runtime_dir_and_endpoints(tmp_path) -> None:
    with RuntimeDir() as owner:
        attached = RuntimeDir.attach(owner.path)
        assert attached.ipc_endpoint("x") == owner.ipc_endpoint("x") == f"ipc://{owner.path}/x"
        attached.close()  # not the owner: the directory stays
        assert owner.path.is_dir()
        for bad in ["", "a/b", "..", "x" * 200]:
            with pytest.raises(ValueError):
                owner.ipc_endpoint(bad)
    assert not owner.path.exists()
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    with pytest.raises(ValueError):
        RuntimeDir.attach(shared)  # readable by others: not a private runtime directory
    assert tcp_endpoint() == "tcp://127.0.0.1:*"
    assert tcp_endpoint("::1") == "tcp://[::1]:*"


def test_uvloop_and_run() -> None:
    loop = new_event_loop()
    try:
        assert type(loop).__module__.startswith("uvloop")
    finally:
        loop.close()

    async def roundtrip() -> object:
        with RuntimeDir() as directory:
            async with DataReceiver(directory.ipc_endpoint("d")) as receiver:
                async with DataSender(receiver.endpoint) as sender:
                    await sender.send((1, "two"))
                    return await asyncio.wait_for(receiver.recv(), 30)

    assert run(roundtrip()) == (1, "two")
    assert asyncio.run(roundtrip()) == (1, "two")  # the standard loop works too
