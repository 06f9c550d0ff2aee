"""A connecting `DataSender` runs on a context whose I/O thread is batched; every other channel
keeps the default policy (sockets.py).

Each case runs in a fresh process: a context's threads take its policy when its first socket
starts them, and the test process's contexts have started them long ago.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(
    not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is a Linux scheduling policy"
)

POLICIES = textwrap.dedent(
    """
    import os, time

    def io_thread_policies(expected):
        # A new I/O thread names itself and takes its context's policy once it runs, a moment
        # after the socket that starts it: wait (bounded) for the expected policies to show.
        deadline = time.monotonic() + 10
        while True:
            policies = sorted(
                {
                    os.sched_getscheduler(int(tid))
                    for tid in os.listdir("/proc/self/task")
                    if open(f"/proc/self/task/{tid}/comm").read().startswith("ZMQbg/IO")
                }
            )
            if policies == expected or time.monotonic() > deadline:
                return policies
            time.sleep(0.01)
    """
)


def run_child(body: str) -> list[str]:
    completed = subprocess.run(
        [sys.executable, "-c", POLICIES + textwrap.dedent(body)],
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    return completed.stdout.splitlines()


@pytest.mark.timeout(60)
def test_connecting_data_senders_alone_run_a_batched_io_thread():
    lines = run_child(
        """
        from chatlearn.transport import (
            DataReceiver, DataSender, existing_sending_context, sending_context
        )
        with DataReceiver("tcp://127.0.0.1:0") as receiver:
            with DataSender(receiver.endpoint, bind=False, hwm=2, linger_ms=0):
                # the receiver's context and the sender's
                print(io_thread_policies(sorted({os.SCHED_OTHER, os.SCHED_BATCH})))
                print(existing_sending_context() is sending_context())
        with DataSender("tcp://127.0.0.1:0", bind=True, linger_ms=0) as bound:
            # a binding sender stays on the process context (its ZAP handler, security.py)
            print(bound._socket.sock.context is not sending_context())
        """
    )
    assert lines == [str(sorted({os.SCHED_OTHER, os.SCHED_BATCH})), "True", "True"]


@pytest.mark.timeout(60)
def test_receivers_and_control_keep_the_default_policy():
    lines = run_child(
        """
        from chatlearn.transport import ControlServer, DataReceiver, existing_sending_context
        with DataReceiver("tcp://127.0.0.1:0"), ControlServer("tcp://127.0.0.1:0"):
            print(io_thread_policies([os.SCHED_OTHER]))
            print(existing_sending_context())
        """
    )
    assert lines == [str([os.SCHED_OTHER]), "None"]


@pytest.mark.timeout(60)
def test_a_policy_chosen_for_the_context_is_kept():
    lines = run_child(
        """
        import zmq
        from chatlearn.transport import DataSender
        from chatlearn.transport.contexts import batch_io_threads
        context = zmq.Context()
        context.set(zmq.THREAD_SCHED_POLICY, os.SCHED_OTHER)
        batch_io_threads(context)
        with DataSender("tcp://127.0.0.1:0", bind=True, context=context, linger_ms=0):
            print(io_thread_policies([os.SCHED_OTHER]))
        context.term()
        """
    )
    assert lines == [str([os.SCHED_OTHER])]
