"""The event loop every chatlearn process runs its sockets on: uvloop where available.

uvloop's C event loop roughly halves the per-message cost of asyncio wake-ups, which is most of
the control plane's round-trip time. On platforms without uvloop (Windows) the standard loop is
used; nothing else in the package depends on which one it is. All `zmq.asyncio` sockets of one
process must be used from the loop they were first used on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def uvloop_available() -> bool:
    """Whether `new_event_loop` returns a uvloop loop."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new event loop: uvloop where available, else the standard asyncio loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run(coro: Coroutine[Any, Any, T], *, debug: bool | None = None) -> T:
    """Like `asyncio.run`, on `new_event_loop()`: runs ``coro``, then cancels what is left."""
    with asyncio.Runner(debug=debug, loop_factory=new_event_loop) as runner:
        return runner.run(coro)
