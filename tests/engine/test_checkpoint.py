"""Checkpoints on disk (atomic commit, verification, fallback, retention), TorchModule's default
save/load with RNG states, and the ``chatlearn inspect`` command. No processes here."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import chatlearn
from chatlearn.cli import main as cli
from chatlearn.config import ConfigError, reset_args
from chatlearn.engine.checkpoint import (
    COORDINATOR,
    MANIFEST,
    CheckpointManager,
    CoordinatorState,
    rewind_metrics,
)
from chatlearn.engine.run_checkpoints import find_checkpoint, started_from
from chatlearn.engine.run_lock import RunLock

sys.path.insert(0, str(Path(__file__).parent))
from torch_modules import TinyTrainer  # noqa: E402


def _state(iteration: int, **extra) -> CoordinatorState:
    episode, step = divmod(iteration, 4)
    return CoordinatorState(
        iteration=iteration,
        episode=episode,
        step_in_episode=step,
        consumed_samples=8 * episode,
        sampler={"version": 1, "consumed_samples": 8 * episode},
        training={"seed": 1},
        trainer={"model": "policy_trainer"},
        **extra,
    )


def _save(manager: CheckpointManager, iteration: int, payload: bytes = b"weights", **extra) -> Path:
    staging = manager.begin(iteration)
    rank = staging / "policy_trainer" / "rank_0"
    rank.mkdir(parents=True)
    (rank / "model.pt").write_bytes(payload * 100)
    return manager.commit(staging, _state(iteration, **extra))


def test_commit_writes_manifest_last_and_renames(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "ckpt")
    path = _save(manager, 4)
    assert path == tmp_path / "ckpt" / "iter_0000004"
    manifest = json.loads((path / MANIFEST).read_text())
    assert set(manifest["files"]) == {COORDINATOR, "policy_trainer/rank_0/model.pt"}
    assert manifest["files"]["policy_trainer/rank_0/model.pt"]["size"] == 700
    assert not list((tmp_path / "ckpt").glob(".staging-*"))
    (info,) = manager.scan(verify=True)
    assert info.complete and info.state is not None and info.state.iteration == 4


def test_unfinished_saves_are_never_resumed_from_and_are_cleaned(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    _save(manager, 4)
    unfinished = manager.begin(8)  # a writer that died before its commit
    (unfinished / "policy_trainer").mkdir()
    (tmp_path / "iter_0000012").mkdir()  # a final name without a manifest: broken
    assert [c.iteration for c in manager.scan()] == [4, 12]
    info = manager.find_resume()
    assert info is not None and info.iteration == 4
    assert manager.staging() == [unfinished]
    manager.remove_stale_staging()  # our own pid's leftovers go too
    assert manager.staging() == []


def test_truncated_newest_falls_back_with_a_warning_naming_it(tmp_path, caplog) -> None:
    manager = CheckpointManager(tmp_path)
    for iteration in (4, 8):
        _save(manager, iteration)
    model = tmp_path / "iter_0000008" / "policy_trainer" / "rank_0" / "model.pt"
    model.write_bytes(model.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="chatlearn.engine"):
        info = manager.find_resume()
    assert info is not None and info.iteration == 4
    assert any(str(tmp_path / "iter_0000008") in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="is broken"):
        manager.find_resume(8)
    with pytest.raises(ValueError, match=r"no checkpoint .*iter_0000006.*\[4, 8\]"):
        manager.find_resume(6)


def test_same_size_corruption_is_caught_by_the_hash(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    _save(manager, 4)
    _save(manager, 8)
    model = tmp_path / "iter_0000008" / "policy_trainer" / "rank_0" / "model.pt"
    model.write_bytes(b"x" * model.stat().st_size)
    assert manager.scan(verify=False)[-1].complete  # sizes alone cannot tell
    assert "sha256" in manager.scan(verify=True)[-1].problem
    info = manager.find_resume()
    assert info is not None and info.iteration == 4


def test_keep_last_prunes_old_checkpoints_and_a_resave_replaces(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=2)
    for iteration in (4, 8, 12):
        _save(manager, iteration)
    assert [c.iteration for c in manager.scan()] == [8, 12]
    _save(manager, 12, payload=b"other")
    (latest,) = [c for c in manager.scan(verify=True) if c.iteration == 12]
    assert latest.complete
    assert (latest.path / "policy_trainer/rank_0/model.pt").read_bytes() == b"other" * 100


def test_checkpoints_set_aside_take_their_exports_along(tmp_path: Path) -> None:
    # chatlearn export writes hf/iter_* beside the checkpoint root: a checkpoint set aside
    # (a start from an older one, or from the beginning) left its export there, which then
    # stood for the new run's checkpoint of that iteration (chatlearn inspect's HF column)
    manager = CheckpointManager(tmp_path / "checkpoints")
    for iteration in (4, 8):
        _save(manager, iteration)
    for name in ("iter_0000004", "iter_0000008"):
        (tmp_path / "hf" / name).mkdir(parents=True)
        (tmp_path / "hf" / name / "config.json").write_text("{}")
    aside = manager.set_aside_newer(4)
    assert aside is not None
    assert [p.name for p in aside.iterdir()] == ["iter_0000008"]
    assert (tmp_path / "hf" / aside.name / "iter_0000008" / "config.json").is_file()
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["iter_0000004", aside.name]


def test_a_start_from_an_iteration_continues_the_run_that_began_there(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # load_data_checkpoint_iteration was applied again at every start: a rerun with the same
    # config, or a coordinator restarted by chatlearn launch, went back to it and moved the
    # run's own newer checkpoints into another superseded-* directory
    manager = CheckpointManager(tmp_path / "ckpt")
    # 7, 9 and 12 are of a run started from 4; 4 and 8 of a run before the field existed
    for iteration in (4, 8, 12):
        _save(manager, iteration, started_from=4 if iteration > 8 else None)
    for iteration in (7, 9):
        _save(manager, iteration, started_from=4)

    def find(iteration: int | None, start: bool = True) -> tuple[int, int | None] | None:
        info = asyncio.run(find_checkpoint(manager, iteration, None, start=start))
        return None if info is None else (info.iteration, info.requested)

    with caplog.at_level(logging.INFO, "chatlearn.engine"):
        assert find(4) == (12, 4)
    assert "runtime.load_data_checkpoint_iteration is 4, and the run started from it" in caplog.text
    assert find(8) == (8, 8)  # checkpoints without the field never continue a start
    assert find(None) == (12, None)
    assert find(4, start=False) == (4, None)  # a trainer's rewind to the run's own checkpoint
    model = manager.path(12) / "policy_trainer" / "rank_0" / "model.pt"
    model.write_bytes(b"x" * model.stat().st_size)  # broken: the previous one of the run
    assert find(4) == (9, 4)
    # the newest checkpoint is of a later start (from 9): that run is not the one from 4, and
    # an older branch of it under a newer run is not continued either
    _save(manager, 13, started_from=9)
    assert find(4) == (4, 4) and find(9) == (13, 9)


def test_a_trainer_restart_keeps_the_iteration_the_run_started_from() -> None:
    # a resume from iteration 10 (explicit), a trainer restart before the next save: the
    # rewind restores iter_10, whose state predates the start; the run's later checkpoints
    # lost started_from, and the next coordinator start began the run from 10 again
    assert started_from(None, None, 10, rewind=True) == 10
    assert started_from(10, None, None, rewind=False) == 10  # the start that asked for it
    assert started_from(None, 10, None, rewind=False) == 10  # a plain rerun continues it
    assert started_from(None, None, 10, rewind=False) is None  # another checkpoint's lineage


def test_rewind_metrics_moves_later_records_aside(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1}\n')
    offset = metrics.stat().st_size
    with metrics.open("a") as f:
        f.write('{"step": 2}\n{"step": 3}\n')
    assert rewind_metrics(metrics, offset) == 24
    assert metrics.read_text() == '{"step": 1}\n'
    assert (tmp_path / "metrics.superseded.jsonl").read_text() == '{"step": 2}\n{"step": 3}\n'
    assert rewind_metrics(metrics, offset) == 0


def _trainer(tmp_path: Path) -> TinyTrainer:
    chatlearn.init(
        {
            "models": {"policy_trainer": {"num_cpu": 1, "trainable": True}},
            "runtime": {"output_dir": str(tmp_path), "seed": 3},
        }
    )
    module = TinyTrainer("policy_trainer")
    module.setup()
    return module


def test_torch_module_saves_and_restores_model_optimizer_scheduler_and_rngs(tmp_path):
    try:
        module = _trainer(tmp_path)
        module.model(torch.randn(2, 6)).sum().backward()
        module.optimizer.step()
        module.scheduler.step()
        module.save_checkpoint(3)
        directory = tmp_path / "CHATLEARN" / "checkpoints" / "iter_0000003" / "policy_trainer"
        assert module.checkpoint_dir(3) == directory / "rank_0"
        assert {p.name for p in (directory / "rank_0").iterdir()} == {
            "model.pt",
            "optimizer.pt",
            "scheduler.pt",
            "rng.pt",
        }
        expected = (torch.rand(3), random.random(), float(np.random.rand()))
        saved = {k: v.clone() for k, v in module.model.state_dict().items()}
        saved_optimizer = module.optimizer.state_dict()

        fresh = TinyTrainer("policy_trainer")
        fresh.setup()
        torch.manual_seed(99)  # moves every generator away from the saved state
        random.seed(99)
        np.random.seed(99)
        fresh.load_checkpoint(3)
        for key, value in fresh.model.state_dict().items():
            assert torch.equal(value, saved[key])
        state = fresh.optimizer.state_dict()["state"][0]
        assert torch.equal(state["exp_avg"], saved_optimizer["state"][0]["exp_avg"])
        assert fresh.scheduler.last_epoch == module.scheduler.last_epoch == 1
        got = (torch.rand(3), random.random(), float(np.random.rand()))
        assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]
    finally:
        reset_args()


def test_load_without_a_model_file_names_the_path(tmp_path: Path) -> None:
    try:
        module = _trainer(tmp_path)
        module.save_checkpoint(5)
        (module.checkpoint_dir(5) / "model.pt").unlink()
        with pytest.raises(FileNotFoundError, match="model.pt"):
            module.load_checkpoint(5)
    finally:
        reset_args()


def test_inspect_lists_checkpoints_problems_and_last_metrics(tmp_path: Path) -> None:
    run_dir = tmp_path / "CHATLEARN"
    manager = CheckpointManager(run_dir / "checkpoints")
    for iteration in (4, 7):
        _save(manager, iteration)
    (run_dir / "checkpoints" / "iter_0000007" / COORDINATOR).write_text("{}")  # size changed
    manager.begin(8)
    records = [
        {"kind": "train", "step": 7, "episode": 1, "loss": 0.25},
        {"kind": "episode", "step": 4, "episode": 0, "overlap": 0.5},
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = CliRunner().invoke(cli, ["inspect", str(run_dir)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    (row4,) = [line for line in lines if line.split()[:1] == ["4"]]
    assert row4.split()[1:4] == ["1", "0", "8"] and row4.endswith("-         complete")
    # a trainer of its own (not chatlearn.hf's): nothing chatlearn export could read
    assert not any("chatlearn export" in line for line in lines)
    sharded = run_dir / "checkpoints" / "iter_0000004" / "policy_trainer" / "sharded"
    sharded.mkdir(parents=True)
    (sharded / ".metadata").write_bytes(b"")  # an FSDP2 trainer's periodic checkpoint
    lines = CliRunner().invoke(cli, ["inspect", str(run_dir)]).output.splitlines()
    assert any("`chatlearn export <checkpoint>` writes one" in line for line in lines)
    (row7,) = [line for line in lines if line.split()[:1] == ["7"]]
    assert "BROKEN: coordinator.json has 2 bytes" in row7
    assert any("unfinished save" in line and "iter_0000008" in line for line in lines)
    # without --verify only the sizes were checked: it says so
    assert (
        "a new run resumes from iteration 4 (sizes checked; --verify checks the contents)" in lines
    )
    assert any(line.strip().startswith("last train") and "loss 0.25" in line for line in lines)

    # where the trainer is a Hugging Face directory: in the checkpoint, or exported beside it
    exported = run_dir / "hf" / "iter_0000004"
    exported.mkdir(parents=True)
    (exported / "config.json").write_text("{}")
    rows = CliRunner().invoke(cli, ["inspect", str(run_dir)]).output.splitlines()
    assert [r for r in rows if r.split()[:1] == ["4"]][0].endswith("hf/       complete")
    assert not any("chatlearn export" in line for line in rows)  # every complete one has it
    held = run_dir / "checkpoints" / "iter_0000004" / "policy_trainer" / "rank_0" / "hf_model"
    (held / "adapter").mkdir(parents=True)
    (held / "adapter" / "adapter_config.json").write_text("{}")  # a LoRA run's periodic one
    shutil.rmtree(exported)
    rows = CliRunner().invoke(cli, ["inspect", str(run_dir)]).output.splitlines()
    assert [r for r in rows if r.split()[:1] == ["4"]][0].endswith("adapter   complete")
    (held / "config.json").write_text("{}")  # and the merged weights

    as_json = CliRunner().invoke(cli, ["inspect", str(run_dir), "--json", "--verify"])
    summary = json.loads(as_json.output)
    assert [c["hf"] for c in summary["checkpoints"]] == [str(held), None]
    assert [c["adapter"] for c in summary["checkpoints"]] == [str(held / "adapter"), None]
    assert [c["status"] for c in summary["checkpoints"]] == ["complete", "broken"]
    assert summary["resume_from"] == 4 and summary["metrics"]["records"] == 2
    assert summary["verified"] is True
    verified = CliRunner().invoke(cli, ["inspect", str(run_dir), "--verify"])
    assert "a new run resumes from iteration 4" in verified.output.splitlines()

    empty = CliRunner().invoke(cli, ["inspect", str(tmp_path)])
    assert empty.exit_code == 1
    # the output_dir given for output_dir/exp_name: the line names the run below it
    assert empty.output.strip().splitlines() == [
        f"{tmp_path}: no checkpoints and no metrics.jsonl here; runs below it "
        f"(output_dir/exp_name): {run_dir}"
    ]

    # a run in progress holds the directory: its checkpoints and records are moving, and no
    # "new run" starts there now
    with RunLock(run_dir, lambda *a: ConfigError("held")):
        running = CliRunner().invoke(cli, ["inspect", str(run_dir)]).output.splitlines()
    assert f"a run is in progress here (pid {os.getpid()}): these figures are moving" in running
    assert not [line for line in running if "a new run" in line]
    assert "a new run resumes from iteration 4" in verified.output.splitlines()


def test_inspect_reads_a_damaged_metrics_file_and_refuses_a_missing_checkpoint_root(
    tmp_path: Path,
) -> None:
    """Binary garbage was a UnicodeDecodeError traceback, a line holding a JSON list an
    AttributeError; --checkpoints naming no directory said "a new run starts from the
    beginning" of a run that resumes."""
    run_dir = tmp_path / "CHATLEARN"
    run_dir.mkdir()
    good = {"kind": "eval", "step": 2, "episodes_done": 1, "loss": 0.5}
    (run_dir / "metrics.jsonl").write_bytes(
        b"\xff\xfe\x00garbage\n[1, 2, 3]\n\n42\n" + json.dumps(good).encode() + b'\n{"kind": "tr'
    )
    result = CliRunner().invoke(cli, ["inspect", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert "(1 records, 4 lines that are not records skipped)" in result.output
    assert "last eval     iteration 2, after 1 episodes: loss 0.5" in result.output
    missing = CliRunner().invoke(cli, ["inspect", str(run_dir), "--checkpoints", "/nonexistent"])
    assert missing.exit_code == 2 and "does not exist" in missing.output


def test_room_for_the_checkpoints_to_come() -> None:
    from chatlearn.engine.checkpoint import room_for_checkpoints

    # all kept: every checkpoint to come takes its size
    assert room_for_checkpoints(10, 35, held=1, keep_last=0, saves=5) == 3
    assert room_for_checkpoints(10, 50, held=1, keep_last=0, saves=5) == 5
    # the newest 3 kept: at most 4 on disk (the new one staged before the oldest goes)
    assert room_for_checkpoints(10, 30, held=1, keep_last=3, saves=5) == 5
    assert room_for_checkpoints(10, 29, held=1, keep_last=3, saves=5) == 2
    assert room_for_checkpoints(10, 10, held=3, keep_last=3, saves=9) == 9
    assert room_for_checkpoints(10, 9, held=3, keep_last=3, saves=9) == 0
    assert room_for_checkpoints(10, 0, held=1, keep_last=3, saves=0) == 0  # nothing to come
    # the last one writes 25 more (an export): 5 x 10 + 25 = 75 needed
    assert room_for_checkpoints(10, 75, held=1, keep_last=0, saves=5, final_extra=25) == 5
    assert room_for_checkpoints(10, 74, held=1, keep_last=0, saves=5, final_extra=25) == 4
    assert room_for_checkpoints(10, 35, held=1, keep_last=0, saves=5, final_extra=25) == 3
    # the newest 3 kept: 4 on disk at the end (3 and the one staged), 3 more than now, the
    # last with its export
    assert room_for_checkpoints(10, 55, held=1, keep_last=3, saves=5, final_extra=25) == 5
    assert room_for_checkpoints(10, 54, held=1, keep_last=3, saves=5, final_extra=25) == 4


def test_saves_still_to_come_count_each_iteration_once() -> None:
    from chatlearn.engine.pipeline import PipelineSettings

    def settings(episodes: int, every: int, steps: int) -> PipelineSettings:
        return PipelineSettings(
            num_episode=episodes, sample_per_episode=16, micro_batch_size=2,
            global_batch_size=4, num_training_epoch=1, training_shuffle_mode="batch",
            seed=0, window_micro_batches=0, generation_batch_size=None,
            save_episode_interval=every, save_step_interval=steps,
        )  # fmt: skip

    # 4 steps an episode, 6 episodes: 24 iterations
    assert settings(6, 1, 0).saves_after(4) == 5  # episodes 2..6, the last being the end's
    assert settings(6, 4, 0).saves_after(4) == 2  # episode 4's, and the end's
    assert settings(6, 0, 0).saves_after(4) == 1  # the end's
    assert settings(6, 0, 5).saves_after(4) == 5  # 5, 10, 15, 20, and the end's
    assert settings(6, 1, 8).saves_after(4) == 5  # 8, 16, 24 are episodes' too
    assert settings(6, 0, 6).saves_after(3) == 4  # 6, 12, 18, 24 (the end's)
    assert settings(6, 1, 0).saves_after(24) == 0
