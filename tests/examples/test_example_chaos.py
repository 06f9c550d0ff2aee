"""The DPO example under the chaos harness (``chatlearn.chaos``): 7 SIGKILLs of reference
replicas, 3 of the trainer, and one SIGSTOP hang of each, at random moments; and, under
``chatlearn launch``, one SIGKILL of the coordinator itself once a checkpoint is written. The run
heals by itself (the launch restarts the coordinator, which resumes from the checkpoint) and ends
like an uninterrupted one: the same final policy weights bit for bit, every step once in
metrics.jsonl with the same values, no process and no ipc file left behind."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

from chatlearn.chaos import ChaosPlan, compare_runs, find_actors, run_command

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

# The sharded example as users run it: both models FSDP2 over two processes, each model's rank 0
# reading or building it and sending it to the other (load_once), its policy's default of 3
# restarts per model, a checkpoint every episode.
FSDP_ARGV = [sys.executable, str(SCRIPT), "-c", str(ROOT / "examples" / "dpo" / "dpo_fsdp.yaml")]
FSDP_SETTINGS = {**SETTINGS, "NUM_EPISODE": "6", "SAVE_EPISODE_INTERVAL": "1"}
EXPORT = Path("policy_trainer", "rank_0", "hf_model")

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


def _kill_a_rank_of_each_model(output: Path, done: threading.Event) -> list[str]:
    """Once the run's first checkpoint exists (training under way), SIGKILL the trainer's rank 1
    and the reference's rank 0 at once (as a lost host would); returns their labels."""
    killed: list[str] = []

    def run() -> None:
        deadline = time.monotonic() + 300
        while not done.is_set() and time.monotonic() < deadline:
            if any(output.glob("*/checkpoints/iter_*")):
                break
            time.sleep(0.05)
        else:
            return
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                if str(SCRIPT) in (proc.info["cmdline"] or []):
                    if proc.environ().get("OUTPUT_DIR") == str(output):
                        break
            except psutil.Error:
                continue
        else:
            return
        for actor in find_actors(proc.pid):
            if (actor.model, actor.rank) in (("policy_trainer", 1), ("reference", 0)):
                os.kill(actor.pid, signal.SIGKILL)
                killed.append(actor.label)

    threading.Thread(target=run, daemon=True).start()
    return killed


def test_the_sharded_example_heals_from_a_killed_rank_of_each_model(tmp_path: Path) -> None:
    # A lost rank restarts its whole unit: each model's rank 0 sends its weights to the other
    # again, and the trainer's ranks load the sharded checkpoint (torch.distributed.checkpoint)
    runtime_base = Path(tempfile.mkdtemp(prefix="clc-", dir="/tmp"))  # short: ipc path limit
    env = {**os.environ, **FSDP_SETTINGS, "XDG_RUNTIME_DIR": str(runtime_base)}
    done = threading.Event()
    try:
        for name in ("baseline", "chaos"):
            killed = _kill_a_rank_of_each_model(tmp_path / name, done) if name == "chaos" else []
            run = run_command(
                FSDP_ARGV,
                env={**env, "OUTPUT_DIR": str(tmp_path / name)},
                timeout=240,
                log=tmp_path / f"{name}.log",
                name=name,
            )
            text = (tmp_path / f"{name}.log").read_text()
            assert run.exit_code == 0, text[-4000:]
            if name == "baseline":  # the example does as its file says
                sizes = re.search(r"policy_trainer: ([\d,]+) parameters \(([\d,]+) trainable", text)
                assert sizes and sizes[1] == sizes[2], text[-4000:]  # every parameter trains
                assert "layout: FSDP2 over 2 ranks" in text, text[-4000:]
                assert "shards nothing" not in text, text[-4000:]
                # one checkpoint an episode (the last three kept), the sharded state; the HF
                # export at the end only
                saved = sorted((tmp_path / name).glob("*/checkpoints/iter_*"))
                exports = [c.name for c in saved if (c / EXPORT / "config.json").is_file()]
                assert len(saved) == 3 and exports == [saved[-1].name], saved
                assert "policy (HF)" in text, text[-4000:]
        assert sorted(killed) == ["policy_trainer.0.1", "reference.0.0"], text[-4000:]
        assert "restarting model 'reference' replica 0" in text, text[-4000:]
        assert "restarting model 'policy_trainer' all its processes" in text, text[-4000:]
        assert "restarts from checkpoint iter_" in text, text[-4000:]
        # each model's rank 0 sent its weights at the start, and again after its restart
        assert text.count("sent the model") == 4, text[-4000:]
        comparison = compare_runs(tmp_path / "baseline", tmp_path / "chaos")
        assert comparison.ok, "\n".join(comparison.lines())
        assert run.killed == 0, "the run left processes in its process group"
        assert _leftovers(runtime_base) == []
    finally:
        done.set()
        for line in _leftovers(runtime_base):
            os.kill(int(line.split(":")[0]), 9)
        shutil.rmtree(runtime_base, ignore_errors=True)
