"""Helpers of the checkpoint trials: run ``resume_script.py`` on an output directory, hold it at
the trainer's gate, interrupt it, and compare what it left with an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from chatlearn.engine.checkpoint import COORDINATOR, CheckpointManager, CoordinatorState
from chatlearn.engine.metrics import read_metrics

SCRIPT = Path(__file__).resolve().parent / "resume_script.py"
GATE = 5  # trainer iteration held at the gate: episode 2 (iterations 4..7), its second step
FINAL = "iter_0000012"


class Trial:
    """One output directory and the script runs on it."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.output = base / "out"
        self.run_dir = self.output / "CHATLEARN"
        self.checkpoints = self.run_dir / "checkpoints"
        self.probe = base / "probe"
        self.probe.mkdir(parents=True, exist_ok=True)
        self.num_runs = 0

    def start(
        self, gate: int | None = None, env: dict[str, str] | None = None
    ) -> tuple[subprocess.Popen[bytes], Path]:
        self.num_runs += 1
        log = self.base / f"run{self.num_runs}.log"
        for name in ("waiting", "go"):
            (self.probe / name).unlink(missing_ok=True)
        args = [sys.executable, str(SCRIPT), str(self.output), str(self.probe)]
        with log.open("wb") as f:
            proc = subprocess.Popen(
                [*args, *([str(gate)] if gate is not None else [])],
                stdout=f,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
            )
        return proc, log

    def run(self, timeout: float = 60, env: dict[str, str] | None = None) -> str:
        """One run to its end, which must succeed; its output."""
        code, text = self.run_to_end(timeout, env)
        assert code == 0, text
        return text

    def run_to_end(
        self, timeout: float = 60, env: dict[str, str] | None = None
    ) -> tuple[int | None, str]:
        """One run to its end: its exit code and output."""
        proc, log = self.start(env=env)
        try:
            proc.wait(timeout)
        finally:
            stop(proc)
        return proc.returncode, log.read_text()

    def wait_at_gate(self, proc: subprocess.Popen[bytes], timeout: float = 45) -> int:
        """The trainer's pid once it waits at the gate."""
        deadline = time.monotonic() + timeout
        waiting = self.probe / "waiting"
        while not waiting.exists():
            assert proc.poll() is None, f"the run ended (code {proc.returncode}) before the gate"
            assert time.monotonic() < deadline, "the trainer never reached the gate"
            time.sleep(0.05)
        time.sleep(0.05)  # the pid is written before the file is closed
        return int(waiting.read_text())

    def kill_at_gate(
        self, env: dict[str, str] | None = None, before: Callable[[], None] | None = None
    ) -> None:
        """Run until the trainer waits at the gate, then SIGKILL the coordinator (after
        ``before()``, if given) and wait for it and its actors to end."""
        proc, _ = self.start(gate=GATE, env=env)
        try:
            self.wait_at_gate(proc)
            if before is not None:
                before()
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        finally:
            stop(proc)
        assert_all_exit(self.worker_pids())

    def events(self, event: str) -> list[dict[str, Any]]:
        lines = (self.probe / "events.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["event"] == event]

    def worker_pids(self) -> list[int]:
        return [r["pid"] for r in self.events("setup")]

    def final_state(self) -> dict[str, Any]:
        rank = self.checkpoints / FINAL / "policy_trainer" / "rank_0"
        return {n: torch.load(rank / f"{n}.pt", weights_only=True) for n in ("model", "optimizer")}

    def train_records(self) -> list[tuple[int, float, float]]:
        records = read_metrics(self.run_dir / "metrics.jsonl")
        return [
            (r["step"], r["loss"], r["rewards/margins"]) for r in records if r["kind"] == "train"
        ]

    def assert_tensorboard_like_metrics(self) -> None:
        """TensorBoard shows each step's loss once, the one metrics.jsonl holds."""
        shown = tensorboard_scalars(self.run_dir / "tensorboard", "train/loss")
        records = [(step, loss) for step, loss, _ in self.train_records()]
        assert [step for step, _ in shown] == [step for step, _ in records]
        assert [value for _, value in shown] == pytest.approx([loss for _, loss in records])

    def state(self, name: str) -> CoordinatorState:
        return CoordinatorState.from_json((self.checkpoints / name / COORDINATOR).read_text())

    def complete(self) -> list[int]:
        found = CheckpointManager(self.checkpoints).scan(verify=True)
        return [c.iteration for c in found if c.complete]


def tensorboard_scalars(directory: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a tag as TensorBoard shows it: its reader applies the restart markers
    (the purge of orphaned events) of the directory's files, read in name order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    accumulator.Reload()
    return [(e.step, e.value) for e in accumulator.Scalars(tag)]


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def assert_all_exit(pids: list[int], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in pids if alive(p)], f"processes left: {[p for p in pids if alive(p)]}"


def assert_identical(a: Any, b: Any, where: str = "state") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys differ"
        for key in a:
            assert_identical(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"
