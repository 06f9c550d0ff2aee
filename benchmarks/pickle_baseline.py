"""The naive baseline of `chatlearn bench transport`: pickle over a plain ZeroMQ socket.

It measures what our pickle-free codec is compared against (what a straightforward
implementation would do). It lives outside the `chatlearn` package on purpose: the package never
imports pickle (tests/test_package.py). The benchmark loads this file by path from a source
checkout, only to run this baseline; without it the pickle columns are skipped.
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
