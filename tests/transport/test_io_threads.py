"""ZeroMQ's I/O threads run under SCHED_BATCH in the process-wide context (sockets.py).

Each case runs in a fresh process: a context's threads take its policy when its first socket
starts them, and the test process's context has started them long ago.
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
    import os

    def io_thread_policies():
        return sorted(
            {
                os.sched_getscheduler(int(tid))
                for tid in os.listdir("/proc/self/task")
                if open(f"/proc/self/task/{tid}/comm").read().startswith("ZMQbg/IO")
            }
        )
    """
)


def run_child(body: str) -> str:
    completed = subprocess.run(
        [sys.executable, "-c", POLICIES + textwrap.dedent(body)],
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    return completed.stdout.strip()


@pytest.mark.timeout(60)
def test_channels_of_the_process_context_run_batched_io_threads():
    out = run_child(
        """
        from chatlearn.transport import DataReceiver
        with DataReceiver("tcp://127.0.0.1:0"):
            print(io_thread_policies())
        """
    )
    assert out == str([os.SCHED_BATCH])


@pytest.mark.timeout(60)
def test_a_policy_chosen_for_the_context_is_kept():
    out = run_child(
        """
        import zmq
        from chatlearn.transport import DataReceiver, batch_io_threads
        context = zmq.Context()
        context.set(zmq.THREAD_SCHED_POLICY, os.SCHED_OTHER)
        batch_io_threads(context)
        with DataReceiver("tcp://127.0.0.1:0", context=context):
            print(io_thread_policies())
        context.term()
        """
    )
    assert out == str([os.SCHED_OTHER])
