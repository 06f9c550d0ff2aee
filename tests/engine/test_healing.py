"""Self-healing (docs/self-healing.md) on the tiny torch pair of the checkpoint tests: a trainer
that is killed or hangs restarts from the last checkpoint and the run ends bit-identical to an
uninterrupted one; a reference replica comes back in place; a failure that repeats at the same
step stops the run after the policy's attempts, naming the step and its samples."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from resume_trials import GATE, Trial, assert_all_exit, assert_identical, stop  # noqa: E402

pytestmark = pytest.mark.timeout(240)


def _records(trial: Trial, kind: str) -> list[dict]:
    lines = (trial.run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def _finish(trial: Trial, proc, timeout: float = 90) -> float:
    """Let the gated trainer go on; wait for the run's end; seconds from now to its end."""
    (trial.probe / "go").write_text("go")
    started = time.monotonic()
    proc.wait(timeout)
    return time.monotonic() - started


def _assert_like_baseline(trial: Trial, baseline: Trial) -> None:
    assert_identical(trial.final_state(), baseline.final_state())
    assert trial.train_records() == baseline.train_records()  # every step exactly once
    assert_all_exit(trial.worker_pids())


def test_a_lost_trainer_restarts_from_the_checkpoint_and_ends_bit_identical(
    baseline: Trial, tmp_path: Path
) -> None:
    # a hang (SIGSTOP) is restarted the same way once noticed: test_healing_runtime.py and the
    # chaos test of the example (tests/examples/test_example_chaos.py) cover it
    how = signal.SIGKILL
    trial = Trial(tmp_path)
    # save_step_interval 5: a checkpoint after iteration 5, mid-episode, right before the gate
    env = {"HEARTBEAT_TIMEOUT": "1.5", "SAVE_STEP_INTERVAL": "5"}
    proc, log = trial.start(gate=GATE, env=env)
    try:
        trainer = trial.wait_at_gate(proc)  # iteration 5 trained, the 6th running
        os.kill(trainer, how)
        killed = time.monotonic()
        # the new trainer process passes the gate once it has loaded the checkpoint
        deadline = killed + 60
        while len(trial.events("setup")) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        back = time.monotonic() - killed
        _finish(trial, proc)
    finally:
        stop(proc)
    text = log.read_text()
    assert proc.returncode == 0, text
    assert "restarting model 'policy_trainer'" in text, text
    assert "killed by SIGKILL" in text
    assert "checkpoint of iteration 5 (episode 2 step 1, step)" in text, text
    assert "restarts from checkpoint iter_0000005" in text, text
    # recovery: setup() and the checkpoint load, after the heartbeat timeout for a hang
    assert back < 15, f"the trainer took {back:.1f} s to come back"
    _assert_like_baseline(trial, baseline)  # a mid-episode checkpoint resumes exactly
    first = [e for e in trial.events("first_step")]
    assert [e["iteration"] for e in first] == [0, 5] and first[-1]["resume"] is True
    # the new trainer's setup() already knew the checkpoint it resumes from (as ChatLearn's
    # resumed modules do)
    setups = [e for e in trial.events("setup") if e["model"] == "policy_trainer"]
    assert [(e["resume"], e["train_iteration"]) for e in setups] == [(False, 0), (True, 5)]
    (restart,) = _records(trial, "restart")
    assert restart["model"] == "policy_trainer" and restart["restarts"] == 1
    assert restart["steps_repeated"] == 0 and restart["step"] == 5
    assert trial.complete() == [8, 10, 12]  # save_keep_last 3: steps 5, 10; episodes 4, 8, 12
    assert "self-healing: 1 restart(s): policy_trainer ×1" in text


def test_a_trainer_lost_while_saving_the_final_checkpoint_restarts_and_saves_it(
    baseline: Trial, tmp_path: Path
) -> None:
    """Checkpoints every second episode of three: the run's last checkpoint (iteration 12) is
    written after the pipeline has ended, and the trainer dies writing it."""
    trial = Trial(tmp_path)
    env = {"SAVE_EPISODE_INTERVAL": "2", "KILL_AT_SAVE": "12", "TENSORBOARD": "1"}
    text = trial.run(timeout=120, env=env)
    assert "restarting model 'policy_trainer'" in text, text
    assert "restarts from checkpoint iter_0000008" in text, text
    _assert_like_baseline(trial, baseline)  # iterations 9-12 trained again, recorded once
    trial.assert_tensorboard_like_metrics()  # and shown once
    assert trial.complete() == [8, 12]
    (restart,) = _records(trial, "restart")
    assert restart["model"] == "policy_trainer" and restart["steps_repeated"] == 4


def test_a_lost_reference_replica_comes_back_in_place(baseline: Trial, tmp_path: Path) -> None:
    trial = Trial(tmp_path)
    proc, log = trial.start(gate=GATE)
    try:
        trial.wait_at_gate(proc)
        (reference,) = [e["pid"] for e in trial.events("setup") if e["model"] == "reference"]
        assert reference in [p.pid for p in psutil.Process(proc.pid).children()]
        os.kill(reference, signal.SIGKILL)
        deadline = time.monotonic() + 60
        # back: set up and primed (the run could otherwise end, its orders run elsewhere, first)
        while "replica 0 is back" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        _finish(trial, proc)
    finally:
        stop(proc)
    text = log.read_text()
    assert proc.returncode == 0, text
    assert "restarting model 'reference' replica 0" in text, text
    assert "model 'reference' replica 0 is back" in text, text
    _assert_like_baseline(trial, baseline)
    (restart,) = _records(trial, "restart")
    assert restart["model"] == "reference" and restart["replica"] == 0
    assert restart["restarts"] == 1 and restart["restart_seconds"] < 15


def _killed_in_a_collective(
    tmp_path: Path, env: dict[str, str], at: int, baseline: Trial | None = None
) -> str:
    """Run the script with the last rank of a model killing itself at ``at`` inside a
    collective; it heals and ends like ``baseline``, or like an uninterrupted run with ``env``
    when none is given. Its log."""
    trial = Trial(tmp_path / "killed")
    if baseline is None:
        baseline = Trial(tmp_path / "baseline")
        baseline.run(env=env)
    text = trial.run(90, env={**env, "KILL_RANK_AT": str(at)})  # asserts exit 0
    assert (trial.probe / "killed").exists() and "killed by SIGKILL" in text, text
    assert "stopping all actors" not in text, text
    _assert_like_baseline(trial, baseline)
    return text


def test_a_rank_that_dies_inside_a_collective_restarts_its_replica(
    baseline: Trial, tmp_path: Path
) -> None:
    # A reference replica of two processes; its last rank dies in a forward call while the
    # other is in the all-gather, which fails for it ("Connection reset by peer") before the
    # death is noticed. That error is the death's consequence, not a bug of user code: the
    # replica restarts and the run ends as one without the death. The sharded reference
    # computes what the one-process reference computes, bit for bit (each rank computes some of
    # the layer's outputs, gathered back in place), so the session's uninterrupted one-process
    # run is the one to end like (an uninterrupted sharded run of its own cost 3 processes).
    text = _killed_in_a_collective(tmp_path, {"REFERENCE_SHARDED": "1"}, at=2, baseline=baseline)
    assert "restarting model 'reference' replica 0" in text, text


def test_a_trainer_rank_that_dies_inside_a_collective_restarts_the_trainer(
    tmp_path: Path,
) -> None:
    # The same for a trainer of two data-parallel processes: its last rank dies at step 7
    # while the other is in the gradients' all-reduce. The trainer restarts from the
    # checkpoint of step 5 and the run ends as one without the death.
    env = {"TRAINER_RANKS": "2", "SAVE_STEP_INTERVAL": "5"}
    text = _killed_in_a_collective(tmp_path, env, at=7)
    assert "restarting model 'policy_trainer' all its processes" in text, text
    assert "restarts from checkpoint iter_0000005" in text, text


def test_an_error_of_user_code_stops_the_run_at_once_naming_the_step_and_samples(
    tmp_path: Path,
) -> None:
    trial = Trial(tmp_path)
    proc, log = trial.start(env={"FAIL_ITERATION": "5"})
    try:
        proc.wait(60)
    finally:
        stop(proc)
    text = log.read_text()
    assert proc.returncode not in (0, None), text
    assert "RuntimeError: a bug at iteration 5" in text, text
    # the step that raised, also when the call that ran it ran several (a fast trainer's calls
    # group the steps that are ready)
    failed = "failed at iteration 6 (train_step's iteration=5; episode 2, its step 2), samples"
    assert failed in text, text
    assert "in flight when it failed: iteration " in text, text
    assert "samples (dataset, row): (0, " in text, text
    assert "restarting" not in text, text  # user code: not retried by default
    assert_all_exit(trial.worker_pids())


def test_a_failure_at_the_same_step_stops_after_the_policys_attempts(tmp_path: Path) -> None:
    trial = Trial(tmp_path)
    started = time.monotonic()
    env = {"FAIL_ITERATION": "5", "RESTART_ON_ERROR": "1", "RESTARTS": "2"}
    proc, log = trial.start(env=env)
    try:
        proc.wait(120)
    finally:
        stop(proc)
    elapsed = time.monotonic() - started
    text = log.read_text()
    assert proc.returncode not in (0, None), text
    assert text.count("restarting model 'policy_trainer'") == 2, text
    assert "not restarted again: 2 restart(s) within 60 min already (max_restarts=2" in text
    # the step that raised, also when the call that ran it ran several (a fast trainer's calls
    # group the steps that are ready)
    failed = "failed at iteration 6 (train_step's iteration=5; episode 2, its step 2), samples"
    assert failed in text, text
    assert "in flight when it failed: iteration " in text, text
    assert "samples (dataset, row): (0, " in text, text
    # three attempts: the first run to the step, two restarts (setup() and the checkpoint load
    # each, then one step); nothing waits for a timeout in between
    setups = [e for e in trial.events("setup") if e["model"] == "policy_trainer"]
    assert len(setups) == 3
    assert elapsed < 60, f"{elapsed:.1f} s for three attempts"
    assert_all_exit(trial.worker_pids())
