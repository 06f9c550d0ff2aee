"""Whole user programs as subprocesses: a module class defined in the main script, and a
coordinator killed with SIGKILL (its actors must exit by themselves and leave nothing behind)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.timeout(90)

HERE = Path(__file__).resolve().parent


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


def test_class_defined_in_the_main_script_works_as_a_module(tmp_path):
    marker = tmp_path / "marker.txt"
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "user_main_script.py"), str(marker)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        _stop(proc)
    assert proc.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["module_name"] == "__chatlearn_main__"
    assert result["class_module"] == "__chatlearn_main__"
    assert result["greeting"] == "hello from __chatlearn_main__"
    assert result["actor_pid"] != result["coordinator_pid"]
    assert result["main_block_ran"] is False
    # the `if __name__ == "__main__":` block ran once: in the coordinator, not in the actor
    assert marker.read_text().splitlines() == [f"main block ran in pid {result['coordinator_pid']}"]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_kill9_of_the_coordinator_leaves_no_orphans():
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "coordinator_script.py")],
        stdout=subprocess.PIPE,
        text=True,
    )
    pids: list[int] = []
    runtime_dir = None
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # bounded by the test timeout; the script prints at once
        report = json.loads(line)
        pids, runtime_dir = report["pids"], report["runtime_dir"]
        assert len(pids) == 2 and all(_alive(pid) for pid in pids)
        assert os.path.isdir(runtime_dir)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        start = time.monotonic()
        while time.monotonic() - start < 10 and any(_alive(pid) for pid in pids):
            time.sleep(0.05)
        elapsed = time.monotonic() - start
        assert not any(_alive(pid) for pid in pids), f"orphans alive after {elapsed:.1f} s"
        print(f"\nactors gone {elapsed:.2f} s after kill -9 of their coordinator")
        # the actors also removed the dead coordinator's runtime directory (its ipc files)
        while time.monotonic() - start < 10 and os.path.exists(runtime_dir):
            time.sleep(0.05)
        assert not os.path.exists(runtime_dir)
    finally:
        _stop(proc)
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if runtime_dir:
            shutil.rmtree(runtime_dir, ignore_errors=True)


UNGUARDED = """
import chatlearn
from chatlearn import DPOEngine
from chatlearn.actors import BaseModule


class Reference(BaseModule):
    def build_dataset(self, samples, is_eval=False):
        return samples

    def forward_step(self, data):
        return data


class Policy(BaseModule):
    def train_step(self, data, iteration):
        return {}


chatlearn.init({
    "models": {"reference": {"num_cpu": 1}, "policy_trainer": {"num_cpu": 1, "trainable": True}},
    "runtime": {"num_episode": 1, "sample_per_episode": 4, "output_dir": OUTPUT,
                "generation_batch_size": 2, "train_micro_batch_size": 2,
                "train_global_batch_size": 2},
})
engine = DPOEngine(Reference("reference"), Policy("policy_trainer"))
engine.set_dataset(list(range(4)))
engine.learn()
"""


def test_a_script_that_starts_its_run_unguarded_is_told_to_guard_it(tmp_path: Path) -> None:
    # Every actor runs the script's top level to find its classes (as multiprocessing's spawn):
    # there the run started again and met the coordinator's run lock, "runtime.output_dir: ...
    # is in use by another run (pid N)", the coordinator's own pid, naming neither the script
    # nor the fix
    script = tmp_path / "train.py"
    script.write_text(UNGUARDED.replace("OUTPUT", repr(str(tmp_path / "out"))))
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{script}: the script starts a run at its top level"), last
    assert 'if __name__ == "__main__":' in last and "Traceback" not in done.stderr
    assert "in use by another run" not in done.stderr
