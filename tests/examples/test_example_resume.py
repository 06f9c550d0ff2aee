"""The DPO example killed with SIGKILL after a checkpoint and started again: it resumes, and ends
with the same policy weights, bit for bit, and the same metrics as an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from chatlearn.engine.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["-m", "examples.dpo.train_dpo", "-c", "examples/dpo/dpo.yaml"]
# 4 episodes of 4 steps, a checkpoint after each
SETTINGS = {
    "NUM_EPISODE": "4",
    "SAMPLE_PER_EPISODE": "128",
    "SAVE_EPISODE_INTERVAL": "1",
    "PYTHONPATH": str(ROOT),
}
FINAL = "iter_0000016"

pytestmark = pytest.mark.timeout(300)


def _start(output: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, **SETTINGS, "OUTPUT_DIR": str(output)}
    with (output.parent / f"{output.name}-{time.monotonic_ns()}.log").open("wb") as log:
        return subprocess.Popen(
            [sys.executable, *ARGS], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )


def _finish(proc: subprocess.Popen[bytes], timeout: float = 200) -> int:
    try:
        return proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    (path,) = checkpoint.glob("policy_trainer/rank_0/model.pt")
    return torch.load(path, map_location="cpu", weights_only=True)


def _train_losses(run_dir: Path) -> dict[int, float]:
    # a resumed run appends to the file: the last record of a step is the one that counts
    return {
        r["step"]: r["loss"]
        for r in read_metrics(run_dir / "metrics.jsonl")
        if r["kind"] == "train"
    }


def test_sigkill_after_a_checkpoint_then_resume_is_bit_identical(tmp_path: Path) -> None:
    baseline = tmp_path / "baseline"
    assert _finish(_start(baseline)) == 0
    expected = baseline / "dpo_example" / "checkpoints" / FINAL

    killed = tmp_path / "killed"
    checkpoints = killed / "dpo_example" / "checkpoints"
    proc = _start(killed)
    try:
        deadline = time.monotonic() + 150
        while not (checkpoints / "iter_0000004").is_dir():  # committed atomically: complete
            assert proc.poll() is None and time.monotonic() < deadline, "no first checkpoint"
            time.sleep(0.01)
        children = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
        psutil.wait_procs(children, timeout=10)  # actors follow their coordinator
        assert not any(child.is_running() for child in children)
    finally:
        _finish(proc, timeout=1)
    assert not (checkpoints / FINAL).exists(), "the run ended before it was killed"

    assert _finish(_start(killed)) == 0
    resumed = checkpoints / FINAL
    expected_weights, resumed_weights = _weights(expected), _weights(resumed)
    assert expected_weights.keys() == resumed_weights.keys()
    for name, tensor in expected_weights.items():
        assert torch.equal(tensor, resumed_weights[name]), name
    assert _train_losses(killed / "dpo_example") == _train_losses(baseline / "dpo_example")
