"""Exact resume after SIGKILL (coordinator, trainer), SIGINT, and a corrupted checkpoint.

Each trial runs ``resume_script.py`` (a real user script with a tiny torch DPO pair, see
``torch_modules.py``) as a subprocess, interrupts it while the trainer is held at a gate
(iteration 5: after the checkpoint of episode 1, in the middle of episode 2), then runs it again
with the same output directory. The resumed run must end with the same policy and optimizer state,
bit for bit, as the uninterrupted run, and log the same metrics for every step.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from chatlearn.actors.hosts import COORDINATOR_RESTARTS_ENV_VAR
from chatlearn.engine.metrics import read_metrics
from chatlearn.engine.run_checkpoints import architecture_changes, model_args_changes

sys.path.insert(0, str(Path(__file__).parent))
from resume_trials import (  # noqa: E402
    FINAL,
    GATE,
    Trial,
    assert_all_exit,
    assert_identical,
    stop,
)

pytestmark = pytest.mark.timeout(120)


def _assert_resumed_like(trial: Trial, baseline: Trial, resumed_at: int) -> None:
    first = trial.events("first_step")[-1]
    assert first["iteration"] == resumed_at and first["resume"] is True
    assert_identical(trial.final_state(), baseline.final_state())
    # one record per step, the ones after the resume point included, equal to the baseline's
    assert trial.train_records() == baseline.train_records()


def test_uninterrupted_run_checkpoints_every_episode(baseline: Trial) -> None:
    assert baseline.complete() == [4, 8, 12]
    states = [baseline.state(f"iter_{i:07d}") for i in (4, 8, 12)]
    assert [(s.episode, s.step_in_episode, s.consumed_samples) for s in states] == [
        (1, 0, 8),
        (2, 0, 16),
        (3, 0, 24),
    ]
    assert [s.sampler["consumed_samples"] for s in states] == [8, 16, 24]
    # the last is the run's end's (a sharded trainer writes its hf_model then)
    assert [s.reason for s in states] == ["interval", "interval", "end"]
    assert states[0].training["seed"] == 7 and states[0].config["runtime"]["num_episode"] == 3
    assert [step for step, _, _ in baseline.train_records()] == list(range(1, 13))
    assert not list(baseline.checkpoints.glob(".staging-*"))


TENSORBOARD = {"TENSORBOARD": "1"}  # and its steps after the checkpoint shown once


@pytest.fixture(scope="module")
def killed_at_gate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Trial, Path]:
    """A run whose coordinator was SIGKILLed while the trainer waited at the gate (iteration
    5, after the checkpoint of iteration 4), and an untouched copy of its output directory.
    One test resumes the run in place, another resumes the copy from elsewhere."""
    trial = Trial(tmp_path_factory.mktemp("killed_at_gate"))
    trial.kill_at_gate(env=TENSORBOARD)
    untouched = trial.base / "untouched"
    shutil.copytree(trial.output, untouched)
    return trial, untouched


def test_coordinator_sigkill_then_resume_is_bit_identical(
    baseline: Trial, killed_at_gate: tuple[Trial, Path]
):
    trial, _ = killed_at_gate
    assert trial.complete() == [4]
    trial.run(env=TENSORBOARD)
    _assert_resumed_like(trial, baseline, resumed_at=4)
    trial.assert_tensorboard_like_metrics()


def test_a_run_started_over_without_a_checkpoint_records_every_step_once(
    baseline: Trial, tmp_path: Path
):
    """The coordinator dies before the first checkpoint (as `chatlearn launch` then restarts
    it): the next start trains from iteration 0, and the records of the first one move to
    metrics.superseded.jsonl instead of standing twice in metrics.jsonl."""
    trial = Trial(tmp_path)
    every_second_episode = {"SAVE_EPISODE_INTERVAL": "2"}  # the first checkpoint: iteration 8

    def episode_1_recorded() -> None:  # its records, written while episode 2 waits at the gate
        deadline = time.monotonic() + 10
        while len(trial.train_records()) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)

    trial.kill_at_gate(env=every_second_episode, before=episode_1_recorded)
    assert trial.complete() == [] and len(trial.train_records()) >= 4
    text = trial.run(env=every_second_episode)
    assert "held records of an earlier start without a checkpoint to resume from" in text
    assert_identical(trial.final_state(), baseline.final_state())
    assert trial.train_records() == baseline.train_records()
    superseded = (trial.run_dir / "metrics.superseded.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in superseded if '"kind": "train"' in line]
    assert steps[:4] == [1, 2, 3, 4]


def test_a_new_run_in_a_used_directory_sets_the_earlier_runs_checkpoints_aside(
    baseline: Trial, tmp_path: Path
) -> None:
    # enable_resume_training: false over a finished run: retention counted the old run's
    # higher iterations as the newest (removing the new run's own once written), and a later
    # default run resumed the old run's newest checkpoint, metrics.jsonl cut to its offset
    trial = Trial(tmp_path)
    shutil.copytree(baseline.output, trial.output)
    text = trial.run(env={"RESUME": "0", "NUM_EPISODE": "1"})
    (aside,) = trial.checkpoints.glob("superseded-*")
    assert (
        f"checkpoints of an earlier run in {trial.checkpoints} are not this run's: moved to "
        f"{aside}" in text
    ), text
    assert "held records of an earlier run (its checkpoints set aside)" in text, text
    assert sorted(p.name for p in aside.iterdir()) == ["iter_0000004", "iter_0000008", FINAL]
    assert trial.complete() == [4]
    assert [step for step, _, _ in trial.train_records()] == [1, 2, 3, 4]
    trial.run(env={"NUM_EPISODE": "2"})  # resumes the new run
    assert trial.events("first_step")[-1]["iteration"] == 4 and trial.complete() == [4, 8]


def test_a_run_directory_copied_elsewhere_resumes_with_every_step_once(
    baseline: Trial, killed_at_gate: tuple[Trial, Path], tmp_path: Path
):
    """metrics.jsonl is cut back to the checkpoint even when the output directory is reached
    by another path than the one the checkpoint recorded."""
    copy = Trial(tmp_path / "copy")
    shutil.copytree(killed_at_gate[1], copy.output)  # as the killed run left it
    metrics = copy.run_dir / "metrics.jsonl"
    # a record written after the checkpoint of iteration 4 (when one was: it depends on how
    # the trainer's calls grouped the steps before the gate)
    record = [r for r in map(json.loads, metrics.read_text().splitlines()) if r["kind"] == "train"]
    with metrics.open("a") as f:
        f.write(json.dumps({**record[-1], "step": 5}) + "\n")
    assert [step for step, _, _ in copy.train_records()][-1] == 5
    text = copy.run(env=TENSORBOARD)
    assert "metrics.jsonl rewound to the checkpoint" in text, text
    _assert_resumed_like(copy, baseline, resumed_at=4)


def test_a_resume_with_changed_settings_says_which(baseline: Trial, tmp_path: Path):
    """num_episode sets the length of a learning-rate schedule over the whole run; model
    arguments may be held by the checkpoint (optimizer state) or not (beta): both warned."""
    trial = Trial(tmp_path)
    shutil.copytree(baseline.output, trial.output)  # its checkpoints, written with 3 episodes
    text = trial.run(env={"NUM_EPISODE": "4"})
    assert "with changed training settings" in text and "num_episode: saved 3, now 4" in text
    assert trial.complete()[-1] == 16
    assert "with other data" not in text


def test_a_resume_on_other_rows_of_the_same_number_is_said(baseline: Trial, tmp_path: Path) -> None:
    # another data file with as many rows: the sampler only compared the number of rows
    trial = Trial(tmp_path)
    shutil.copytree(baseline.output, trial.output)
    text = trial.run(env={"NUM_EPISODE": "4", "DATA_OFFSET": "100"})
    (line,) = [line for line in text.splitlines() if "with other data" in line]
    assert "(runtime.data_path: the rows of the dataset differ, their number is the same)" in line
    assert trial.complete() == [8, 12, 16]  # save_keep_last 3


@pytest.mark.parametrize(
    ("env", "line"),
    [
        (
            {"LOAD_ITER": "7"},
            "runtime.load_data_checkpoint_iteration: runtime.load_data_checkpoint_iteration is 7",
        ),
        (
            {"LOAD_ITER": "4", "SAMPLE_PER_EPISODE": "12"},
            "runtime.sample_per_episode: the checkpoint",
        ),
    ],
)
def test_a_resume_that_cannot_be_is_one_config_line(
    baseline: Trial, tmp_path: Path, env: dict[str, str], line: str
):
    trial = Trial(tmp_path)
    shutil.copytree(baseline.output, trial.output)
    code, text = trial.run_to_end(env=env)
    assert code == 2, text
    assert "Traceback" not in text and line in text, text


def test_model_args_changes_name_each_changed_key() -> None:
    saved = {"models": {"policy": {"model_args": {"beta": 0.1, "lora": {"r": 8}, "lr": 1}}}}
    current = {"models": {"policy": {"model_args": {"beta": 0.5, "lora": {"r": 8, "alpha": 2}}}}}
    assert model_args_changes(saved, current) == [
        "models.policy.model_args.beta: saved 0.1, now 0.5",
        "models.policy.model_args.lora.alpha: saved None, now 2",
        "models.policy.model_args.lr: saved 1, now None",
    ]
    assert model_args_changes(saved, saved) == []


def test_architecture_changes_are_the_trainers_shape_settings() -> None:
    def config(path: str | None, hidden: int, beta: float) -> dict:
        args = {"model_path": path, "model_config": {"hidden_size": hidden}, "beta": beta}
        return {"models": {"policy": {"model_args": args}, "reference": {"model_args": args}}}

    saved, current = config("/a", 128, 0.1), config("/b", 64, 0.2)
    assert architecture_changes(saved, current, "policy") == [
        ("models.policy.model_args.model_config.hidden_size", 128, 64),
    ]
    # a moved directory, another mount: warned as a changed argument, refused only if the
    # checkpoint then does not load
    assert architecture_changes(saved, config("/b", 128, 0.1), "policy") == []
    assert architecture_changes(saved, config("/a", 128, 0.2), "policy") == []


def test_a_resume_under_another_architecture_is_one_config_line(tmp_path: Path) -> None:
    # The trainer's load_checkpoint failed with a 122-line "Error(s) in loading state_dict"
    # traceback after the actors had started; an architecture setting is now compared with
    # the checkpoint's config before loading, and any other model argument the trainer cannot
    # load under is named after its load failed
    trial = Trial(tmp_path)
    trial.run(env={"NUM_EPISODE": "1", "TRAINER_HIDDEN_SIZE": "3", "TRAINER_WIDTH": "3"})
    for env, key in (
        ({"TRAINER_HIDDEN_SIZE": "4", "TRAINER_WIDTH": "3"}, "model_config.hidden_size"),
        ({"TRAINER_HIDDEN_SIZE": "3", "TRAINER_WIDTH": "4"}, "width"),
    ):
        setups = len(trial.events("setup"))
        code, text = trial.run_to_end(env={"NUM_EPISODE": "2", **env})
        assert code == 2, text
        assert "Traceback" not in text, text
        last = text.splitlines()[-1]
        assert f"models.policy_trainer.model_args.{key}: the checkpoint iter_0000004" in last
        assert f"{key}: saved 3, now 4" in last and "fix: resume with " in last, last
        assert "enable_resume_training: false" in last, last
        if key != "width":  # an architecture setting: refused before any model started
            assert len(trial.events("setup")) == setups


def test_trainer_sigkill_is_a_clear_error_and_resume_is_bit_identical(
    baseline: Trial, tmp_path: Path
) -> None:
    trial = Trial(tmp_path)
    proc, log = trial.start(gate=GATE, env={"RESTARTS": "0"})  # no self-healing
    try:
        trainer = trial.wait_at_gate(proc)
        assert trainer in [p.pid for p in psutil.Process(proc.pid).children()]
        os.kill(trainer, signal.SIGKILL)
        killed = time.monotonic()
        proc.wait(20)
        elapsed = time.monotonic() - killed
    finally:
        stop(proc)
    text = log.read_text()
    assert proc.returncode not in (0, None), text
    assert elapsed < 10, f"the coordinator took {elapsed:.1f} s to fail"
    assert "ActorDeadError" in text and "policy_trainer" in text, text
    assert_all_exit(trial.worker_pids())
    assert trial.complete() == [4]
    trial.run()
    _assert_resumed_like(trial, baseline, resumed_at=4)


def _open_the_gate_once_said(
    trial: Trial, proc: subprocess.Popen[bytes], log: Path, said: str
) -> None:
    """Let the step held at the gate go once the run's log says `said` (the signal must be
    seen while that step still runs: 20 s at most), then wait for the run's end."""
    deadline = time.monotonic() + 20
    while said not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    (trial.probe / "go").touch()
    proc.wait(40)


@pytest.mark.parametrize("times", [1, 2])
def test_sigint_finishes_running_steps_saves_and_exits_130(
    baseline: Trial, tmp_path: Path, times: int
):
    """Twice: a signal to the process group under `chatlearn launch` arrives directly and
    forwarded by the supervisor, a few milliseconds apart: still one graceful stop."""
    trial = Trial(tmp_path)
    # the supervisor's variable: a quick repeat is the same request only under chatlearn launch
    launched = {COORDINATOR_RESTARTS_ENV_VAR: "0"} if times == 2 else {}
    proc, log = trial.start(gate=GATE, env=launched)
    try:
        trial.wait_at_gate(proc)
        for _ in range(times):
            os.kill(proc.pid, signal.SIGINT)
            time.sleep(0.01)
        _open_the_gate_once_said(trial, proc, log, "SIGINT received")
    finally:
        stop(proc)
    text = log.read_text()
    assert proc.returncode == 130, text
    assert "second signal" not in text
    assert ("SIGINT received again within 1 s: the same stop request" in text) == (times == 2)
    assert_all_exit(trial.worker_pids())
    # The step at the gate and those sent with it or behind it finished; no new one was sent.
    # How many were sent depends on how the trainer's calls grouped the steps that were ready
    # (the log names them): the one behind the gate's (7), or a call of two (7 and 8).
    found = re.search(
        r"no new training step is sent; iterations? (?:\d+\.\.)?(\d+) in flight", text
    )
    assert found, text
    last = int(found.group(1))
    assert last in (7, 8), text
    assert trial.complete() == [4, last]
    saved = trial.state(f"iter_{last:07d}")
    if last == 7:
        assert (saved.reason, saved.episode, saved.step_in_episode) == ("signal", 1, 3)
        assert saved.consumed_samples == 8  # the episode in progress is drawn again on resume
    else:  # the episode's last step: its end-of-episode checkpoint
        assert (saved.episode, saved.step_in_episode, saved.consumed_samples) == (2, 0, 16)
    trial.run()
    _assert_resumed_like(trial, baseline, resumed_at=last)


@pytest.mark.parametrize("who", ["every process", "the trainer"])
def test_sigterm_from_outside_the_run_to_its_actors_stops_it_gracefully(
    tmp_path: Path, who: str
) -> None:
    """A scheduler or service manager stopping a job signals every process of it (SLURM at a
    scancel, a preemption or the time limit; systemd at a stop). The actors left at once on
    SIGTERM, and the run's graceful stop with them: "an actor exited during the stop, so no
    final checkpoint was written". An actor now hands a SIGTERM from outside the run to the
    coordinator, which stops the run as on its own: the running steps finish, it saves, exit
    143. One actor alone signalled stops the run the same way."""
    trial = Trial(tmp_path)
    proc, log = trial.start(gate=GATE)
    try:
        trainer = trial.wait_at_gate(proc)
        workers = trial.worker_pids()
        assert trainer in workers and len(workers) == 2
        for pid in [proc.pid, *workers] if who == "every process" else [trainer]:
            os.kill(pid, signal.SIGTERM)
        _open_the_gate_once_said(trial, proc, log, "SIGTERM received")
    finally:
        stop(proc)
    text = log.read_text()
    assert proc.returncode == 143, text
    assert "second signal" not in text and "no final checkpoint" not in text, text
    if who == "the trainer":
        said = f"SIGTERM received by actor policy_trainer replica 0 rank 0 (pid {trainer} on "
        assert said in text, text
    assert_all_exit(trial.worker_pids())
    complete = trial.complete()
    assert complete[0] == 4 and len(complete) == 2 and complete[1] in (7, 8), text
    saved = trial.state(f"iter_{complete[1]:07d}")
    assert saved.reason in ("signal", "interval"), saved.reason  # interval: an episode's end


def test_a_trainer_lost_during_a_graceful_stop_is_not_restarted(tmp_path: Path) -> None:
    """A trainer lost once a graceful stop is under way (killed, or a second SIGTERM to it) was
    restarted by self-healing: a whole setup and a checkpoint load, only to rewind to the
    checkpoint the run already had and stop there (past a scheduler's grace for a large model).
    The stop now ends at once, exit 143, the newest checkpoint the one it had."""
    trial = Trial(tmp_path)
    proc, log = trial.start(gate=GATE)  # self-healing on (the script's default)
    try:
        trainer = trial.wait_at_gate(proc)
        os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while "SIGTERM received" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(trainer, signal.SIGKILL)
        proc.wait(30)
    finally:
        stop(proc)
    text = log.read_text()
    assert proc.returncode == 143, text
    assert "restarting model 'policy_trainer'" not in text, text
    assert "an actor exited during the stop, so no final checkpoint was written" in text, text
    assert_all_exit(trial.worker_pids())
    assert trial.complete() == [4]


def test_a_full_disk_at_a_save_is_one_line_and_the_rerun_resumes(
    baseline: Trial, tmp_path: Path
) -> None:
    """The trainer's save meets a full disk at iteration 8: one line naming the checkpoint
    directory, the OS's words and the checkpoint a rerun resumes from (a 50-120 line traceback
    before), exit 2, the previous checkpoint intact; the rerun ends like the baseline."""
    trial = Trial(tmp_path)
    code, text = trial.run_to_end(env={"DISK_FULL_AT_SAVE": "8"})
    assert code == 2, text
    assert "Traceback" not in text, text
    # what the script ended with (the log's "stopping all actors" line may come after it)
    head = f"{trial.checkpoints}: writing the checkpoint of iteration 8 failed: "
    lines = [line for line in text.splitlines() if line.startswith(head)]
    assert len(lines) == 1, text  # the run's output when it is not so (seen once under load)
    (line,) = lines
    assert "No space left on device (" in line and "MiB free of" in line, line
    assert "it resumes from iter_0000004" in line, line
    assert trial.complete() == [4] and not list(trial.checkpoints.glob(".staging-*"))
    trial.run()
    _assert_resumed_like(trial, baseline, resumed_at=4)


def test_corrupted_newest_checkpoint_falls_back_with_a_warning(baseline: Trial, tmp_path: Path):
    trial = Trial(tmp_path)
    shutil.copytree(baseline.output, trial.output)
    model = trial.checkpoints / FINAL / "policy_trainer" / "rank_0" / "model.pt"
    with model.open("r+b") as f:
        f.truncate(model.stat().st_size // 2)
    text = trial.run()
    warnings = [line for line in text.splitlines() if "broken" in line]
    assert warnings and str(trial.checkpoints / FINAL) in warnings[0], text
    assert "falling back" in warnings[0]
    first = trial.events("first_step")[-1]
    assert first["iteration"] == 8 and first["resume"] is True
    assert trial.complete() == [4, 8, 12]  # the broken one was written again
    assert_identical(trial.final_state(), baseline.final_state())


def test_step_checkpoints_alone_still_save_the_end_of_the_run(tmp_path: Path) -> None:
    # save_step_interval without save_episode_interval: the run's last steps were not saved
    # (12 iterations trained, the newest checkpoint 10), nor were they on SIGTERM
    trial = Trial(tmp_path)
    text = trial.run(env={"SAVE_EPISODE_INTERVAL": "0", "SAVE_STEP_INTERVAL": "5"})
    assert trial.complete() == [5, 10, 12], text
    assert "checkpoint of iteration 12 (end of episode 3, end)" in text, text


@pytest.fixture(scope="module")
def started_from_4(baseline: Trial, tmp_path_factory: pytest.TempPathFactory) -> tuple[Trial, str]:
    """A copy of the finished baseline run, run again from its iteration 4 for 2 episodes
    (load_data_checkpoint_iteration); and its output. Tests run on copies of it."""
    trial = Trial(tmp_path_factory.mktemp("started_from_4"))
    shutil.copytree(baseline.output, trial.output)
    return trial, trial.run(env={"LOAD_ITER": "4", "NUM_EPISODE": "2"})


def _copy_of(trial: Trial, tmp_path: Path) -> Trial:
    copy = Trial(tmp_path)
    shutil.copytree(trial.output, copy.output)
    return copy


def test_a_resume_from_an_older_checkpoint_sets_the_newer_ones_aside(
    baseline: Trial, started_from_4: tuple[Trial, str], tmp_path: Path
) -> None:
    # Resuming from iteration 4 of a finished run replaces its steps 5-12. Its checkpoints 8
    # and 12 used to stay: pruning counted them as the newest (removing the new run's own),
    # and the next resume jumped back to iteration 12 of the replaced run, "every episode
    # trained".
    started, text = started_from_4
    assert "older than the run's newest checkpoints" in text, text
    (aside,) = started.checkpoints.glob("superseded-*")
    assert sorted(p.name for p in aside.iterdir()) == ["iter_0000008", "iter_0000012"]
    assert started.complete() == [4, 8]  # the new run's 8, not the replaced one's
    trial = _copy_of(started, tmp_path)
    trial.run(env={"NUM_EPISODE": "3"})  # resumes the new run, from its 8
    assert trial.events("first_step")[-1]["iteration"] == 8
    assert trial.complete() == [4, 8, 12]
    assert_identical(trial.final_state(), baseline.final_state())


def test_a_resume_that_fails_to_load_leaves_the_newer_checkpoints_and_metrics_alone(
    baseline: Trial, tmp_path: Path
) -> None:
    # The newer checkpoints were moved aside and metrics.jsonl rewound before the trainer
    # loaded the checkpoint: after a failed load, the corrected rerun resumed from the older
    # checkpoint with the newer ones hidden in superseded-*
    trial = Trial(tmp_path)
    shutil.copytree(baseline.output, trial.output)
    metrics = (trial.run_dir / "metrics.jsonl").read_bytes()
    code, text = trial.run_to_end(env={"LOAD_ITER": "4", "TRAINER_WIDTH": "3"})
    assert code != 0, text
    assert trial.complete() == [4, 8, 12] and not list(trial.checkpoints.glob("superseded-*"))
    assert (trial.run_dir / "metrics.jsonl").read_bytes() == metrics
    assert not (trial.run_dir / "metrics.superseded.jsonl").exists()


def test_a_restart_of_a_run_started_from_an_iteration_continues_it(
    baseline: Trial, started_from_4: tuple[Trial, str], tmp_path: Path
) -> None:
    # load_data_checkpoint_iteration was applied again when chatlearn launch restarted the
    # coordinator: back to iteration 4, the run's own checkpoint 8 moved into a second
    # superseded-* directory
    trial = _copy_of(started_from_4[0], tmp_path)
    # the third restart: the two before it were killed before they wrote a record
    restarted = {"LOAD_ITER": "4", "NUM_EPISODE": "3", COORDINATOR_RESTARTS_ENV_VAR: "3"}
    text = trial.run(env=restarted)
    records = read_metrics(trial.run_dir / "metrics.jsonl")
    (record,) = [r for r in records if r["kind"] == "restart"]
    assert (record["model"], record["attempt"], record["restarts"]) == ("coordinator", 3, 3)
    assert "3 before it (coordinator restarts included)" in text, text
    assert "load_data_checkpoint_iteration is 4, and the run started from it" in text, text
    assert trial.events("first_step")[-1]["iteration"] == 8
    (aside,) = trial.checkpoints.glob("superseded-*")  # the replaced run's 8 and 12 only
    assert sorted(p.name for p in aside.iterdir()) == ["iter_0000008", "iter_0000012"]
    assert trial.complete() == [4, 8, 12] and trial.state(FINAL).started_from == 4
    assert_identical(trial.final_state(), baseline.final_state())


def test_a_mid_episode_resume_with_another_plan_of_its_steps_is_refused(tmp_path: Path) -> None:
    # Resumed mid-episode, the pipeline skips the checkpoint's number of steps of the episode's
    # plan as this run builds it: with another global batch size those are other samples (8
    # instead of 4 here: the episode's samples 5-8 were never trained); with another number of
    # reference replicas, whose shares make the order samples reach the trainer in, one step's
    # samples were trained twice and another's never; both without a word
    trial = Trial(tmp_path)
    trial.run(env={"NUM_EPISODE": "2", "SAVE_STEP_INTERVAL": "5"})  # 5: episode 2, step 1
    code, text = trial.run_to_end(env={"LOAD_ITER": "5", "TRAIN_GLOBAL_BATCH_SIZE": "8"})
    assert code == 2, text
    last = text.splitlines()[-1]
    assert "runtime.train_global_batch_size: the checkpoint iter_0000005 is in the" in last, last
    assert "train_global_batch_size 4 (now 8)" in last, last
    assert "fix: resume with train_global_batch_size: 4" in last and "Traceback" not in text
    assert "with changed training settings" not in text  # a refusal is not preceded by a warning
    assert (trial.checkpoints / "iter_0000008").is_dir()  # the refused run moved nothing aside
    setups = len(trial.events("setup"))
    code, text = trial.run_to_end(env={"LOAD_ITER": "5", "REFERENCE_REPLICAS": "2"})
    assert code == 2, text
    last = text.splitlines()[-1]
    assert "models.reference: the checkpoint iter_0000005 is in the middle" in last, last
    assert "written with 1 reference replica(s); this run has 2" in last, last
    assert len(trial.events("setup")) == setups  # refused before any model started
    # at an episode's end the number of replicas may change, and the change is said
    text = trial.run(env={"LOAD_ITER": "8", "NUM_EPISODE": "3", "REFERENCE_REPLICAS": "2"})
    assert "reference_replicas: saved 1, now 2" in text, text
    # a third pass over the episode leaves its first pass, and so its step 1, as it was
    text = trial.run(env={"LOAD_ITER": "5", "NUM_EPISODE": "2", "NUM_TRAINING_EPOCH": "3"})
    assert "num_training_epoch: saved 2, now 3" in text, text
    assert trial.events("first_step")[-1]["iteration"] == 5


def test_metrics_shorter_than_the_checkpoint_recorded_is_said_and_stays_valid_jsonl(
    baseline: Trial, tmp_path: Path
) -> None:
    # After a machine crash metrics.jsonl may hold less than its checkpoint recorded (it was
    # flushed, never synced) and end in half a line; the resumed run glued its records onto it
    trial = Trial(tmp_path)
    shutil.copytree(baseline.output, trial.output)
    metrics = trial.run_dir / "metrics.jsonl"
    recorded = trial.state(FINAL).metrics["size"]
    data = metrics.read_bytes()[: recorded - 40]
    assert not data.endswith(b"\n")
    metrics.write_bytes(data)
    text = trial.run()
    assert "bytes shorter than the checkpoint recorded" in text, text
    lines = metrics.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line whole
    assert records[-1]["kind"] == "resume"
    torn = (trial.run_dir / "metrics.superseded.jsonl").read_text().splitlines()
    assert data.decode().endswith(torn[-1])


def test_a_checkpoint_of_another_trainer_layout_is_one_line_naming_both(
    baseline: Trial, tmp_path: Path
) -> None:
    # written by one trainer process, resumed with two: the second rank finds no directory of
    # its own, which surfaced as a 70-line traceback from the trainer after the actors started
    trial = Trial(tmp_path)
    shutil.copytree(baseline.output, trial.output)
    code, text = trial.run_to_end(env={"NUM_EPISODE": "4", "TRAINER_RANKS": "2"})
    assert code == 2, text
    last = text.splitlines()[-1]
    assert "models.policy_trainer: the checkpoint iter_0000012 was written by another" in last
    assert "(1 process(es) then, 2 now)" in last and "fix: resume with the layout" in last, last
    assert "Traceback" not in text, text
