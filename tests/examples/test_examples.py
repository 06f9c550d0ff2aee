"""The example programs, run as a user runs them (subprocesses, from the repository root)."""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def example_function(name: str) -> Any:
    """A function of the DPO example's main file, imported from the repository root."""
    sys.path.insert(0, str(ROOT))
    try:
        module = importlib.import_module("examples.dpo.train_dpo")
    finally:
        sys.path.remove(str(ROOT))
    return getattr(module, name)


pytestmark = pytest.mark.timeout(300)


def _run(
    args: list[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path = ROOT,
    timeout=240,
    expect: int = 0,
):
    """Run ``python *args`` as a user would; its exit code must be ``expect``."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    said = f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    assert proc.returncode == expect, said
    return proc


def test_dpo_example_learns(tmp_path: Path) -> None:
    env = {"NUM_EPISODE": "3", "OUTPUT_DIR": str(tmp_path)}
    proc = _run(["-m", "examples.dpo.train_dpo", "-c", "examples/dpo/dpo.yaml"], env=env)
    out = proc.stdout
    loss = re.search(r"train loss\s+([\d.]+) -> ([\d.]+)", out)
    accuracy = re.search(r"eval reward acc\.\s+([\d.]+) -> ([\d.]+)", out)
    assert loss and accuracy, out
    assert float(loss.group(2)) < float(loss.group(1)) - 0.05
    assert float(accuracy.group(2)) >= float(accuracy.group(1)) + 0.3
    records = [
        json.loads(line)
        for line in (tmp_path / "dpo_example" / "metrics.jsonl").read_text().splitlines()
    ]
    evals = [r for r in records if r["kind"] == "eval"]
    assert len(evals) == 4  # before training and after each of the 3 episodes
    assert evals[-1]["rewards/accuracies"] > evals[0]["rewards/accuracies"]


def test_the_lora_example_runs_as_it_says(tmp_path: Path) -> None:
    # One short episode of the LoRA example: it runs and trains the adapters only. (The FSDP2
    # example runs as it says in tests/examples/test_example_chaos.py, uninterrupted and not.)
    env = {"NUM_EPISODE": "1", "SAMPLE_PER_EPISODE": "64", "OUTPUT_DIR": str(tmp_path)}
    proc = _run(["-m", "examples.dpo.train_dpo", "-c", "examples/dpo/dpo_lora.yaml"], env=env)
    log = proc.stdout + proc.stderr
    assert "training done" in log, log[-4000:]
    sizes = re.search(r"policy_trainer: ([\d,]+) parameters \(([\d,]+) trainable\)", log)
    assert sizes, log[-4000:]
    total, trainable = (int(size.replace(",", "")) for size in sizes.groups())
    assert 0 < trainable < total / 5, (trainable, total)  # adapters only


MAIN_SCRIPT = """
import sys, time
import chatlearn
from chatlearn import DPOEngine
from chatlearn.actors import BaseModule

MARKER = sys.argv[-1]


class PolicyReference(BaseModule):
    def build_dataset(self, samples, is_eval=False):
        import torch
        return [{"x": torch.tensor(float(s))} for s in samples]

    def forward_step(self, data):
        return {"x": data["x"], "ref": data["x"] * 2}


class PolicyTrainer(BaseModule):
    def train_step(self, data, iteration):
        return {"total": float(sum(mb["ref"].sum() for mb in data))}


if __name__ == "__main__":
    open(MARKER, "a").write("main ran\\n")  # must happen once: not in the actors
    chatlearn.init()
    engine = DPOEngine(PolicyReference("reference"), PolicyTrainer("policy_trainer"))
    engine.set_dataset(list(range(20)))
    engine.learn()
    print("iteration", engine.trainer.iteration)
"""

CONFIG = """
models:
  reference: {num_cpu: 1}
  policy_trainer: {num_cpu: 1, trainable: true}
runtime:
  num_episode: 2
  sample_per_episode: 8
  train_micro_batch_size: 2
  train_global_batch_size: 4
  output_dir: OUT
"""


def test_chatlearn_shaped_main_file_with_modules_in_the_script(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(MAIN_SCRIPT))
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.replace("OUT", str(tmp_path / "out")))
    marker = tmp_path / "marker"
    proc = _run([str(script), "-c", str(config), str(marker)], cwd=tmp_path)
    assert "iteration 4" in proc.stdout  # 2 episodes × ceil(8 / 4)
    assert marker.read_text() == "main ran\n"


def test_custom_flow_example() -> None:
    proc = _run(["-m", "examples.custom_flow.flow"], timeout=120)
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("0.33  'chatlearn'")
    served = [int(re.search(r"served (\d+) calls", line).group(1)) for line in lines[-2:]]
    assert sorted(served) == [2, 3]


def test_the_example_never_writes_over_a_users_data(tmp_path: Path) -> None:
    # A typo in one data path made the example regenerate both files: the user's training
    # data was replaced by 8,000 synthetic pairs and trained on, without a word
    mine = tmp_path / "mine.jsonl"
    mine.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    config = tmp_path / "mine.yaml"
    config.write_text(
        textwrap.dedent(
            f"""
            includes:
              - {ROOT / "examples" / "dpo" / "dpo.yaml"}
            models:
              reference:
                model_config_file: {ROOT / "examples" / "dpo" / "model.yaml"}
              policy_trainer:
                model_config_file: {ROOT / "examples" / "dpo" / "model.yaml"}
            runtime:
              data_path: {mine}
              eval_data_path: {tmp_path / "typo.jsonl"}
            """
        )
    )
    script = str(ROOT / "examples" / "dpo" / "train_dpo.py")
    env = {"OUTPUT_DIR": str(tmp_path / "out")}
    proc = _run([script, "-c", str(config)], env=env, timeout=60, expect=2)
    last = proc.stderr.strip().splitlines()[-1]
    assert "runtime.eval_data_path" in last and "typo.jsonl does not exist" in last, last
    assert mine.read_text().count("\n") == 1 and not (tmp_path / "typo.jsonl").exists()


def test_the_example_applies_chatlearns_data_limits(tmp_path: Path) -> None:
    # runtime.training_data_num_limit / eval_data_num_limit, which ChatLearn's entry scripts
    # read (and so are not warned about as settings with no effect): applied as the file is read,
    # and the records kept still name their lines (a slice of them named none)
    load_data = example_function("load_data")
    path = tmp_path / "data.jsonl"
    records = [{"prompt": str(i), "chosen": "c", "rejected": "r"} for i in range(5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))

    def limited(limit: int | None) -> list[dict]:
        return load_data(None, "data_path", path, limit)  # args: only for a config error

    assert limited(2) == records[:2] and limited(0) == []
    assert limited(-1) == records == limited(None)
    assert limited(2).origin(1) == f"{path}:2"


@pytest.mark.parametrize("eval_line", ["eval_data_path: null", "eval_data_path: ''", ""])
def test_the_example_reads_no_eval_set_from_a_null_or_absent_path_and_expands_home(
    eval_line: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # null was a TypeError traceback; without the key, an error about data/eval.jsonl, a path
    # the user never wrote; a data path under ~ was read relative to the config's directory
    from chatlearn.config import load_config

    data_paths = example_function("data_paths")
    monkeypatch.setenv("HOME", str(tmp_path))
    config = tmp_path / "c.yaml"
    config.write_text(
        "models:\n  reference:\n    num_cpu: 1\n  policy_trainer:\n    num_cpu: 1\n"
        f"    trainable: true\nruntime:\n  data_path: ~/mine.jsonl\n  {eval_line}\n"
    )
    assert data_paths(load_config(config)) == (tmp_path / "mine.jsonl", None)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("1.5", "1.5 is not a whole number"),  # int() made it 1 record, silently
        ("abc", "'abc' is not a whole number"),  # was an error about runtime.data_path
        ("true", "True is not a whole number"),
        ("0", "0 keeps no training record"),  # was "the dataset is empty", naming no key
    ],
)
def test_the_examples_data_limits_must_be_whole_numbers(
    value: str, problem: str, tmp_path: Path
) -> None:
    from chatlearn.config import ConfigError, load_config

    data_limit = example_function("data_limit")
    config = tmp_path / "c.yaml"
    config.write_text(
        "models:\n  reference:\n    num_cpu: 1\n  policy_trainer:\n    num_cpu: 1\n"
        f"    trainable: true\nruntime:\n  training_data_num_limit: {value}\n"
        "  eval_data_num_limit: 0\n"
    )
    args = load_config(config)
    with pytest.raises(ConfigError) as info:
        data_limit(args, "training_data_num_limit")
    line = str(info.value)
    assert f"c.yaml:8: runtime.training_data_num_limit: {problem}" in line, line
    assert "fix: set it to how many records to read (-1 or unset: all of them)" in line


def test_the_examples_data_limit_written_in_quotes_is_its_number(tmp_path: Path) -> None:
    # `training_data_num_limit: "100"` (after ${ENV:default}, say) was "not a whole number",
    # where every numeric key of the config now reads a number written in quotes
    from chatlearn.config import load_config

    data_limit = example_function("data_limit")
    config = tmp_path / "c.yaml"
    config.write_text(
        "models:\n  reference:\n    num_cpu: 1\n  policy_trainer:\n    num_cpu: 1\n"
        '    trainable: true\nruntime:\n  training_data_num_limit: "100"\n'
    )
    assert data_limit(load_config(config), "training_data_num_limit") == 100


def test_the_examples_eval_limit_of_0_reads_every_eval_record_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # ChatLearn's entry scripts limit the eval set only when eval_data_num_limit is truthy; 0
    # here read no eval record, and every evaluation was skipped without a word
    from chatlearn.config import load_config

    data_limit = example_function("data_limit")
    config = tmp_path / "c.yaml"
    config.write_text(
        "models:\n  reference:\n    num_cpu: 1\n  policy_trainer:\n    num_cpu: 1\n"
        "    trainable: true\nruntime:\n  eval_data_num_limit: 0\n"
    )
    with caplog.at_level(logging.WARNING, logger="ChatLearn"):
        assert data_limit(load_config(config), "eval_data_num_limit") is None
    (line,) = [r.getMessage() for r in caplog.records if "eval_data_num_limit" in r.getMessage()]
    assert "c.yaml:8: runtime.eval_data_num_limit: 0 is no limit" in line, line
    assert "every eval record is read" in line and "remove eval_data_path" in line
