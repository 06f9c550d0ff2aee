"""The DPO example's data generator: deterministic, disjoint held-out split, correct labels, and
files the preference dataset reads."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from chatlearn.hf import PreferenceDataset, byte_tokenizer

MAKE_DATA = Path(__file__).resolve().parents[2] / "examples" / "dpo" / "make_data.py"


def _module():
    spec = importlib.util.spec_from_file_location("dpo_make_data", MAKE_DATA)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_minmax_pairs_are_right_deterministic_and_disjoint() -> None:
    make_pairs = _module().make_pairs
    train, held_out = make_pairs(num_train=500, num_eval=100, seed=3)
    assert (train, held_out) == make_pairs(num_train=500, num_eval=100, seed=3)
    assert train != make_pairs(num_train=500, num_eval=100, seed=4)[0]
    assert len(train) == 500 and len(held_out) == 100
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    for record in train + held_out:
        op, args = record["prompt"].rstrip("=").rstrip(")").split("(")
        x, y = (int(v) for v in args.split(","))
        assert record["chosen"] == str(max(x, y) if op == "max" else min(x, y))
        assert record["rejected"] == str(min(x, y) if op == "max" else max(x, y))


def test_sum_pairs() -> None:
    train, _ = _module().make_pairs("sum", num_train=200, num_eval=10, max_value=99)
    for record in train:
        x, y = (int(v) for v in record["prompt"].rstrip("=").split("+"))
        assert record["chosen"] == str(x + y) != record["rejected"]


def test_impossible_sizes_and_unknown_task_are_errors() -> None:
    make_pairs = _module().make_pairs
    with pytest.raises(ValueError, match="distinct"):
        make_pairs(num_train=100, num_eval=10, max_value=3)
    with pytest.raises(ValueError, match="unknown task"):
        make_pairs("poetry")


def test_main_writes_jsonl_the_dataset_reads(tmp_path: Path) -> None:
    paths = _module().main(["--num-train", "64", "--num-eval", "8", "--out", str(tmp_path)])
    assert [p.name for p in paths] == ["train.jsonl", "eval.jsonl"]
    lines = paths[0].read_text().splitlines()
    assert len(lines) == 64 and set(json.loads(lines[0])) == {"prompt", "chosen", "rejected"}
    dataset = PreferenceDataset(paths[1], byte_tokenizer(), max_length=32)
    assert len(dataset) == 8 and dataset.num_identical == 0
