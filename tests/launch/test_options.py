"""Numeric options of `chatlearn launch` and `chatlearn bench` refuse nan, infinities and
out-of-range values with click's usage error (exit 2), before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from chatlearn.cli import main

pytestmark = pytest.mark.timeout(60)

MEMORY_TINY = "--hidden-size 64 --intermediate-size 128 --num-layers 1 --num-heads 4".split() + (
    "--num-kv-heads 2 --vocab-size 300 --seq-len 32 --layouts ddp --warmup 1".split()
)
DPO_TINY = "--hidden-size 32 --intermediate-size 64 --num-layers 1 --seq-len 32".split() + (
    "--steps 1 --warmup 1 --no-second-epoch".split()
)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # nan made --max-restarts count no restart at all: a coordinator restarted forever
        (["launch", "--restart-window", "nan", "x.py"], "nan is not a finite number"),
        (["launch", "--restart-window", "inf", "x.py"], "inf is not a finite number"),
        (["launch", "--restart-window", "0", "x.py"], "not in the range"),
        (["bench", "pipeline", "--forward-cost", "nan"], "nan is not a finite number"),
        (["bench", "pipeline", "--train-cost", "-1"], "not in the range"),
        (["bench", "pipeline", "--soak", "--soak-episode", "0"], "not in the range"),
        (["bench", "pipeline", "--micro-batch-size", "0"], "not in the range"),
        # these named runtime keys the user never wrote (runtime.pipeline_window: must be ≥ 0)
        (["bench", "pipeline", "--soak", "--soak-window", "-1"], "'--soak-window': -1 is not in"),
        (
            ["bench", "pipeline", "--global-batch-size", "3"],
            "--global-batch-size 3 must be a multiple of --micro-batch-size 2",
        ),
        (
            ["bench", "pipeline", "--sample-per-episode", "4"],
            "--sample-per-episode 4 must be at least --global-batch-size 8",
        ),
        (["bench", "dpo", "--cores", "0"], "--cores must be between 1 and"),
        # each of these started actors and then failed in them, or named a config key the user
        # never wrote (runtime.sample_per_episode: must be ≥ 1, got -6); a tiny model otherwise,
        # so that a regression fails in seconds
        (
            ["bench", "memory", *MEMORY_TINY, "--vocab-size", "64"],
            "'--vocab-size': 64 is smaller "
            "than the byte-level tokenizer's 259 tokens; give at least 259",
        ),
        (["bench", "memory", *MEMORY_TINY, "--vocab-size", "0"], "'--vocab-size': 0 is smaller"),
        (["bench", "memory", *MEMORY_TINY, "--pairs", "-2"], "'--pairs': -2 is not in the range"),
        (["bench", "memory", *MEMORY_TINY, "--seq-len", "1"], "'--seq-len': 1 is not in the range"),
        (
            ["bench", "memory", *MEMORY_TINY, "--num-kv-heads", "3"],
            "--num-heads 4 must be a multiple of --num-kv-heads 3",
        ),
        (
            ["bench", "memory", *MEMORY_TINY, "--hidden-size", "36"],
            "--hidden-size 36 must be a multiple of 2 × --num-heads (4)",
        ),
        (["bench", "memory", *MEMORY_TINY, "--lora-rank", "0"], "'--lora-rank': 0 is not in"),
        (
            ["bench", "memory", *MEMORY_TINY, "--mixed-precision", "fp16"],
            "--mixed-precision fp16 needs a loss scaler, which needs --device cuda",
        ),
        (
            ["bench", "dpo", *DPO_TINY, "--hidden-size", "0"],
            "'--hidden-size': 0 is not in the range",
        ),
        (
            ["bench", "dpo", *DPO_TINY, "--hidden-size", "36"],
            "--hidden-size 36 must be a multiple of 2 × the model's attention heads (4)",
        ),
        (["bench", "dpo", *DPO_TINY, "--batch-size", "0"], "'--batch-size': 0 is not in the range"),
        (
            ["bench", "dpo", *DPO_TINY, "--generation-batch-size", "-1"],
            "'--generation-batch-size': -1 is not in",
        ),
    ],
)
def test_bad_numbers_are_usage_errors(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    # the error is click's one line naming the option, after its usage lines: no traceback
    assert result.output.strip().splitlines()[-1].startswith("Error: ")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # the script's place took the mistyped option: "File '--max-restart' does not exist"
        (["--max-restart", "2", "x.py"], "No such option '--max-restart'"),
        (["--hostfil", "hosts", "x.py"], "Did you mean '--hostfile'?"),
        # options of other hosts' actors were ignored without a host file, a missing env file too
        (["--env-file", "missing.env", "x.py"], "--env-file needs a --hostfile"),
        (["--launcher", "local", "--export", "X_", "x.py"], "--launcher, --export need a"),
    ],
)
def test_launch_option_mistakes_are_usage_errors(
    args: list[str], message: str, tmp_path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("x.py").write_text("raise SystemExit('the script ran')\n")
    result = CliRunner().invoke(main, ["launch", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert result.output.strip().splitlines()[-1].startswith("Error: ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is of machines without CUDA")
def test_bench_dpo_on_cuda_without_a_gpu_is_a_usage_error() -> None:
    # it ran the whole benchmark on CPU cores and reported the figures as --device cuda
    result = CliRunner().invoke(main, ["bench", "dpo", *DPO_TINY, "--device", "cuda"])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1] == (
        "Error: --device cuda: this machine has no usable CUDA GPU"
    )
