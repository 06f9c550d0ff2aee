"""The megatron example trains on CPU: TP=1, TP=2 and DP=2 give the same DPO losses.

Three real processes (one TP=1 run, one 2-rank gloo group that runs TP=2 then DP=2) start
together once for this module; each writes its results as JSON (see dpo_worker.py) and the tests
below check them. Skipped when megatron-core is not installed.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

from chatlearn.megatron.requirement import megatron_available

pytestmark = [
    pytest.mark.skipif(
        not megatron_available(),
        reason="megatron-core is not installed (pip install 'chatlearn[megatron]')",
    ),
    pytest.mark.timeout(400),
]

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gloo_ranks import run_ranks  # noqa: E402

WORKER = Path(__file__).with_name("dpo_worker.py")
RUN_TIMEOUT = 300.0  # seconds for all three processes; a run takes ~15 s on an idle 2-core box
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Results of the TP=1 process and of both ranks of the 2-process group."""
    tmp = tmp_path_factory.mktemp("megatron")
    jobs = [("tp1", 0, 1), ("pair0", 0, 2), ("pair1", 1, 2)]
    run_ranks(WORKER, jobs, [], tmp, RUN_TIMEOUT)
    return {name: json.loads((tmp / f"{name}.json").read_text()) for name, _, _ in jobs}


def _assert_close(a: list[float], b: list[float]) -> None:
    assert len(a) == len(b)
    worst = max(abs(x - y) for x, y in zip(a, b, strict=True))
    assert worst < TOLERANCE, f"losses differ by {worst:.3g}: {a} vs {b}"


def test_tp1_and_tp2_losses_agree(runs: dict[str, Any]) -> None:
    tp1 = runs["tp1"]["tp1"]["losses"]
    for rank in ("pair0", "pair1"):
        _assert_close(tp1, runs[rank]["tp2"]["losses"])


def test_dp2_losses_agree_with_tp1(runs: dict[str, Any]) -> None:
    tp1 = runs["tp1"]["tp1"]["losses"]
    for rank in ("pair0", "pair1"):
        _assert_close(tp1, runs[rank]["dp2"]["losses"])


def test_loss_starts_at_log2_and_decreases(runs: dict[str, Any]) -> None:
    # The reference is the policy's initial weights, so the first loss is exactly -log σ(0).
    for result in (runs["tp1"]["tp1"], runs["pair0"]["tp2"], runs["pair1"]["dp2"]):
        losses = result["losses"]
        assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
        assert losses[-1] < losses[0] - 0.05, losses
        assert result["last_metrics"]["rewards/accuracies"] > 0.5


def test_vocab_parallel_logps_match_full_softmax(runs: dict[str, Any]) -> None:
    checks = [runs["tp1"]["tp1"]] + [runs[r][k] for r in ("pair0", "pair1") for k in ("tp2", "dp2")]
    for result in checks:
        assert result["logps_check"] < TOLERANCE


def test_ranks_and_outputs_per_layout(runs: dict[str, Any]) -> None:
    pair = [runs["pair0"], runs["pair1"]]
    by_layout = {(x["tp"], x["pp"]): [] for x in pair[0]["layouts"]}
    for result in pair:
        for x in result["layouts"]:
            by_layout[(x["tp"], x["pp"])].append(x)
    # (tensor, pipeline, data) coordinates; outputs come from the last tp rank of the last stage
    pp2, tp2, dp2 = by_layout[(1, 2)], by_layout[(2, 1)], by_layout[(1, 1)]
    assert [x["coordinates"] for x in pp2] == [[0, 0, 0], [0, 1, 0]]
    assert [x["is_last_rank"] for x in pp2] == [False, True]
    assert [x["coordinates"] for x in tp2] == [[0, 0, 0], [1, 0, 0]]
    assert [x["is_last_rank"] for x in tp2] == [False, True]
    assert [x["coordinates"] for x in dp2] == [[0, 0, 0], [0, 0, 1]]
    assert [x["is_last_rank"] for x in dp2] == [True, True]  # one output rank per DP rank
    assert [x["data_parallel_size"] for x in pp2 + tp2 + dp2] == [1, 1, 1, 1, 2, 2]


def test_module_views_in_training_runs(runs: dict[str, Any]) -> None:
    tp2 = [runs["pair0"]["tp2"], runs["pair1"]["tp2"]]
    assert [(x["tensor_parallel_rank"], x["data_parallel_rank"]) for x in tp2] == [(0, 0), (1, 0)]
    assert [x["is_last_rank"] for x in tp2] == [False, True]
    dp2 = [runs["pair0"]["dp2"], runs["pair1"]["dp2"]]
    assert [(x["data_parallel_rank"], x["data_parallel_size"]) for x in dp2] == [(0, 2), (1, 2)]
    # metrics are reduced over the data-parallel group: both ranks report the same step
    assert dp2[0]["last_metrics"] == dp2[1]["last_metrics"]


def test_cpu_compat_patches_are_idempotent(runs: dict[str, Any]) -> None:
    checks = runs["tp1"]["checks"]
    names = [
        "rng_tracker",
        "global_memory_buffer",
        "causal_mask",
        "rotary_embedding",
        "tied_embedding_sync",
    ]
    assert checks["patches_first_call"] == names
    assert checks["patches_second_call"] == names
    assert checks["patches_in_effect"] == names
    assert runs["tp1"]["tp1"]["cpu_compat_patches"] == names
    # the explicit mask and the (patched) default causal mask give the same logits
    assert checks["mask_max_diff"] == 0.0
