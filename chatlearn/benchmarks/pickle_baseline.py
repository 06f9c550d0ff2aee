"""The naive baseline of `chatlearn bench transport`: pickle over a plain ZeroMQ socket.

This is the one module in the package that imports pickle, on purpose: it measures what our
pickle-free codec is compared against (what a straightforward implementation would do). Nothing
on the wire path imports it; the benchmark loads it lazily, only to run this baseline, and
tests/test_package.py allows exactly this file.
"""

from __future__ import annotations

import pickle
import time
from typing import Any

import zmq


def send_pickled(sock: zmq.Socket, obj: Any, count: int) -> None:
    """Pickle ``obj`` afresh for each of ``count`` sends, as naive code would (blocking)."""
    for _ in range(count):
        sock.send(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def recv_unpickled(sock: zmq.Socket, warmup: int, count: int) -> tuple[float, Any]:
    """Receive and unpickle ``warmup`` then ``count`` messages; seconds for the ``count``, last."""
    obj = None
    for _ in range(warmup):
        obj = pickle.loads(sock.recv())
    started = time.perf_counter()
    for _ in range(count):
        obj = pickle.loads(sock.recv())
    return time.perf_counter() - started, obj
