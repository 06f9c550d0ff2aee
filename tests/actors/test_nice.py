"""`models.<name>.nice` lowers an actor's compute priority, also with autogroup scheduling.

Local actors share the coordinator's session (their own process group, not their own session),
hence its autogroup: the nice value of the compute thread ranks it against the other actors, and
the autogroup is left alone (changing it would lower the coordinator and every actor). A process
leading its own session (an actor started over ssh) has the autogroup to itself and sets it too.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Nices the main thread from a compute-like thread: only that thread (and threads it starts)
# change; then prints both threads' priorities and the autogroup's nice.
_PROBE = """
import os, threading
from chatlearn.actors.worker_core import apply_priority
def autogroup():
    try:
        words = open("/proc/self/autogroup").read().split()
    except OSError:
        return "none"
    return words[-1] if words else "none"  # empty in a cgroup with its own cpu controller
before = autogroup()
seen = {}
def compute():
    apply_priority(int(os.environ.get("NICE", "0")), idle=bool(os.environ.get("IDLE")))
    seen["compute"] = os.getpriority(os.PRIO_PROCESS, 0)
    seen["policy"] = os.sched_getscheduler(0)
    child = threading.Thread(target=lambda: seen.update(child=os.getpriority(os.PRIO_PROCESS, 0)))
    child.start()
    child.join()
thread = threading.Thread(target=compute)
thread.start()
thread.join()
main = os.getpriority(os.PRIO_PROCESS, 0)
print(seen["compute"], seen["child"], main, before, autogroup())
print(seen["policy"], os.sched_getscheduler(0))
"""


def _probe(env: dict[str, str], **popen: object) -> tuple[int, int, int, str, str, int, int]:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
        **popen,
    )
    assert done.returncode == 0, done.stderr
    compute, child, main, before, after, policy, main_policy = done.stdout.split()
    return int(compute), int(child), int(main), before, after, int(policy), int(main_policy)


def test_apply_nice_lowers_the_compute_thread_only_and_keeps_a_shared_autogroup() -> None:
    own = os.getpriority(os.PRIO_PROCESS, 0)
    compute, child, main, before, after, _, _ = _probe({"NICE": "7"}, process_group=0)
    assert compute == own + 7
    assert child == compute  # torch's threads, started by the compute thread
    assert main == own  # the event loop (heartbeats, replies) keeps its priority
    assert after == before  # the coordinator's autogroup is not lowered with the actor


def test_apply_nice_sets_the_autogroup_of_a_session_leader() -> None:
    compute, _, _, _, after, _, _ = _probe({"NICE": "7"}, start_new_session=True)  # as sshd
    if after == "none":
        pytest.skip("no autogroup here (kernel without them, or a cgroup with its own cpu share)")
    assert int(after) == compute


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="needs Linux SCHED_IDLE")
def test_idle_priority_puts_the_compute_thread_under_sched_idle() -> None:
    compute, child, main, before, after, policy, main_policy = _probe({"IDLE": "1"})
    assert policy == os.SCHED_IDLE
    assert main_policy == os.sched_getscheduler(0)  # the event loop's thread is unchanged
    assert compute == 19 and child == 19  # and nice 19, for a session leader's autogroup
    assert after == before


def test_apply_priority_to_other_threads_by_native_id() -> None:
    # what an actor does after start-up: the compute thread and the pools start-up created
    probe = """
import os, threading
from chatlearn.actors.worker_core import apply_priority
ready, done = threading.Event(), threading.Event()
ids = {}
def pool_thread():
    ids["tid"] = threading.get_native_id()
    ready.set()
    done.wait()
    ids["nice"] = os.getpriority(os.PRIO_PROCESS, 0)
thread = threading.Thread(target=pool_thread)
thread.start()
ready.wait()
apply_priority(5, threads=[ids["tid"]])
done.set()
thread.join()
print(ids["nice"], os.getpriority(os.PRIO_PROCESS, 0))
"""
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    own = os.getpriority(os.PRIO_PROCESS, 0)
    assert [int(v) for v in done.stdout.split()] == [min(19, own + 5), own]


def test_spawned_workers_share_the_coordinators_session() -> None:
    from chatlearn.actors.process import spawn_worker

    worker = spawn_worker(["--help"], dict(os.environ))
    try:
        assert os.getsid(worker.pid) == os.getsid(0)
        assert os.getpgid(worker.pid) == worker.pid  # their own group: no terminal Ctrl-C
    finally:
        worker.kill()
        worker.communicate(timeout=30)
