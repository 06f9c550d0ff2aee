"""`chatlearn export` as a careless user meets it: every mistake one line and exit code 1, no
traceback, nothing half-written left behind (the exports themselves: test_layouts.py)."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

from click.testing import CliRunner

from chatlearn.actors.checkpoint_paths import FORMAT
from chatlearn.cli import main

CONFIG = {
    "models": {
        "policy": {"num_cpu": 1, "trainable": True, "model_args": {"seed": 0}},
        "reference": {"num_cpu": 1, "model_args": {"seed": 0}},
    },
    "runtime": {"num_episode": 1, "sample_per_episode": 8},
}


def _export(*args: str) -> tuple[int, list[str]]:
    result = CliRunner().invoke(main, ["export", *args])
    return result.exit_code, result.output.splitlines()


def _checkpoint(root: Path, iteration: int, *, complete: bool = True, **model_args: str) -> Path:
    checkpoint = root / f"iter_{iteration:07d}"
    (checkpoint / "policy" / "rank_0").mkdir(parents=True)
    (checkpoint / "policy" / "rank_0" / "rng.pt").write_bytes(b"")
    config = copy.deepcopy(CONFIG)
    config["models"]["policy"]["model_args"].update(model_args)
    state = {"config": config, "trainer": {"model": "policy"}}
    (checkpoint / "coordinator.json").write_text(json.dumps(state))
    if complete:
        files = {
            path.relative_to(checkpoint).as_posix(): {"size": path.stat().st_size}
            for path in checkpoint.rglob("*")
            if path.is_file()
        }
        (checkpoint / "MANIFEST.json").write_text(json.dumps({"format": FORMAT, "files": files}))
    return checkpoint


def test_each_mistake_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    assert _export(str(missing)) == (
        1, [f"chatlearn export: {missing}: no such checkpoint or directory"]
    )  # fmt: skip
    code, lines = _export(str(tmp_path))
    assert code == 1 and len(lines) == 1 and "neither a checkpoint nor" in lines[0]
    broken = _checkpoint(tmp_path / "ckpt", 4, complete=False)
    code, lines = _export(str(broken))
    assert code == 1 and lines == [f"chatlearn export: {broken}: an incomplete checkpoint (no "
                                   "MANIFEST.json)"]  # fmt: skip
    code, lines = _export(str(broken.parent))  # the newest complete one: none
    assert code == 1 and len(lines) == 1 and "neither a checkpoint nor" in lines[0]
    damaged = _checkpoint(tmp_path / "damaged", 2)
    size = (damaged / "coordinator.json").stat().st_size  # as written: its hash differs
    (damaged / "coordinator.json").write_text('{"config": '.ljust(size))
    code, lines = _export(str(damaged))
    assert code == 1 and len(lines) == 1 and "not the coordinator's state" in lines[0], lines
    done = _checkpoint(tmp_path / "ckpt", 2)
    code, lines = _export(str(done), "--model", "critic")
    assert code == 1 and lines == [
        f"chatlearn export: {done}: no model 'critic' in the run's config (its models: "
        "policy, reference); name the trainer with --model"
    ]
    code, lines = _export(str(done), "--model", "reference")
    assert code == 1 and len(lines) == 1 and "reference does not train" in lines[0], lines
    taken = tmp_path / "taken"
    taken.mkdir()
    code, lines = _export(str(done), "-o", str(taken))
    assert code == 1 and lines == [
        f"chatlearn export: {taken} exists: name another directory with -o, or remove it"
    ]
    # a trainer of its own (no weights chatlearn.hf's trainer wrote): said, nothing left
    code, lines = _export(str(tmp_path / "ckpt"), "-o", str(tmp_path / "out"))
    assert code == 1 and len(lines) == 1, lines
    assert "no weights of policy" in lines[0] and "chatlearn.hf's trainer" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "damaged", "taken"]
    # the run's config as the checkpoint holds it: a relative model_path not found from here,
    # a model_path that is no checkpoint
    for path, said in (("model", "is relative and not found from"), (str(taken), "taken")):
        checkpoint = _checkpoint(tmp_path / f"ckpt_{len(path)}", 3, model_path=path)
        code, lines = _export(str(checkpoint), "-o", str(tmp_path / "out"))
        assert code == 1 and len(lines) == 1 and said in lines[0], lines


def test_a_broken_newest_checkpoint_is_passed_over(tmp_path: Path) -> None:
    """A directory of checkpoints: the newest whose files are as its manifest says (a newest
    one with a file gone or cut short, as `chatlearn inspect` shows it broken, is not read);
    that one named itself is refused."""
    older = _checkpoint(tmp_path / "checkpoints", 2)
    newest = _checkpoint(tmp_path / "checkpoints", 4)
    (newest / "policy" / "rank_0" / "rng.pt").unlink()
    code, lines = _export(str(older.parent), "-o", str(tmp_path / "out"))
    assert code == 1 and len(lines) == 1, lines
    assert f"{older / 'policy'}: no weights of policy" in lines[0], lines
    code, lines = _export(str(newest), "-o", str(tmp_path / "out"))
    assert code == 1 and lines == [
        f"chatlearn export: {newest}: a broken checkpoint (policy/rank_0/rng.pt is missing); "
        "`chatlearn inspect` lists the complete ones"
    ]


def test_weights_of_another_model_are_refused(tmp_path: Path) -> None:
    """A trainer of its own (a TorchModule's model.pt, its names not the model's the run's
    config builds): refused in one line, not written out under a Llama's config with exit 0."""
    import torch

    checkpoint = _checkpoint(tmp_path / "checkpoints", 4)
    weights = {"linear.weight": torch.randn(3, 6), "linear.bias": torch.randn(3)}
    torch.save(weights, checkpoint / "policy" / "rank_0" / "model.pt")
    code, lines = _export(str(checkpoint))
    assert code == 1 and len(lines) == 1, lines
    assert "model.pt: not the weights of the model the run's config builds" in lines[0]
    assert "linear.bias is not in" in lines[0], lines
    assert not (tmp_path / "hf" / "iter_0000004").exists()


def test_an_output_among_the_checkpoints_is_refused(tmp_path: Path) -> None:
    """-o inside the checkpoint, or beside it in the checkpoints' directory: the run's
    retention would remove it with the checkpoint, and an iter_* name is a broken checkpoint
    that a save of that iteration replaces."""
    checkpoint = _checkpoint(tmp_path / "checkpoints", 4)
    for output in (checkpoint / "export", tmp_path / "checkpoints" / "iter_0000099"):
        code, lines = _export(str(checkpoint), "-o", str(output))
        assert code == 1 and lines == [
            f"chatlearn export: {output} is inside {checkpoint.parent}, among the run's "
            "checkpoints (pruned and replaced as runs go on): name a directory outside it with -o"
        ], lines
        assert not output.exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["iter_0000004"]


def test_a_killed_exports_leftover_is_removed_by_the_next(tmp_path: Path) -> None:
    # a SIGKILLed export leaves its partial directory (no clean-up runs); the next export to the
    # same name removes it when its process is gone, and leaves a live process's alone
    import subprocess
    import sys

    done = _checkpoint(tmp_path / "ckpt", 2)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(10)
    output = tmp_path / "out"
    dead = tmp_path / f".out.partial-{gone.pid}"
    live = tmp_path / f".out.partial-{os.getppid()}"
    for leftover in (dead, live):
        (leftover / "adapter").mkdir(parents=True)
    code, lines = _export(str(done), "-o", str(output))
    assert code == 1 and "no weights of policy" in lines[0], lines  # it got that far
    assert not dead.exists() and live.is_dir()
