"""Ctrl-C ends a benchmark at once: exit code 130, no traceback, no peer or actor left.

The transport benchmark's blocking receivers run in worker threads, which the event loop's
shutdown waits for: they waited for a message up to RECV_TIMEOUT (300 s) at once, so an
interrupted benchmark hung for minutes, and its peer printed a KeyboardInterrupt traceback.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

pytestmark = [pytest.mark.serial, pytest.mark.timeout(120)]  # asserts a wall-clock bound

# A Ctrl-C must end it within this; the receivers look at their stop flag every 0.1 s.
EXIT_BOUND = 5.0


@pytest.mark.parametrize("after", [0.0, 1.5])  # round trips or the first throughputs
def test_ctrl_c_ends_the_transport_benchmark_and_its_peer(after: float) -> None:
    command = [sys.executable, "-m", "chatlearn.cli", "bench", "transport", "--quick"]
    proc = subprocess.Popen(
        [*command, "--endpoint", "ipc"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        process_group=0,  # as a terminal's foreground job: Ctrl-C reaches the peer too
    )
    lines: list[str] = []
    measuring = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "control RTT" in line:  # the round trips are done: throughputs run
                measuring.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    peers: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None and not peers:
            peers = psutil.Process(proc.pid).children(recursive=True)
            time.sleep(0.05)
        assert peers, "the benchmark started no peer"
        if after:
            assert measuring.wait(60), "".join(lines)
        time.sleep(after or 0.5)
        assert proc.poll() is None, "the benchmark ended before the interrupt"
        interrupted = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
        took = time.monotonic() - interrupted
        _, alive = psutil.wait_procs(peers, timeout=5)  # read before the finally kills them
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for peer in peers:  # a peer that outlived the benchmark is not left behind either
            with contextlib.suppress(psutil.Error):
                peer.kill()
        reader.join(5)
    assert proc.returncode == 130, stderr[-3000:]
    assert took < EXIT_BOUND, f"{took:.1f} s after Ctrl-C"
    assert "Traceback" not in stderr and "Aborted" not in stderr, stderr[-3000:]
    assert alive == [], alive


def test_ctrl_c_ends_a_training_benchmark_with_one_line() -> None:
    # A benchmark that trains gets the engine's graceful stop, whose TrainingStopped went
    # through the benchmark: a 40-line traceback and exit code 1 (every benchmark goes through
    # the same bench group, chatlearn/cli.py)
    command = [sys.executable, "-m", "chatlearn.cli", "bench", "pipeline", "--episodes", "50"]
    proc = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, process_group=0
    )
    actors: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None and len(actors) < 2:
            actors = psutil.Process(proc.pid).children(recursive=True)
            time.sleep(0.05)
        assert len(actors) >= 2, "the benchmark started no actors"
        time.sleep(1.5)  # the actors are set up and training
        assert proc.poll() is None, "the benchmark ended before the interrupt"
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
        _, alive = psutil.wait_procs(actors, timeout=5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for actor in actors:
            with contextlib.suppress(psutil.Error):
                actor.kill()
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "Aborted" not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == "chatlearn bench: training stopped by SIGINT"
    assert alive == [], alive
