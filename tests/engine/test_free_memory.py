"""Colocated models with ``free_memory`` take turns (ChatLearn's schedule), with ``onload()`` /
``offload()`` around each turn; without it the colocated pipeline overlaps as before."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import chatlearn
from chatlearn import DPOEngine
from chatlearn.config import reset_args

sys.path.insert(0, str(Path(__file__).parent))
from echo_modules import EchoReference, EchoTrainer, HookedReference, HookedTrainer  # noqa: E402

# wall-clock bounds (death noticed in time, starved told from hung, turns and overlap):
# run alone, in make test's second part
pytestmark = [pytest.mark.timeout(120), pytest.mark.serial]

RUNTIME = {
    "num_episode": 2,
    "sample_per_episode": 8,
    "generation_batch_size": 2,
    "train_micro_batch_size": 2,
    "train_global_batch_size": 2,
    "eval_episode_interval": 1,
    "echo_cost": 0.02,
    "colocation": ["reference,policy_trainer"],
    "data_shuffle": False,
}


async def _learn(tmp_path: Path, free_memory: bool) -> list[dict]:
    models = {
        "reference": {"num_cpu": 1, "free_memory": free_memory},
        "policy_trainer": {"num_cpu": 1, "trainable": True, "free_memory": free_memory},
    }
    log = tmp_path / "log.jsonl"
    runtime = {**RUNTIME, "output_dir": str(tmp_path), "echo_log": str(log)}
    chatlearn.init({"models": models, "runtime": runtime})
    try:
        engine = DPOEngine(EchoReference("reference"), EchoTrainer("policy_trainer"))
        engine.set_dataset(list(range(20)))
        engine.set_eval_dataset([100, 101])
        await engine.learn_async()
    finally:
        reset_args()
    return [json.loads(line) for line in log.read_text().splitlines()]


def _turns(log: list[dict]) -> list[str]:
    """The log as "model event" entries, repeats of one entry collapsed."""
    short = {"reference": "ref", "policy_trainer": "train"}
    out: list[str] = []
    for record in log:
        entry = f"{short[record['model']]} {record['event']}"
        if not out or out[-1] != entry:
            out.append(entry)
    return out


async def test_colocated_models_with_free_memory_take_turns(tmp_path: Path) -> None:
    log = await _learn(tmp_path, free_memory=True)
    reference_turn = ["ref onload", "ref forward", "ref after_episode", "ref offload"]
    trainer_turn = ["train onload", "train train", "train after_episode", "train offload"]
    evaluation = ["train onload", "train offload"]  # eval_step (not logged) in a turn
    eval_reference = ["ref onload", "ref forward", "ref offload"]  # the eval set, once
    assert _turns(log) == [
        "train offload",  # before the first turn: the reference's turn gets the room
        *reference_turn,
        *trainer_turn,
        *eval_reference,
        *evaluation,
        *reference_turn,
        *trainer_turn,
        *evaluation,
    ]
    forwards = [r for r in log if r["event"] == "forward" and r["rows"][0] < 100]
    trains = [r for r in log if r["event"] == "train"]
    assert len(forwards) == len(trains) == 8
    # no overlap: each episode's steps start after its last forward ends, and the next
    # episode's forwards after its last step
    assert forwards[3]["end"] <= trains[0]["start"]
    assert trains[3]["end"] <= forwards[4]["start"]
    assert forwards[7]["end"] <= trains[4]["start"]


async def test_colocated_models_without_free_memory_overlap(tmp_path: Path) -> None:
    log = await _learn(tmp_path, free_memory=False)
    assert not [r for r in log if r["event"] in ("onload", "offload")]
    forwards = [r for r in log if r["event"] == "forward" and r["rows"][0] < 100]
    trains = [r for r in log if r["event"] == "train"]
    # pipelined: training starts during the episode's inference, and the reference runs
    # into the next episode while the trainer finishes this one
    assert trains[0]["start"] < forwards[3]["end"]
    assert forwards[4]["start"] < trains[3]["end"]


async def test_a_trainer_offloaded_by_its_memory_hooks_is_saved_onloaded(tmp_path: Path) -> None:
    """ChatLearn onloads a colocated trainer to save it, and offloads it again: a module whose
    offload_weights() took its weights away saved without them (here: failed saving)."""
    models = {
        "reference": {"num_cpu": 1, "free_memory": True},
        "policy_trainer": {"num_cpu": 1, "trainable": True, "free_memory": True},
    }
    runtime = {**RUNTIME, "output_dir": str(tmp_path), "save_episode_interval": 1}
    chatlearn.init({"models": models, "runtime": runtime})
    try:
        engine = DPOEngine(EchoReference("reference"), HookedTrainer("policy_trainer"))
        engine.set_dataset(list(range(20)))
        result = await engine.learn_async()
    finally:
        reset_args()
    assert result.steps == 8 and result.checkpoint is not None


async def test_a_reference_with_memory_hooks_is_onloaded_only_after_an_offload(
    tmp_path: Path,
) -> None:
    """A reference's first turn begins with onload(), never offloaded before: its
    onload_weights() ran with nothing stashed (here: AttributeError '_stash')."""
    models = {
        "reference": {"num_cpu": 1, "free_memory": True},
        "policy_trainer": {"num_cpu": 1, "trainable": True, "free_memory": True},
    }
    chatlearn.init({"models": models, "runtime": {**RUNTIME, "output_dir": str(tmp_path)}})
    try:
        engine = DPOEngine(HookedReference("reference"), HookedTrainer("policy_trainer"))
        engine.set_dataset(list(range(20)))
        result = await engine.learn_async()
    finally:
        reset_args()
    assert result.steps == 8
