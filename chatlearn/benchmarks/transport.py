"""`chatlearn bench transport`: our data channel against raw pyzmq and pickle, two real processes.

For each endpoint kind (ipc, tcp) the benchmark starts a peer process
(`chatlearn.benchmarks.transport_peer`) that sends ``{"x": float32 tensor}`` payloads of 4 KiB,
1 MiB, 16 MiB and 128 MiB to this process, which receives them:

- ours: `DataSender` -> `DataReceiver` (codec, zmq.asyncio on uvloop, zero-copy both ways);
- raw: blocking pyzmq PUSH/PULL of ``[small header, tensor memory]`` with ``copy=False`` — the
  ceiling for anything built on pyzmq;
- codec: the same blocking pyzmq sockets, but each message encoded by our `encode` and decoded by
  our `decode` into a tensor, as ours does — the ceiling for anything built on pyzmq that hands
  the receiver a tensor with our codec's checks, without asyncio: ours/raw is codec/raw (what the
  codec costs) times ours/codec (what the event loop costs);
- pickle: ``pickle.dumps`` over blocking pyzmq — the naive way;
- memcpy: one thread copying the payload in memory, for scale.

Both processes fix glibc's malloc thresholds as actor processes do, and raw pyzmq's sockets come
from the contexts ours use (`raw_socket`: sending data from the one whose I/O thread runs
batched, see `chatlearn.transport.sockets`), their ipc connections with the send buffer ours
asks for (`transport_peer._connect_as_ours`): every mode alike, so that ours/raw is what runs
above libzmq, not how the kernel's buffers were set.

The two processes are pinned to one core each (the first two this process may use), as the
runtime pins a reference and a trainer of one core each (`actors/placement.py`): left to the
scheduler, their threads (two event loops, ZeroMQ's I/O threads, pyzmq's garbage collector)
move between the cores, and one round's rates differ from the next by tens of percent
(BENCHMARKS.md). ``--no-pin`` measures that layout.

Each figure is the median of ``--repeat`` rounds; a round measures every mode back to back (in
alternating order), and ours/raw is the median of the rounds' own ratios, so that the machine's
drift (tens of percent on a shared VM) hits both sides of a ratio alike. GB/s are 10^9 bytes of
payload per second measured at the receiver, after a warm-up. Before the rounds of a size, one
untimed pass runs every mode once (`Row.warmup_gbps`): the first mode measured at a new size ran
at 0.6-0.8x its later rounds' rate (both processes' allocators and page tables meeting the new
size), and the first mode of the first round was always ours.

The control round trip is a 100-byte PING request through `ControlServer.request` to the peer's
`ControlClient` and back; beside it, the same round trip over blocking pyzmq DEALER sockets (no
asyncio, no envelope): the floor of any pyzmq-based control plane on the machine at hand. Over
ipc, two more floors: 100 bytes echoed over a plain unix stream socket with blocking calls (the
least any two processes need to answer each other) and with both processes' uvloop event loops
(the least for any asyncio control plane).

Ctrl-C ends both processes within a fraction of a second, exit code 130: the receivers that
block (in worker threads) wait in slices of STOP_SLICE and stop when the measurement awaiting
them is cancelled; the peer dies of the SIGINT it gets with the benchmark.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import click

from chatlearn.benchmarks.transport_peer import (
    PICKLE_BASELINE,
    RECV_TIMEOUT,
    STOP_SLICE,
    pickle_baseline,
    pin_threads,
    raw_socket,
    recv_exactly,
    waited_slice,
)
from chatlearn.transport import (
    ControlServer,
    DataReceiver,
    Message,
    MessageKind,
    RuntimeDir,
    decode,
    keep_receive_buffers,
    run,
    tcp_endpoint,
)

KIB, MIB = 1024, 1024 * 1024
SIZES = (4 * KIB, 1 * MIB, 16 * MIB, 128 * MIB)
ENDPOINT_KINDS = ("ipc", "tcp")
MODES = ("ours", "raw", "codec", "pickle")
# The same queue bound for every mode; 4 keeps 128 MiB runs within a few hundred MiB of memory.
BENCH_HWM = 4
RTT_PAYLOAD = b"x" * 100
PEER_START_TIMEOUT = 120.0


def _end_thread(task: asyncio.Future[Any], stop: threading.Event) -> None:
    """On the way out of a measurement (done, failed or cancelled by Ctrl-C): ``stop`` its
    blocking thread, and cancel ``task``, the thread's future, so that the thread's ending
    (`BenchStopped`) is nobody's "exception never retrieved"."""
    stop.set()
    task.cancel()  # nothing when done
    if task.done() and not task.cancelled():
        task.exception()  # raised already where it mattered


class _Sliced:
    """A blocking zmq socket's ``recv``/``recv_multipart``/``send`` waiting in STOP_SLICE slices
    (its RCVTIMEO/SNDTIMEO) until the call goes through, ``stop`` is set or RECV_TIMEOUT passes
    (a DEALER's send waits for its peer to connect)."""

    def __init__(self, sock: Any, stop: threading.Event) -> None:
        import zmq

        self.sock, self.stop = sock, stop
        sock.setsockopt(zmq.RCVTIMEO, int(STOP_SLICE * 1000))
        sock.setsockopt(zmq.SNDTIMEO, int(STOP_SLICE * 1000))

    def send(self, *args: Any, **kwargs: Any) -> Any:
        return self._sliced(self.sock.send, args, kwargs)

    def recv(self, *args: Any, **kwargs: Any) -> Any:
        return self._sliced(self.sock.recv, args, kwargs)

    def recv_multipart(self, *args: Any, **kwargs: Any) -> Any:
        return self._sliced(self.sock.recv_multipart, args, kwargs)

    def _sliced(self, call: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        import zmq

        waited = 0.0
        while True:
            try:
                return call(*args, **kwargs)
            except zmq.Again:
                waited = waited_slice(waited, self.stop)


@dataclass
class Row:
    size_bytes: int
    endpoint: str
    ours_gbps: float = 0.0
    raw_gbps: float = 0.0
    pickle_gbps: float = 0.0
    memcpy_gbps: float = 0.0
    ratio_vs_raw: float = 0.0
    ours_msgs_per_s: float = 0.0
    raw_msgs_per_s: float = 0.0
    pickle_msgs_per_s: float = 0.0
    # raw pyzmq with our codec on both ends (blocking, no asyncio): what encoding and decoding
    # alone leave of raw's rate, measured in the same rounds
    codec_gbps: float = 0.0
    codec_msgs_per_s: float = 0.0
    codec_ratio_vs_raw: float = 0.0
    # every round's ours/raw (and codec/raw) and GB/s per mode: the spread behind the medians
    ratio_runs: list[float] = field(default_factory=list)
    codec_ratio_runs: list[float] = field(default_factory=list)
    runs_gbps: dict[str, list[float]] = field(default_factory=dict)
    # the untimed pass of every mode before the rounds (see the module doc), GB/s per mode
    warmup_gbps: dict[str, float] = field(default_factory=dict)


def message_counts(size: int, quick: bool) -> tuple[int, int]:
    """(warm-up, timed) message counts: about 512 MiB per timing (128 MiB with --quick)."""
    budget = (128 if quick else 512) * MIB
    count = max(4 if quick else 8, min(5000 if not quick else 2000, budget // size))
    return max(2, count // 10), count


def memcpy_gbps(size: int, min_seconds: float = 0.2) -> float:
    import numpy as np

    src = np.ones(size, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in first
    num_copies, started = 0, time.perf_counter()
    while True:
        np.copyto(dst, src)
        num_copies += 1
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds and num_copies >= 3:
            return num_copies * size / elapsed / 1e9


def _receive_n(sock: Any, count: int, stop: threading.Event, decoding: bool) -> None:
    """Receive `count` messages (and decode them if `decoding`), calling the socket itself in
    the loop: raw pyzmq is the baseline, and a wrapper's call per message (`_Sliced`) would be
    a cost of the baseline's own. A slice that ends without a message resumes where it was."""
    import zmq

    recv = sock.recv_multipart
    remaining, waited = count, 0.0
    while remaining:
        i = 0
        try:
            if decoding:
                for i in range(remaining):  # noqa: B007 (i: how far it got)
                    decode(recv(copy=False))
            else:
                for i in range(remaining):  # noqa: B007
                    recv(copy=False)
            remaining = 0
        except zmq.Again:  # message i never came within the slice
            remaining -= i
            waited = waited_slice(0.0 if i else waited, stop)  # the limit is per message


def _receive_blocking(
    endpoint: str, mode: str, warmup: int, count: int, ready: Any, stop: threading.Event
) -> float:
    """Bind a plain PULL socket and receive (raw, codec or pickle); runs in a worker thread
    until done or ``stop`` is set (`BenchStopped`)."""
    import zmq

    sock: zmq.Socket[bytes] = raw_socket(zmq.PULL, sending=False)
    sock.setsockopt(zmq.RCVHWM, BENCH_HWM)
    sock.setsockopt(zmq.LINGER, 0)
    receiver = _Sliced(sock, stop)
    try:
        sock.bind(endpoint)
        ready(sock.getsockopt_string(zmq.LAST_ENDPOINT))
        if mode == "pickle":
            elapsed, _ = pickle_baseline().recv_unpickled(receiver, warmup, count)
            return elapsed
        decoding = mode == "codec"
        _receive_n(sock, warmup, stop, decoding)
        started = time.perf_counter()
        _receive_n(sock, count, stop, decoding)
        return time.perf_counter() - started
    finally:
        sock.close()


def _raw_round_trips(
    endpoint: str, warmup: int, count: int, ready: Any, stop: threading.Event
) -> list[float]:
    """Bind a plain DEALER, then time ``count`` blocking 100-byte round trips to the peer
    (until ``stop`` is set: `BenchStopped`)."""
    import zmq

    sock: zmq.Socket[bytes] = raw_socket(zmq.DEALER, sending=False)
    sock.setsockopt(zmq.LINGER, 0)
    receiver = _Sliced(sock, stop)
    try:
        sock.bind(endpoint)
        ready(sock.getsockopt_string(zmq.LAST_ENDPOINT))
        samples = []
        for i in range(warmup + count):
            started = time.perf_counter_ns()
            # the socket itself first: this is the floor, it must not pay the slicing's calls
            try:
                sock.send(RTT_PAYLOAD)
            except zmq.Again:  # no peer yet, or a slice passed: wait on in slices
                receiver.send(RTT_PAYLOAD)
            try:
                sock.recv(copy=False)
            except zmq.Again:
                receiver.recv(copy=False)
            if i >= warmup:
                samples.append((time.perf_counter_ns() - started) / 1000)
        return samples
    finally:
        sock.close()


def _stream_round_trips_blocking(
    conn: socket.socket, warmup: int, count: int, stop: threading.Event
) -> list[float]:
    """Time 100-byte round trips over a connected unix stream socket; runs in a worker thread
    until done or ``stop`` is set (`BenchStopped`)."""
    conn.settimeout(STOP_SLICE)  # see _Sliced
    samples = []
    for i in range(warmup + count):
        started = time.perf_counter_ns()
        conn.sendall(RTT_PAYLOAD)
        recv_exactly(conn, len(RTT_PAYLOAD), stop)
        if i >= warmup:
            samples.append((time.perf_counter_ns() - started) / 1000)
    return samples


async def _stream_round_trips_async(conn: socket.socket, warmup: int, count: int) -> list[float]:
    """The same round trips driven by this process's event loop (uvloop)."""
    reader, writer = await asyncio.open_unix_connection(sock=conn)
    samples = []
    try:
        async with asyncio.timeout(RECV_TIMEOUT):
            for i in range(warmup + count):
                started = time.perf_counter_ns()
                writer.write(RTT_PAYLOAD)
                await reader.readexactly(len(RTT_PAYLOAD))
                if i >= warmup:
                    samples.append((time.perf_counter_ns() - started) / 1000)
    finally:
        writer.close()
    return samples


class Bench:
    """Drives one peer process over one endpoint kind."""

    def __init__(self, server: ControlServer, identity: bytes, runtime_dir: RuntimeDir, kind: str):
        self.server, self.identity, self.runtime_dir, self.kind = (
            server,
            identity,
            runtime_dir,
            kind,
        )
        self._num_endpoints = 0

    def data_endpoint(self) -> str:
        self._num_endpoints += 1
        if self.kind == "ipc":
            return self.runtime_dir.ipc_endpoint(f"data-{self._num_endpoints}")
        return tcp_endpoint()

    def _order(self, mode: str, endpoint: str, size: int, count: int) -> dict[str, Any]:
        return {"mode": mode, "endpoint": endpoint, "size": size, "count": count, "hwm": BENCH_HWM}

    async def throughput(self, mode: str, size: int, warmup: int, count: int) -> float:
        """Seconds to receive ``count`` messages of ``size`` bytes (after ``warmup`` of them)."""
        if mode != "ours":
            return await self._throughput_blocking(mode, size, warmup, count)
        with DataReceiver(self.data_endpoint(), hwm=BENCH_HWM) as receiver:
            order = self._order(mode, receiver.endpoint, size, warmup + count)
            reply = asyncio.ensure_future(
                self.server.request(self.identity, MessageKind.CALL, order)
            )
            try:
                async with asyncio.timeout(RECV_TIMEOUT):  # one timer, not one per message
                    for _ in range(warmup):
                        await receiver.recv()
                    # Each message is dropped once received, as raw's loop does: holding one
                    # while the next arrives makes libzmq's next buffer fresh memory (page
                    # faults: 16 MiB messages at 0.7x raw's speed here, see BENCHMARKS.md).
                    started = time.perf_counter()
                    for _ in range(count - 1):
                        await receiver.recv()
                    payload = await receiver.recv()
                    elapsed = time.perf_counter() - started
                assert payload["x"].numel() * 4 == size
                await reply
            finally:
                reply.cancel()
        return elapsed

    async def _throughput_blocking(self, mode: str, size: int, warmup: int, count: int) -> float:
        loop = asyncio.get_running_loop()
        bound: asyncio.Future[str] = loop.create_future()
        stop = threading.Event()  # set when this is cancelled (Ctrl-C): the thread ends too

        def ready(endpoint: str) -> None:
            loop.call_soon_threadsafe(bound.set_result, endpoint)

        endpoint = self.data_endpoint()
        receiving = asyncio.ensure_future(
            asyncio.to_thread(_receive_blocking, endpoint, mode, warmup, count, ready, stop)
        )
        try:
            waiting: list[asyncio.Future[Any]] = [bound, receiving]
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if not bound.done():
                return receiving.result()  # raises the receiver's error
            order = self._order(mode, bound.result(), size, warmup + count)
            await self.server.request(self.identity, MessageKind.CALL, order)
            return await receiving
        finally:
            _end_thread(receiving, stop)

    async def raw_rtt_us(self, num_requests: int) -> list[float]:
        """Round trips (µs) of 100-byte messages over blocking pyzmq, echoed by the peer."""
        warmup = max(50, num_requests // 10)
        loop = asyncio.get_running_loop()
        bound: asyncio.Future[str] = loop.create_future()
        stop = threading.Event()  # set when this is cancelled (Ctrl-C): the thread ends too

        def ready(endpoint: str) -> None:
            loop.call_soon_threadsafe(bound.set_result, endpoint)

        endpoint = self.data_endpoint()
        timing = asyncio.ensure_future(
            asyncio.to_thread(_raw_round_trips, endpoint, warmup, num_requests, ready, stop)
        )
        try:
            waiting: list[asyncio.Future[Any]] = [bound, timing]
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if not bound.done():
                return timing.result()  # raises the thread's error
            order = {"mode": "echo", "endpoint": bound.result(), "count": warmup + num_requests}
            echo = asyncio.ensure_future(
                self.server.request(self.identity, MessageKind.CALL, order)
            )
            try:
                samples = await timing
            except BaseException:
                echo.cancel()  # no reply to wait for on the way out (the peer may be gone)
                raise
            await echo
            return samples
        finally:
            _end_thread(timing, stop)

    async def stream_rtt_us(self, num_requests: int, *, blocking: bool) -> list[float]:
        """Round trips (µs) of 100 bytes over a plain unix stream socket, echoed by the peer,
        with blocking calls on both sides (the least any two processes on this machine need to
        answer each other) or on both processes' event loops (the least for asyncio)."""
        warmup = max(50, num_requests // 10)
        self._num_endpoints += 1
        path = str(self.runtime_dir.path / f"stream-{self._num_endpoints}.sock")
        loop = asyncio.get_running_loop()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        echo: asyncio.Future[Any] | None = None
        stop = threading.Event()  # set when this is cancelled (Ctrl-C): the thread ends too
        try:
            listener.bind(path)
            listener.listen(1)
            listener.setblocking(False)
            order = {"mode": "stream-echo", "endpoint": path, "count": warmup + num_requests}
            order.update(size=len(RTT_PAYLOAD), blocking=blocking)
            echo = asyncio.ensure_future(
                self.server.request(self.identity, MessageKind.CALL, order)
            )
            accept = asyncio.ensure_future(loop.sock_accept(listener))
            await asyncio.wait(
                [accept, echo], timeout=PEER_START_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
            )
            if not accept.done():
                accept.cancel()
                if echo.done():
                    echo.result()  # raises the peer's error
                raise TimeoutError("the benchmark peer did not connect its stream socket")
            conn, _ = accept.result()
            try:
                if blocking:
                    conn.setblocking(True)
                    samples = await asyncio.to_thread(
                        _stream_round_trips_blocking, conn, warmup, num_requests, stop
                    )
                else:
                    samples = await _stream_round_trips_async(conn, warmup, num_requests)
            finally:
                stop.set()  # the thread's next slice ends it, if this was cancelled
                conn.close()
            await echo
            return samples
        finally:
            stop.set()
            if echo is not None:
                echo.cancel()
            listener.close()
            with contextlib.suppress(OSError):
                os.unlink(path)

    async def rtt_us(self, num_requests: int) -> list[float]:
        """Round-trip times (µs) of ``num_requests`` sequential 100-byte PING requests."""
        request = self.server.request
        for _ in range(max(50, num_requests // 10)):
            await request(self.identity, MessageKind.PING, RTT_PAYLOAD)
        samples = []
        for _ in range(num_requests):
            started = time.perf_counter_ns()
            await request(self.identity, MessageKind.PING, RTT_PAYLOAD)
            samples.append((time.perf_counter_ns() - started) / 1000)
        return samples


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bench_cores(pin: bool) -> tuple[int, int] | None:
    """The cores of this process and of the peer when pinned: the first two this process may
    use, as placement gives two one-core actors; None if not pinned or fewer than two."""
    if not pin or not hasattr(os, "sched_getaffinity"):
        return None
    cores = sorted(os.sched_getaffinity(0))
    return (cores[0], cores[1]) if len(cores) >= 2 else None


async def bench_endpoint(
    kind: str, quick: bool, repeat: int, log: Any, peer_core: int | None = None
) -> dict[str, Any]:
    """All sizes and modes plus the RTT over one endpoint kind, with its own peer process."""
    with RuntimeDir() as runtime_dir:
        where = runtime_dir.ipc_endpoint("control") if kind == "ipc" else tcp_endpoint()
        server = ControlServer(where)
        command = [sys.executable, "-m", "chatlearn.benchmarks.transport_peer", server.endpoint]
        if peer_core is not None:
            command.append(str(peer_core))
        peer = subprocess.Popen(command)
        try:
            identity, _ = await asyncio.wait_for(server.recv_unsolicited(), PEER_START_TIMEOUT)
            bench = Bench(server, identity, runtime_dir, kind)
            rtt = await bench_rtt(bench, kind, 500 if quick else 2000, repeat)
            floors = ""
            if "stream_p50" in rtt:
                floors = (
                    f"; unix stream socket: blocking p50 {rtt['stream_p50']:.1f} µs, "
                    f"uvloop p50 {rtt['stream_uvloop_p50']:.1f} µs"
                )
            log(
                f"{kind}: control RTT p50 {rtt['p50']:.1f} µs, p99 {rtt['p99']:.1f} µs; "
                f"raw pyzmq p50 {rtt['raw_p50']:.1f} µs, p99 {rtt['raw_p99']:.1f} µs{floors}"
            )
            rows = []
            for size in SIZES:
                rows.append(await bench_size(bench, kind, size, quick, repeat))
                log(format_row(rows[-1]))
            await server.request(identity, MessageKind.PING, None, timeout=60)
            await server.send(identity, Message(kind=MessageKind.SHUTDOWN))
            await asyncio.to_thread(peer.wait, 30)
        finally:
            if peer.poll() is None:
                peer.kill()
                peer.wait(10)
            await server.aclose()
    return {"rows": rows, "rtt": rtt}


async def bench_rtt(bench: Bench, kind: str, num_requests: int, repeat: int) -> dict[str, Any]:
    """Control round trips, ours beside raw pyzmq (and, over ipc, a plain unix stream socket
    with blocking calls and with uvloop: the machine's floors); ``repeat`` interleaved rounds,
    each figure from the round with the median p50."""
    measures = {
        "": bench.rtt_us,
        "raw_": bench.raw_rtt_us,
    }
    if kind == "ipc":
        measures["stream_"] = functools.partial(bench.stream_rtt_us, blocking=True)
        measures["stream_uvloop_"] = functools.partial(bench.stream_rtt_us, blocking=False)
    runs: dict[str, list[list[float]]] = {prefix: [] for prefix in measures}
    for _ in range(repeat):
        for prefix, measure in measures.items():
            runs[prefix].append(await measure(num_requests))
    rtt: dict[str, Any] = {}
    for prefix, samples in runs.items():
        ordered = sorted(samples, key=lambda run: percentile(run, 0.5))
        middle = ordered[(len(ordered) - 1) // 2]
        rtt[f"{prefix}p50"] = percentile(middle, 0.5)
        rtt[f"{prefix}p99"] = percentile(middle, 0.99)
        rtt[f"{prefix}p50_runs"] = [round(percentile(run, 0.5), 1) for run in samples]
    # ours over raw blocking pyzmq, each round's own p50s: the figure the target bounds (1.5)
    rtt["ratio_runs"] = [
        round(ours / raw, 3) for ours, raw in zip(rtt["p50_runs"], rtt["raw_p50_runs"], strict=True)
    ]
    rtt["ratio_vs_raw"] = round(statistics.median(rtt["ratio_runs"]), 3)
    return rtt


async def bench_size(bench: Bench, kind: str, size: int, quick: bool, repeat: int) -> Row:
    """One payload size: ``repeat`` rounds, each measuring every mode back to back.

    The machine's speed drifts by tens of percent from one second to the next (a shared VM), so
    ours and raw are compared within each round, where they see the same conditions (the order
    alternates from round to round), and the reported ratio is the median of the rounds' ratios.
    GB/s and msg/s are medians too.
    """
    warmup, count = message_counts(size, quick)
    modes = MODES if PICKLE_BASELINE.is_file() else tuple(m for m in MODES if m != "pickle")
    # pickle is slow on big payloads; fewer messages give the same figure
    counts = {mode: count if mode != "pickle" else max(4, count // 4) for mode in modes}
    warmup_rates = {
        mode: counts[mode] / await bench.throughput(mode, size, warmup, counts[mode])
        for mode in modes
    }
    runs: dict[str, list[float]] = {mode: [] for mode in modes}
    for round_ in range(repeat):
        for mode in modes if round_ % 2 == 0 else modes[::-1]:
            elapsed = await bench.throughput(mode, size, warmup, counts[mode])
            runs[mode].append(counts[mode] / elapsed)
    rates = {mode: statistics.median(values) for mode, values in runs.items()}
    row = Row(size_bytes=size, endpoint=kind)
    for mode in modes:
        setattr(row, f"{mode}_msgs_per_s", round(rates[mode], 1))
        setattr(row, f"{mode}_gbps", round(rates[mode] * size / 1e9, 3))
    row.memcpy_gbps = round(statistics.median(memcpy_gbps(size) for _ in range(repeat)), 3)
    row.ratio_runs = _ratios(runs["ours"], runs["raw"])
    row.ratio_vs_raw = round(statistics.median(row.ratio_runs), 3)
    row.codec_ratio_runs = _ratios(runs["codec"], runs["raw"])
    row.codec_ratio_vs_raw = round(statistics.median(row.codec_ratio_runs), 3)
    row.runs_gbps = {
        mode: [round(r * size / 1e9, 3) for r in values] for mode, values in runs.items()
    }
    row.warmup_gbps = {mode: round(rate * size / 1e9, 3) for mode, rate in warmup_rates.items()}
    return row


def _ratios(rates: list[float], raw_rates: list[float]) -> list[float]:
    """Each round's rate over raw's in the same round."""
    return [round(rate / raw, 3) for rate, raw in zip(rates, raw_rates, strict=True)]


def format_size(size: int) -> str:
    return f"{size // MIB} MiB" if size >= MIB else f"{size // KIB} KiB"


HEADER = (
    f"{'size':>8} {'endpoint':>8} {'ours GB/s':>10} {'raw GB/s':>9} {'pickle GB/s':>11} "
    f"{'memcpy GB/s':>11} {'ours/raw':>8} {'codec/raw':>9} {'ours msg/s':>11} {'raw msg/s':>10} "
    f"{'pickle msg/s':>12}"
)


def format_row(row: Row) -> str:
    return (
        f"{format_size(row.size_bytes):>8} {row.endpoint:>8} {row.ours_gbps:>10.3f} "
        f"{row.raw_gbps:>9.3f} {row.pickle_gbps:>11.3f} {row.memcpy_gbps:>11.2f} "
        f"{row.ratio_vs_raw:>8.3f} {row.codec_ratio_vs_raw:>9.3f} {row.ours_msgs_per_s:>11.0f} "
        f"{row.raw_msgs_per_s:>10.0f} {row.pickle_msgs_per_s:>12.0f}"
    )


async def bench_all(
    kinds: tuple[str, ...],
    quick: bool,
    repeat: int,
    log: Any,
    cores: tuple[int, int] | None = None,
) -> dict[str, Any]:
    started = time.perf_counter()
    peer_core = cores[1] if cores is not None else None
    results = {kind: await bench_endpoint(kind, quick, repeat, log, peer_core) for kind in kinds}
    rows = [asdict(row) for kind in kinds for row in results[kind]["rows"]]
    rtt = {kind: results[kind]["rtt"] for kind in kinds}
    first = rtt[kinds[0]]
    return {
        "rows": rows,
        "rtt_us_p50": round(first["p50"], 1),
        "rtt_us_p99": round(first["p99"], 1),
        "raw_rtt_us_p50": round(first["raw_p50"], 1),
        "raw_rtt_us_p99": round(first["raw_p99"], 1),
        "rtt_ratio_vs_raw": first["ratio_vs_raw"],
        **{
            f"{name}_rtt_us_p50": round(rtt[kind][f"{name}_p50"], 1)
            for kind in kinds[:1]
            for name in ("stream", "stream_uvloop")
            if f"{name}_p50" in rtt[kind]
        },
        "rtt_endpoint": kinds[0],
        "rtt_us": rtt,
        "pinned_cores": list(cores) if cores is not None else None,
        "repeat": repeat,
        "quick": quick,
        "seconds": round(time.perf_counter() - started, 1),
    }


@click.command(name="transport")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("--quick", is_flag=True, help="Fewer messages and one repetition (a smoke run).")
@click.option("--repeat", type=click.IntRange(1, 20), default=None, help="Rounds per figure [5].")
@click.option(
    "--endpoint",
    "endpoints",
    type=click.Choice(ENDPOINT_KINDS),
    multiple=True,
    help="Endpoint kinds to measure (repeatable) [ipc and tcp].",
)
@click.option(
    "--pin/--no-pin",
    default=True,
    help="Pin this process and the sending one to a core each, as the runtime pins two "
    "one-core actors [pin, given two cores].",
)
def command(
    as_json: bool, quick: bool, repeat: int | None, endpoints: tuple[str, ...], pin: bool
) -> None:
    """Throughput (GB/s, msg/s) of our channel vs raw pyzmq, pickle and memcpy; control RTT."""
    kinds = endpoints or ENDPOINT_KINDS
    repeat = repeat or (1 if quick else 5)
    cores = bench_cores(pin)

    def log(line: str) -> None:
        # With --json, progress goes to stderr so stdout is exactly one JSON object.
        click.echo(line, err=as_json)

    if cores is not None:
        pin_threads(cores[0])
        log(f"receiving on core {cores[0]}, sending on core {cores[1]} (--no-pin: unpinned)")
    elif pin:
        log("not pinned: this process may use fewer than two cores")
    # as an actor process does; the peer does too (both ends of raw pyzmq alike)
    keep_receive_buffers()
    if not as_json:
        log(HEADER)
    # Ctrl-C: the loop stops the peer and its receiving threads on the way out, and the bench
    # group ends with the shell's code for it (chatlearn/cli.py)
    result = run(bench_all(tuple(kinds), quick, repeat, log, cores))
    if as_json:
        click.echo(json.dumps(result))
        return
    rtt = result["rtt_us"]
    for kind in kinds:
        figures = rtt[kind]
        log(f"control RTT ({kind}, 100-byte request): p50 {figures['p50']:.1f} µs, "
            f"p99 {figures['p99']:.1f} µs; raw blocking pyzmq p50 {figures['raw_p50']:.1f} µs, "
            f"p99 {figures['raw_p99']:.1f} µs; ours/raw {figures['ratio_vs_raw']:.2f}")  # fmt: skip
        # every floor measured in the same rounds as the figure it bounds
        for prefix, name in (
            ("", "ours"),
            ("raw_", "raw blocking pyzmq"),
            ("stream_", "unix stream socket, blocking"),
            ("stream_uvloop_", "unix stream socket, uvloop"),
        ):
            if f"{prefix}p50_runs" in figures:
                spread = ", ".join(f"{p:.0f}" for p in figures[f"{prefix}p50_runs"])
                log(f"  p50 of each round, {name}: {spread} µs")
        spread = ", ".join(f"{r:.2f}" for r in figures["ratio_runs"])
        log(f"  ours/raw of each round: {spread}")
    for row in result["rows"]:
        spread = ", ".join(f"{r:.2f}" for r in row["ratio_runs"])
        log(f"ours/raw {format_size(row['size_bytes'])} {row['endpoint']}: rounds {spread}")
        spread = ", ".join(f"{r:.2f}" for r in row["codec_ratio_runs"])
        log(f"codec/raw {format_size(row['size_bytes'])} {row['endpoint']}: rounds {spread}")
    log(f"medians of {repeat} round(s) per figure; {result['seconds']:.0f} s in total")
