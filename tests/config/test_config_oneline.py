"""Broken configs reach the user as one line, `file:line: key: what is wrong (fix: ...)`, exit 2.

Most configs run in one driver process (`broken_config_driver.py`: init, module templates and
`Engine.start()` up to the actors' start, per config); a few run as real user scripts, directly
and under `chatlearn launch`, to check the exit code, that stderr holds that one line and no
traceback, and that `--debug` / `CHATLEARN_DEBUG=1` shows the traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CHATLEARN = Path(sys.executable).with_name("chatlearn")
TOO_MANY_CORES = 32 * (os.cpu_count() or 1)  # more than this host has, whatever it is
USABLE_CORES = len(os.sched_getaffinity(0))  # what placement may use: each model fits alone

MAIN = """\
models:
  reference:
    num_cpu: {ref_cpu}
    model_config_file: model.yaml
  policy_trainer:
    num_cpu: {pol_cpu}
    trainable: true
    model_config_file: model.yaml
runtime:
  num_episode: 1
  sample_per_episode: 8
  train_micro_batch_size: 2
  train_global_batch_size: 4
  output_dir: {output_dir}
  exp_name: run
{runtime}
"""

MODEL = """\
seed: 0
dtype: float32
model_config:
  hidden_size: 128
  num_hidden_layers: 2
  num_attention_heads: 4
  num_key_value_heads: 4
max_length: 32
beta: 0.1
learning_rate: 3.0e-3
warmup_steps: 5
"""


def write_case(
    root: Path,
    name: str,
    *,
    ref_cpu: int = 1,
    pol_cpu: int = 1,
    output_dir: str = "out",
    runtime: str = "",
    model: dict[str, str] | None = None,
    main: str | None = None,
) -> Path:
    """A config directory: main.yaml and model.yaml, with `model` replacing lines of model.yaml."""
    case = root / name
    case.mkdir()
    text = MODEL
    for old, new in (model or {}).items():
        assert old in text, old
        text = text.replace(old, new)
    (case / "model.yaml").write_text(text)
    (case / "a_file").write_text("not a directory\n")
    # a file where a run in {case}/used would put its checkpoints by default
    (case / "used" / "run").mkdir(parents=True)
    (case / "used" / "run" / "checkpoints").write_text("not a directory\n")
    runtime = textwrap.indent(textwrap.dedent(runtime), "  ")
    if main is None:
        main = MAIN.format(ref_cpu=ref_cpu, pol_cpu=pol_cpu, output_dir=output_dir, runtime=runtime)
    (case / "main.yaml").write_text(main)
    return case


# name -> (write_case keywords, file the line must name, key it must name)
CASES: dict[str, tuple[dict, str, str]] = {
    # the four of issue 17
    "too_many_cores": ({"ref_cpu": TOO_MANY_CORES}, "main.yaml:3", "models.reference.num_cpu"),
    "learning_rate_word": (
        {"model": {"learning_rate: 3.0e-3": "learning_rate: fast"}},
        "model.yaml:10",
        "model_args.learning_rate",
    ),
    "output_dir_is_a_file": ({"output_dir": "{case}/a_file"}, "main.yaml:14", "runtime.output_dir"),
    "heads_do_not_divide": (
        {"model": {"num_attention_heads: 4": "num_attention_heads: 5"}},
        "model.yaml:6",
        "model_args.model_config.num_attention_heads",
    ),
    # resources
    "too_many_gpus": (
        {
            "main": "models:\n  reference:\n    num_gpu: {many}\n  policy_trainer:\n"
            "    num_cpu: 1\n    trainable: true\nruntime:\n  sample_per_episode: {many}\n"
        },
        "main.yaml:3",
        "models.reference.num_gpu",
    ),
    "cores_fit_one_by_one_not_together": (
        {"ref_cpu": USABLE_CORES, "pol_cpu": USABLE_CORES},
        "main.yaml:6",
        "models.policy_trainer.num_cpu",
    ),
    "cpu_per_process_does_not_divide": (
        {"ref_cpu": 3},
        "main.yaml:4",
        "models.reference.cpu_per_process",
    ),
    # output paths
    "output_dir_under_a_file": (
        {"output_dir": "{case}/a_file/runs"},
        "main.yaml:14",
        "runtime.output_dir",
    ),
    "checkpoint_path_is_a_file": (
        {"runtime": "data_checkpoint_path: {case}/a_file"},
        "main.yaml:16",
        "runtime.data_checkpoint_path",
    ),
    # found at the first save, it cost the run everything trained until then
    "default_checkpoints_is_a_file": (
        {"output_dir": "{case}/used", "runtime": "save_episode_interval: 1"},
        "main.yaml:9",
        "runtime.data_checkpoint_path",
    ),
    "reference_store_is_a_file": (
        {"runtime": "reference_store: {case}/a_file"},
        "main.yaml:16",
        "runtime.reference_store",
    ),
    # writable by its mode bits (root), but no directory can be made there
    "output_dir_in_proc": (
        {"output_dir": "/proc/chatlearn_out"},
        "main.yaml:14",
        "runtime.output_dir",
    ),
    "exp_name_is_a_file": (
        {"output_dir": "{case}"},
        "main.yaml:15",
        "runtime.exp_name",
    ),
    # model arguments of the ready-made modules
    "beta_negative": ({"model": {"beta: 0.1": "beta: -1"}}, "model.yaml:9", "model_args.beta"),
    "max_length_word": (
        {"model": {"max_length: 32": "max_length: long"}},
        "model.yaml:8",
        "model_args.max_length",
    ),
    "warmup_steps_fraction": (
        {"model": {"warmup_steps: 5": "warmup_steps: 2.5"}},
        "model.yaml:11",
        "model_args.warmup_steps",
    ),
    "adam_betas_one_number": (
        {"model": {"seed: 0": "seed: 0\nadam_betas: [0.9]"}},
        "model.yaml:2",
        "model_args.adam_betas",
    ),
    "gradient_checkpointing_string": (
        {"model": {"seed: 0": "seed: 0\ngradient_checkpointing: 'yes'"}},
        "model.yaml:2",
        "model_args.gradient_checkpointing",
    ),
    "hidden_size_zero": (
        {"model": {"hidden_size: 128": "hidden_size: 0"}},
        "model.yaml:4",
        "model_args.model_config.hidden_size",
    ),
    "kv_heads_do_not_divide": (
        {"model": {"num_key_value_heads: 4": "num_key_value_heads: 3"}},
        "model.yaml:7",
        "model_args.model_config.num_key_value_heads",
    ),
    "model_config_not_a_mapping": (
        {"model": {"model_config:": "model_config: big\nold_config:"}},
        "model.yaml:3",
        "model_args.model_config",
    ),
    # runtime keys and files
    "global_batch_not_a_multiple": (
        {},
        "main.yaml:13",
        "runtime.train_global_batch_size",
    ),
    "num_episode_word": ({}, "main.yaml:10", "runtime.num_episode"),
    "heartbeat_timeout_too_short": (
        {"runtime": "heartbeat_interval: 2\nheartbeat_timeout: 1"},
        "main.yaml:17",
        "runtime.heartbeat_timeout",
    ),
    "heartbeat_timeout_nan": (
        {"runtime": "heartbeat_timeout: .nan"},
        "main.yaml:16",
        "runtime.heartbeat_timeout",
    ),
    "call_timeout_inf": ({"runtime": "call_timeout: .inf"}, "main.yaml:16", "runtime.call_timeout"),
    "seed_beyond_64_bits": (
        {"runtime": "seed: 99999999999999999999999"},
        "main.yaml:16",
        "runtime.seed",
    ),
    "learning_rate_nan": (
        {"model": {"learning_rate: 3.0e-3": "learning_rate: .nan"}},
        "model.yaml:10",
        "model_args.learning_rate",
    ),
    "max_length_beyond_64_bits": (
        {"model": {"max_length: 32": "max_length: 100000000000000000000"}},
        "model.yaml:8",
        "model_args.max_length",
    ),
    "mixed_precision_word": (
        {"model": {"seed: 0": "seed: 0\nmixed_precision: maybe"}},
        "model.yaml:2",
        "model_args.mixed_precision",
    ),
    "lora_rank_zero": (
        {"model": {"seed: 0": "seed: 0\nlora:\n  r: 0"}},
        "model.yaml:3",
        "model_args.lora.r",
    ),
    "colocation_unknown_model": (
        {"runtime": 'colocation: ["reference,critic"]'},
        "main.yaml:16",
        "runtime.colocation",
    ),
    "missing_model_config_file": (
        {},
        "main.yaml:4",
        "models.reference.model_config_file",
    ),
    "model_missing_from_config": (
        {},
        "main.yaml:1",
        "models.policy_trainer",
    ),
}

# edits of the default main.yaml, per case
MAIN_EDITS: dict[str, tuple[str, str]] = {
    "cpu_per_process_does_not_divide": ("num_cpu: 3\n", "num_cpu: 3\n    cpu_per_process: 2\n"),
    "exp_name_is_a_file": ("exp_name: run", "exp_name: a_file"),
    "global_batch_not_a_multiple": ("train_global_batch_size: 4", "train_global_batch_size: 5"),
    "num_episode_word": ("num_episode: 1", "num_episode: one"),
    "missing_model_config_file": (
        "model_config_file: model.yaml\n  policy",
        "model_config_file: modle.yaml\n  policy",
    ),
    "model_missing_from_config": ("  policy_trainer:", "  policy_traner:"),
}


def build_case(root: Path, name: str) -> Path:
    options = dict(CASES[name][0])
    main = options.pop("main", None)
    case = root / name
    fill = {"case": str(case), "many": str(TOO_MANY_CORES)}
    options = {k: v.format(**fill) if isinstance(v, str) else v for k, v in options.items()}
    if main is not None:
        options["main"] = main.format(**fill)
    case = write_case(root, name, **options)
    if name in MAIN_EDITS:
        old, new = MAIN_EDITS[name]
        text = (case / "main.yaml").read_text()
        assert old in text, (name, old)
        (case / "main.yaml").write_text(text.replace(old, new, 1))
    return case


def run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "CHATLEARN_DEBUG"}
    environ.update(PYTHONPATH=str(ROOT), **env)
    return subprocess.run(
        args, cwd=cwd, env=environ, capture_output=True, text=True, timeout=90, check=False
    )


def test_every_broken_config_is_one_line_naming_file_and_key(tmp_path: Path) -> None:
    cases = [build_case(tmp_path, name) for name in CASES]
    result = run(
        [sys.executable, str(HERE / "broken_config_driver.py"), *map(str, cases)], tmp_path
    )
    assert result.returncode == 0, result.stderr
    reports = {r["case"]: r for r in map(json.loads, result.stdout.splitlines())}
    assert len(reports) == len(CASES) >= 20
    wrong = []
    for name, (_, where, key) in CASES.items():
        line = reports[name]["line"]
        named = line.partition(": ")[0].endswith(f"{name}/{where}") and f"{key}: " in line
        if not named or "\n" in line or "(fix: " not in line:
            wrong.append(f"{name} (expected {where}, {key}): {line}")
    assert not wrong, "\n".join(wrong)
    # every config error was raised before any actor started: nothing was spawned
    assert "[reference" not in result.stderr and "[policy_trainer" not in result.stderr


USER_SCRIPT = """\
import chatlearn
from chatlearn import BaseModule


class Module(BaseModule):
    pass


if __name__ == "__main__":
    chatlearn.init()
    engine = chatlearn.DPOEngine(Module("reference"), Module("policy_trainer"))
    engine.set_dataset([{"prompt": "p", "chosen": "a", "rejected": "b"}] * 8)
    engine.learn()
"""


@pytest.fixture
def user_script(tmp_path: Path) -> Path:
    script = tmp_path / "train.py"
    script.write_text(USER_SCRIPT)
    return script


def only_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.parametrize("name", ["too_many_cores", "learning_rate_word", "output_dir_is_a_file"])
def test_user_script_prints_one_line_and_exits_2(tmp_path: Path, user_script: Path, name: str):
    case = build_case(tmp_path, name)
    result = run([sys.executable, str(user_script), "-c", str(case / "main.yaml")], tmp_path)
    assert result.returncode == 2, result.stderr
    _, where, key = CASES[name]
    line = only_line(result.stderr)
    assert line.partition(": ")[0].endswith(f"{name}/{where}") and f"{key}: " in line, line


def test_launch_prints_one_line_and_debug_shows_the_traceback(tmp_path: Path, user_script: Path):
    case = build_case(tmp_path, "heads_do_not_divide")
    args = [str(CHATLEARN), "launch", str(user_script), "-c", str(case / "main.yaml")]
    result = run(args, tmp_path)
    assert result.returncode == 2, result.stderr
    line = only_line(result.stderr)
    assert line.partition(": ")[0].endswith("heads_do_not_divide/model.yaml:6"), line
    assert "model_config.num_attention_heads: " in line, line
    debug = run([*args[:2], "--debug", *args[2:]], tmp_path)
    assert debug.returncode == 2
    assert "Traceback (most recent call last)" in debug.stderr and "ConfigError" in debug.stderr


def test_debug_env_shows_the_traceback(tmp_path: Path, user_script: Path):
    case = build_case(tmp_path, "num_episode_word")
    args = [sys.executable, str(user_script), "-c", str(case / "main.yaml")]
    result = run(args, tmp_path, CHATLEARN_DEBUG="1")
    assert result.returncode == 2
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.rstrip().endswith("fix: write a whole number, e.g. num_episode: 5000")


SETUP_SCRIPT = """\
import chatlearn
from chatlearn import BaseModule


class Picky(BaseModule):
    def setup(self):
        raise chatlearn.get_args().error(
            "models.reference.model_args.temperature", "must be > 0, got -1", "set temperature: 1"
        )


class Module(BaseModule):
    pass


if __name__ == "__main__":
    chatlearn.init()
    engine = chatlearn.DPOEngine(Picky("reference"), Module("policy_trainer"))
    engine.set_dataset([{"prompt": "p", "chosen": "a", "rejected": "b"}] * 8)
    engine.learn()
"""


def test_config_error_raised_in_an_actor_setup_ends_as_its_one_line(tmp_path: Path):
    script = tmp_path / "train.py"
    script.write_text(SETUP_SCRIPT)
    main = tmp_path / "main.yaml"
    main.write_text(
        "models:\n  reference:\n    num_cpu: 1\n    model_args:\n      temperature: -1\n"
        "  policy_trainer:\n    num_cpu: 1\n    trainable: true\nruntime:\n"
        "  sample_per_episode: 8\n  output_dir: out\n"
    )
    result = run([sys.executable, str(script), "-c", str(main)], tmp_path)
    assert result.returncode == 2, result.stderr
    # the coordinator prints no traceback: its own lines (actors prefix theirs) are the one line
    own = [line for line in result.stderr.splitlines() if line and not line.startswith("[")]
    assert own == [
        "main.yaml:5: models.reference.model_args.temperature: must be > 0, got -1 "
        "(fix: set temperature: 1) [model reference, rank 0, in setup]"
    ], result.stderr
