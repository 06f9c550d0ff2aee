"""The process's ZeroMQ contexts: the one every socket but a connecting data sender's comes from,
and the data senders' own.

Data senders (`DataSender`) default to a second process-wide context, `sending_context`, whose
I/O thread runs under Linux's SCHED_BATCH policy (`batch_io_threads`): woken to write a queued
message, it waits until the sending thread blocks or uses up its time slice instead of
preempting it. Under the default policy it preempted the sender for almost every message (0.7
times a message at 4 KiB, each a flushed cache for the Python code that resumes), where raw
pyzmq, blocking in C, fills the queue before it yields and lets the I/O thread write a batch.
Receivers and the control plane stay on the process context (`process_context`) under the
default policy, where the opposite holds: an I/O thread that reads a message at once, even
preempting, lets the next receive find it queued instead of waiting for the loop, and a reply
leaves as soon as it is queued (batched, a round trip took ~8 µs longer; a receiver of 4 KiB
messages got 15-20% slower).
"""

from __future__ import annotations

import contextlib
import os
import threading

import zmq
import zmq.asyncio


def process_context() -> zmq.asyncio.Context:
    """The process-wide `zmq.asyncio.Context`: the default of every channel but `DataSender`."""
    return zmq.asyncio.Context.instance()


_sending: tuple[int, zmq.asyncio.Context] | None = None  # (pid, context)
_sending_lock = threading.Lock()


def sending_context() -> zmq.asyncio.Context:
    """The process-wide context of data senders (`DataSender`'s default), its I/O thread
    batched (see the module doc); made on first use, and again in a forked child."""
    global _sending
    with _sending_lock:
        context = existing_sending_context()
        if context is None:
            context = zmq.asyncio.Context()
            batch_io_threads(context)
            _sending = (os.getpid(), context)
        return context


def existing_sending_context() -> zmq.asyncio.Context | None:
    """`sending_context` if this process has made it (to terminate it at exit), else None."""
    sending = _sending
    if sending is None or sending[0] != os.getpid() or sending[1].closed:
        return None
    return sending[1]


def batch_io_threads(context: zmq.Context) -> None:
    """Start ``context``'s I/O threads (they start with its first socket) under SCHED_BATCH: see
    the module doc. Leaves alone a policy already chosen for the context, a context whose
    threads run already, and systems without the policy."""
    policy = getattr(os, "SCHED_BATCH", None)
    if policy is None:
        return
    try:
        chosen = context.get(zmq.THREAD_SCHED_POLICY)
    except zmq.ZMQError:
        # libzmq returns -1 for "not set", which pyzmq takes for an error when errno happens
        # to hold one from an earlier call
        chosen = -1
    if chosen == -1:
        with contextlib.suppress(zmq.ZMQError):  # a context being terminated
            context.set(zmq.THREAD_SCHED_POLICY, policy)


def async_context(context: zmq.Context | None) -> zmq.Context:
    """The given context, or the process-wide one (`process_context`)."""
    if context is None:
        return process_context()
    if isinstance(context, zmq.Context):
        return context
    raise TypeError(f"context must be a zmq.Context, got {type(context).__qualname__}")
