"""`chatlearn bench dpo --json` end to end on a tiny model: every figure is there and positive.

Timing targets are not checked here (they need the default model and a quiet machine; see
BENCHMARKS.md); this checks that the three runs, the second epoch and the ratios are produced.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from chatlearn.benchmarks.dpo import bench_records, layout_models, median_of_rounds, throughput

FIGURES = (
    "single_process_samples_per_s",
    "pipelined_samples_per_s",
    "train_only_samples_per_s",
    "ratio_pipelined_vs_single",
    "ratio_pipelined_vs_train_only",
    "second_epoch_samples_per_s",
    "train_only_all_cores_samples_per_s",
    "ratio_second_epoch_vs_train_only_all_cores",
)


def test_bench_dpo_json_has_every_figure() -> None:
    tiny = "--hidden-size 32 --intermediate-size 64 --num-layers 1 --seq-len 32 --batch-size 4"
    command = [sys.executable, "-m", "chatlearn.cli", "bench", "dpo", *tiny.split()]
    command += ["--generation-batch-size", "4", "--steps", "2", "--warmup", "1", "--vs-trl"]
    # The reference at nice 19 rather than the default SCHED_IDLE: under SCHED_IDLE it runs only
    # on a core nothing else wants, and next to make test's other worker it waited (one episode
    # of 3 steps took 182 s beside two busy processes); what is checked here is the figures.
    # SCHED_IDLE itself: tests/actors/test_nice.py; the priority keys: test_layouts_share_or_split
    command += ["--reference-priority", "nice"]
    done = subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)  # stdout is exactly the JSON object, TRL's prints included
    for key in FIGURES:
        assert result[key] > 0, key
    assert result["trainer_cores"] >= 1 and result["num_parameters"] > 0
    assert "trl_samples_per_s" in result or "trl" in result["trl_skipped"]


def test_throughput_counts_the_steps_after_warmup() -> None:
    # 4 samples a step; steps end at 1, 2, 4, 6 s: after 1 warm-up step, 12 samples in 5 s
    assert throughput([2.0, 1.0, 4.0, 6.0], 4, 1) == pytest.approx(12 / 5)
    with pytest.raises(ValueError):
        throughput([1.0], 4, 1)


def test_rounds_give_medians_and_ratios_of_the_same_round() -> None:
    rounds = [
        {"pipelined_samples_per_s": b, "ratio_pipelined_vs_single": r, "trainer_cores": 2}
        for b, r in ((8.0, 1.1), (6.0, 0.9), (7.0, 0.8))
    ]
    result = median_of_rounds(rounds)
    assert result["pipelined_samples_per_s"] == 7.0
    assert result["ratio_pipelined_vs_single"] == 0.9  # the rounds' ratios, not b's median / a's
    assert result["trainer_cores"] == 2 and result["rounds"] == rounds


def test_layouts_share_or_split_the_cores() -> None:
    colocated = layout_models("colocated", 2, {"idle_priority": True}, {})
    assert colocated["colocation"] == [["reference", "policy_trainer"]]
    reference = {"num_cpu": 2, "idle_priority": True, "model_args": {}}
    assert colocated["models"]["reference"] == reference
    split = layout_models("split", 2, {"nice": 19}, {})
    assert split["models"]["reference"]["nice"] == 19
    assert split["colocation"] == [] and split["trainer_cores"] == 1


def test_bench_records_are_deterministic_pairs() -> None:
    records = bench_records(16)
    assert records == bench_records(16) and len(records) == 16
    assert all(r["chosen"] != r["rejected"] for r in records)


def test_trl_prompts_fill_seq_len_like_our_pipeline() -> None:
    # TRL's sequence = prompt with bos + response without special tokens + eos: exactly --seq-len
    from chatlearn.benchmarks.dpo import TRLRunner, model_args
    from chatlearn.hf.tokenizer import load_tokenizer

    runner = TRLRunner.__new__(TRLRunner)  # no actor: only the tokenizer is used
    runner.tokenizer = load_tokenizer(None)
    options = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "seq_len": 64}
    template = str(model_args(options)["prompt_template"])
    for record in bench_records(32):
        prompt = runner._fit_prompt(template.replace("{prompt}", record["prompt"]), record, 64)
        response = max(len(record["chosen"]), len(record["rejected"])) + 1  # bytes + eos
        assert len(runner.tokenizer(prompt)["input_ids"]) + response == 64


# --data realistic: the end-to-end command launches five processes (about a minute here), so
# its parts are tested in process; the command itself is in BENCHMARKS.md.
TINY_OPTIONS = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "seq_len": 32}


def _single_process(options: dict) -> Any:
    from chatlearn.benchmarks.dpo import SingleProcessDPO, model_args
    from chatlearn.config import Config

    model = {"num_cpu": 1, "trainable": True, "model_args": model_args(options)}
    runtime = {"num_episode": 1, "sample_per_episode": 4, "train_micro_batch_size": 2}
    config = Config({"models": {"single": model}, "runtime": runtime})
    module = SingleProcessDPO("single", args=config)
    module._rank, module._world_size = 0, 1  # as the runtime sets them
    module.setup()
    return module


def test_realistic_model_args_use_the_profile_and_padded_turns_packing_off() -> None:
    from chatlearn.benchmarks.dpo import model_args

    realistic = {**TINY_OPTIONS, "data": "realistic"}
    args = model_args(realistic)
    assert (args["max_length"], args["max_prompt_length"]) == (1024, 512)
    assert args["prompt_template"] == "{prompt}"
    assert args["model_config"]["max_position_embeddings"] >= 1024
    assert "packing" not in args  # the default: on where exact
    padded = model_args({**realistic, "padded": True})
    assert padded["packing"] is False and padded["prefix_sharing"] is False
    assert "packing" not in model_args(TINY_OPTIONS)  # the uniform bench unchanged


def test_realistic_single_process_counts_real_and_computed_tokens() -> None:
    from chatlearn.benchmarks.dpo import realistic_records_for, token_figures

    records = realistic_records_for(4)
    realistic = {**TINY_OPTIONS, "data": "realistic"}
    padded = _single_process({**realistic, "padded": True}).run_steps(records, 2, False)
    packed = _single_process(realistic).run_steps(records, 2, True)  # and precomputed
    assert len(padded["ends"]) == len(packed["ends"]) == 2
    (real, computed), (packed_real, packed_computed) = padded["tokens"], packed["tokens"]
    assert real == packed_real > 0
    # the repeated prompt is computed only in the padded rows; packed rows (of at most
    # max(max_length, 1024) tokens) pad only to the widest row
    assert packed_real <= packed_computed < computed
    figures = token_figures({"samples_per_s": 2.0, "tokens": padded["tokens"]}, 2, 2)
    assert figures["real_token_fraction"] == pytest.approx(real / computed)
    assert figures["real_tokens_per_s"] == pytest.approx(2.0 * real / 4)
    with pytest.raises(ValueError, match="no token counts"):
        token_figures({"samples_per_s": 1.0, "tokens": (0.0, 0.0)}, 2, 2)
