"""A benchmark stopped by SIGTERM leaves neither its temporary directory nor a process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.timeout(120)

TINY = "--hidden-size 32 --intermediate-size 64 --num-layers 1 --seq-len 32 --batch-size 4"


def test_sigterm_removes_the_bench_directory_and_stops_its_actors(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "chatlearn.cli", "bench", "dpo", *TINY.split()]
    command += ["--generation-batch-size", "4", "--steps", "200", "--warmup", "1"]
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # the bench's directory goes there
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    children: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 60
        # wait for the first run's actors (the directory exists from the start)
        while time.monotonic() < deadline and proc.poll() is None:
            children = psutil.Process(proc.pid).children(recursive=True)
            if list(tmp_path.glob("chatlearn-bench-*")) and children:
                break
            time.sleep(0.1)
        assert proc.poll() is None and children, "the bench did not start its actors"
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, stderr.decode(errors="replace")[-3000:]
    assert list(tmp_path.glob("chatlearn-bench-*")) == []
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert alive == [], alive
