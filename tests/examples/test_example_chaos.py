"""The DPO example under the chaos harness (``chatlearn.chaos``): 7 SIGKILLs of reference
replicas, 3 of the trainer, and one SIGSTOP hang of each, at random moments; and, under
``chatlearn launch``, one SIGKILL of the coordinator itself once a checkpoint is written. The run
heals by itself (the launch restarts the coordinator, which resumes from the checkpoint) and ends
like an uninterrupted one: the same final policy weights bit for bit, every step once in
metrics.jsonl with the same values, no process and no ipc file left behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

from chatlearn.chaos import ChaosPlan, compare_runs, run_command

ROOT = Path(__file__).resolve().parents[2]
CONFIG = Path(__file__).resolve().parent / "chaos.yaml"  # two reference replicas, hang in 2 s
SCRIPT = ROOT / "examples" / "dpo" / "train_dpo.py"
ARGV = [sys.executable, "-m", "chatlearn.cli", "launch", str(SCRIPT), "-c", str(CONFIG)]
SETTINGS = {"NUM_EPISODE": "12", "SAMPLE_PER_EPISODE": "64", "PYTHONPATH": str(ROOT)}
PLAN = ChaosPlan(
    reference_kills=7,
    trainer_kills=3,
    reference_stops=1,
    trainer_stops=1,
    seed=5,
    min_gap=0.5,
    max_gap=2.0,
    warmup=2.0,
    min_age=1.0,
)

pytestmark = pytest.mark.timeout(600)


def _leftovers(runtime_base: Path) -> list[str]:
    """Processes of the run still alive: their command line names its runtime directory."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if str(runtime_base) in cmdline:
            found.append(f"{proc.info['pid']}: {cmdline[:120]}")
    return found


def _kill_the_coordinator_once(output: Path, done: threading.Event) -> list[int]:
    """SIGKILL the coordinator (the launch supervisor's child) once the run's first checkpoint
    exists; returns the killed pid (in a list the thread fills)."""
    killed: list[int] = []

    def run() -> None:
        checkpoints = output / "dpo_example" / "checkpoints"
        deadline = time.monotonic() + 300
        while not done.is_set() and time.monotonic() < deadline:
            if any(checkpoints.glob("iter_*")):
                for proc in psutil.process_iter(["pid", "cmdline"]):
                    cmdline = proc.info["cmdline"] or []
                    try:
                        if "launch" in cmdline and proc.environ().get("OUTPUT_DIR") == str(output):
                            if "launch" in psutil.Process(proc.ppid()).cmdline():
                                os.kill(proc.pid, signal.SIGKILL)  # the forked coordinator
                                killed.append(proc.pid)
                                return
                    except psutil.Error:
                        continue
            time.sleep(0.05)

    threading.Thread(target=run, daemon=True).start()
    return killed


def test_the_example_heals_from_kills_and_hangs_and_ends_bit_identical(tmp_path: Path) -> None:
    runtime_base = Path(tempfile.mkdtemp(prefix="clc-", dir="/tmp"))  # short: ipc path limit
    env = {**os.environ, **SETTINGS, "XDG_RUNTIME_DIR": str(runtime_base)}
    try:
        baseline = run_command(
            ARGV,
            env={**env, "OUTPUT_DIR": str(tmp_path / "baseline")},
            timeout=240,
            log=tmp_path / "baseline.log",
            name="baseline",
        )
        assert baseline.exit_code == 0, (tmp_path / "baseline.log").read_text()[-3000:]
        done = threading.Event()
        killed = _kill_the_coordinator_once(tmp_path / "chaos", done)
        try:
            chaos = run_command(
                ARGV,
                env={**env, "OUTPUT_DIR": str(tmp_path / "chaos")},
                timeout=400,
                plan=PLAN,
                log=tmp_path / "chaos.log",
                name="chaos",
            )
        finally:
            done.set()
        text = (tmp_path / "chaos.log").read_text()
        assert len(killed) == 1, "the coordinator was never killed"
        assert "the coordinator (pid" in text and "restart 1 of 3" in text, text[-3000:]
        events = "\n".join(event.line() for event in chaos.events)
        assert chaos.exit_code == 0, f"{events}\n{text[-6000:]}"
        assert len(chaos.events) == PLAN.total, f"{chaos.monkey_outcome}\n{events}"
        comparison = compare_runs(tmp_path / "baseline", tmp_path / "chaos")
        assert comparison.ok, "\n".join(comparison.lines())
        run_dir = tmp_path / "chaos" / "dpo_example"
        records = [
            json.loads(line)
            for name in ("metrics.jsonl", "metrics.superseded.jsonl")
            if (run_dir / name).is_file()
            for line in (run_dir / name).open()
        ]
        restarts = [r for r in records if r["kind"] == "restart"]
        # every kill and hang cost at least one restart, the coordinator's included, counted
        # over the whole run (records of steps trained again moved to metrics.superseded.jsonl)
        assert max(r["restarts"] for r in restarts) >= PLAN.total + 1, restarts
        assert any(r["model"] == "coordinator" for r in restarts)
        assert "self-healing: " in text
        assert chaos.killed == 0, "the run left processes in its process group"
        assert _leftovers(runtime_base) == []
        assert list(runtime_base.iterdir()) == [], "ipc files left behind"
    finally:
        for line in _leftovers(runtime_base):
            os.kill(int(line.split(":")[0]), 9)
        shutil.rmtree(runtime_base, ignore_errors=True)
