"""`chatlearn bench transport`: our data channel against raw pyzmq and pickle, two real processes.

For each endpoint kind (ipc, tcp) the benchmark starts a peer process
(`chatlearn.benchmarks.transport_peer`) that sends ``{"x": float32 tensor}`` payloads of 4 KiB,
1 MiB, 16 MiB and 128 MiB to this process, which receives them:

- ours: `DataSender` -> `DataReceiver` (codec, zmq.asyncio on uvloop, zero-copy both ways);
- raw: blocking pyzmq PUSH/PULL of ``[small header, tensor memory]`` with ``copy=False`` — the
  ceiling for anything built on pyzmq;
- pickle: ``pickle.dumps`` over blocking pyzmq — the naive way;
- memcpy: one thread copying the payload in memory, for scale.

Each figure is the best of ``--repeat`` runs, with the modes interleaved so that load from other
processes on the machine hits them alike. GB/s are 10^9 bytes of payload per second measured at
the receiver, after a warm-up. The control round trip is a 100-byte PING request through
`ControlServer.request` to the peer's `ControlClient` and back; beside it, the same round trip
over blocking pyzmq DEALER sockets (no asyncio, no envelope): the floor of any pyzmq-based
control plane on the machine at hand.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click

from chatlearn.transport import (
    ControlServer,
    DataReceiver,
    Message,
    MessageKind,
    RuntimeDir,
    run,
    tcp_endpoint,
)

KIB, MIB = 1024, 1024 * 1024
SIZES = (4 * KIB, 1 * MIB, 16 * MIB, 128 * MIB)
ENDPOINT_KINDS = ("ipc", "tcp")
MODES = ("ours", "raw", "pickle")
# The same queue bound for every mode; 4 keeps 128 MiB runs within a few hundred MiB of memory.
BENCH_HWM = 4
RTT_PAYLOAD = b"x" * 100
PEER_START_TIMEOUT = 120.0
# No single measurement may take longer than this: a stall is an error, not a hang.
RECV_TIMEOUT = 300.0


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
    # every repetition's GB/s per mode, to show the spread behind the best-of
    runs_gbps: dict[str, list[float]] = field(default_factory=dict)


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


# The naive pickle baseline lives outside the package (which never imports pickle): in a source
# checkout, benchmarks/pickle_baseline.py at the repository root.
PICKLE_BASELINE = Path(__file__).resolve().parents[2] / "benchmarks" / "pickle_baseline.py"


def pickle_baseline() -> Any:
    """The pickle baseline module, or None when this is not a source checkout."""
    if not PICKLE_BASELINE.is_file():
        return None
    spec = importlib.util.spec_from_file_location("chatlearn_pickle_baseline", PICKLE_BASELINE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _receive_blocking(endpoint: str, mode: str, warmup: int, count: int, ready: Any) -> float:
    """Bind a plain PULL socket and receive (raw or pickle); runs in a worker thread."""
    import zmq

    sock = zmq.Context.instance().socket(zmq.PULL)
    sock.setsockopt(zmq.RCVHWM, BENCH_HWM)
    sock.setsockopt(zmq.RCVTIMEO, int(RECV_TIMEOUT * 1000))  # a stall is an error, not a hang
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.bind(endpoint)
        ready(sock.getsockopt_string(zmq.LAST_ENDPOINT))
        if mode == "pickle":
            elapsed, _ = pickle_baseline().recv_unpickled(sock, warmup, count)
            return elapsed
        for _ in range(warmup):
            sock.recv_multipart(copy=False)
        started = time.perf_counter()
        for _ in range(count):
            sock.recv_multipart(copy=False)
        return time.perf_counter() - started
    finally:
        sock.close()


def _raw_round_trips(endpoint: str, warmup: int, count: int, ready: Any) -> list[float]:
    """Bind a plain DEALER, then time ``count`` blocking 100-byte round trips to the peer."""
    import zmq

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.RCVTIMEO, int(RECV_TIMEOUT * 1000))
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.bind(endpoint)
        ready(sock.getsockopt_string(zmq.LAST_ENDPOINT))
        samples = []
        for i in range(warmup + count):
            started = time.perf_counter_ns()
            sock.send(RTT_PAYLOAD)
            sock.recv(copy=False)
            if i >= warmup:
                samples.append((time.perf_counter_ns() - started) / 1000)
        return samples
    finally:
        sock.close()


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
                    started = time.perf_counter()
                    for _ in range(count):
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

        def ready(endpoint: str) -> None:
            loop.call_soon_threadsafe(bound.set_result, endpoint)

        receiving = asyncio.ensure_future(
            asyncio.to_thread(_receive_blocking, self.data_endpoint(), mode, warmup, count, ready)
        )
        await asyncio.wait([bound, receiving], return_when=asyncio.FIRST_COMPLETED)
        if not bound.done():
            return receiving.result()  # raises the receiver's error
        order = self._order(mode, bound.result(), size, warmup + count)
        await self.server.request(self.identity, MessageKind.CALL, order)
        return await receiving

    async def raw_rtt_us(self, num_requests: int) -> list[float]:
        """Round trips (µs) of 100-byte messages over blocking pyzmq, echoed by the peer."""
        warmup = max(50, num_requests // 10)
        loop = asyncio.get_running_loop()
        bound: asyncio.Future[str] = loop.create_future()

        def ready(endpoint: str) -> None:
            loop.call_soon_threadsafe(bound.set_result, endpoint)

        timing = asyncio.ensure_future(
            asyncio.to_thread(_raw_round_trips, self.data_endpoint(), warmup, num_requests, ready)
        )
        await asyncio.wait([bound, timing], return_when=asyncio.FIRST_COMPLETED)
        if not bound.done():
            return timing.result()  # raises the thread's error
        order = {"mode": "echo", "endpoint": bound.result(), "count": warmup + num_requests}
        echo = asyncio.ensure_future(self.server.request(self.identity, MessageKind.CALL, order))
        try:
            return await timing
        finally:
            await echo

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


async def bench_endpoint(kind: str, quick: bool, repeat: int, log: Any) -> dict[str, Any]:
    """All sizes and modes plus the RTT over one endpoint kind, with its own peer process."""
    with RuntimeDir() as runtime_dir:
        where = runtime_dir.ipc_endpoint("control") if kind == "ipc" else tcp_endpoint()
        server = ControlServer(where)
        command = [sys.executable, "-m", "chatlearn.benchmarks.transport_peer", server.endpoint]
        peer = subprocess.Popen(command)
        try:
            identity, _ = await asyncio.wait_for(server.recv_unsolicited(), PEER_START_TIMEOUT)
            bench = Bench(server, identity, runtime_dir, kind)
            rtts = [await bench.rtt_us(500 if quick else 2000) for _ in range(repeat)]
            best = min(rtts, key=lambda samples: percentile(samples, 0.5))
            raws = [await bench.raw_rtt_us(500 if quick else 2000) for _ in range(repeat)]
            best_raw = min(raws, key=lambda samples: percentile(samples, 0.5))
            rtt = {
                "p50": percentile(best, 0.5),
                "p99": percentile(best, 0.99),
                "p50_runs": [round(percentile(samples, 0.5), 1) for samples in rtts],
                "raw_p50": percentile(best_raw, 0.5),
                "raw_p99": percentile(best_raw, 0.99),
            }
            log(
                f"{kind}: control RTT p50 {rtt['p50']:.1f} µs, p99 {rtt['p99']:.1f} µs; "
                f"raw pyzmq p50 {rtt['raw_p50']:.1f} µs, p99 {rtt['raw_p99']:.1f} µs"
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


async def bench_size(bench: Bench, kind: str, size: int, quick: bool, repeat: int) -> Row:
    warmup, count = message_counts(size, quick)
    modes = MODES if PICKLE_BASELINE.is_file() else tuple(m for m in MODES if m != "pickle")
    runs: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(repeat):
        for mode in modes:
            # pickle is slow on big payloads; fewer messages give the same figure
            n = count if mode != "pickle" else max(4, count // 4)
            elapsed = await bench.throughput(mode, size, warmup, n)
            runs[mode].append(n / elapsed)
    best = {mode: max(rates) for mode, rates in runs.items()}
    row = Row(size_bytes=size, endpoint=kind)
    for mode in modes:
        setattr(row, f"{mode}_msgs_per_s", round(best[mode], 1))
        setattr(row, f"{mode}_gbps", round(best[mode] * size / 1e9, 3))
    row.memcpy_gbps = round(max(memcpy_gbps(size) for _ in range(repeat)), 3)
    row.ratio_vs_raw = round(best["ours"] / best["raw"], 3)
    row.runs_gbps = {
        mode: [round(r * size / 1e9, 3) for r in rates] for mode, rates in runs.items()
    }
    return row


def format_size(size: int) -> str:
    return f"{size // MIB} MiB" if size >= MIB else f"{size // KIB} KiB"


HEADER = (
    f"{'size':>8} {'endpoint':>8} {'ours GB/s':>10} {'raw GB/s':>9} {'pickle GB/s':>11} "
    f"{'memcpy GB/s':>11} {'ours/raw':>8} {'ours msg/s':>11} {'raw msg/s':>10} {'pickle msg/s':>12}"
)


def format_row(row: Row) -> str:
    return (
        f"{format_size(row.size_bytes):>8} {row.endpoint:>8} {row.ours_gbps:>10.3f} "
        f"{row.raw_gbps:>9.3f} {row.pickle_gbps:>11.3f} {row.memcpy_gbps:>11.2f} "
        f"{row.ratio_vs_raw:>8.3f} {row.ours_msgs_per_s:>11.0f} {row.raw_msgs_per_s:>10.0f} "
        f"{row.pickle_msgs_per_s:>12.0f}"
    )


async def bench_all(kinds: tuple[str, ...], quick: bool, repeat: int, log: Any) -> dict[str, Any]:
    started = time.perf_counter()
    results = {kind: await bench_endpoint(kind, quick, repeat, log) for kind in kinds}
    rows = [asdict(row) for kind in kinds for row in results[kind]["rows"]]
    rtt = {kind: results[kind]["rtt"] for kind in kinds}
    first = rtt[kinds[0]]
    return {
        "rows": rows,
        "rtt_us_p50": round(first["p50"], 1),
        "rtt_us_p99": round(first["p99"], 1),
        "raw_rtt_us_p50": round(first["raw_p50"], 1),
        "raw_rtt_us_p99": round(first["raw_p99"], 1),
        "rtt_endpoint": kinds[0],
        "rtt_us": rtt,
        "repeat": repeat,
        "quick": quick,
        "seconds": round(time.perf_counter() - started, 1),
    }


@click.command(name="transport")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("--quick", is_flag=True, help="Fewer messages and one repetition (a smoke run).")
@click.option("--repeat", type=click.IntRange(1, 20), default=None, help="Runs per figure [3].")
@click.option(
    "--endpoint",
    "endpoints",
    type=click.Choice(ENDPOINT_KINDS),
    multiple=True,
    help="Endpoint kinds to measure (repeatable) [ipc and tcp].",
)
def command(as_json: bool, quick: bool, repeat: int | None, endpoints: tuple[str, ...]) -> None:
    """Throughput (GB/s, msg/s) of our channel vs raw pyzmq, pickle and memcpy; control RTT."""
    kinds = endpoints or ENDPOINT_KINDS
    repeat = repeat or (1 if quick else 3)

    def log(line: str) -> None:
        # With --json, progress goes to stderr so stdout is exactly one JSON object.
        click.echo(line, err=as_json)

    if not as_json:
        log(HEADER)
    result = run(bench_all(tuple(kinds), quick, repeat, log))
    if as_json:
        click.echo(json.dumps(result))
        return
    rtt = result["rtt_us"]
    for kind in kinds:
        spread = ", ".join(f"{p:.0f}" for p in rtt[kind]["p50_runs"])
        log(f"control RTT ({kind}, 100-byte request): p50 {rtt[kind]['p50']:.1f} µs, "
            f"p99 {rtt[kind]['p99']:.1f} µs (p50 of each run: {spread}); raw blocking pyzmq "
            f"p50 {rtt[kind]['raw_p50']:.1f} µs, p99 {rtt[kind]['raw_p99']:.1f} µs")  # fmt: skip
    log(f"best of {repeat} run(s) per figure; {result['seconds']:.0f} s in total")
