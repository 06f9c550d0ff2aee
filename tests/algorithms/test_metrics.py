"""DPO metrics over 2 micro-batches × 2 data-parallel ranks equal those of the whole batch, with
unequal sizes: first with ranks simulated in-process, then with 2 real gloo processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from chatlearn.algorithms import METRIC_NAMES, DPOMetrics, PairLogps, compute_dpo

# 7 pairs: rank 0 gets micro-batches [0:3] and [3:4], rank 1 gets [4:6] and [6:7]
SPLITS = [[(0, 3), (3, 4)], [(4, 6), (6, 7)]]


def _inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    values = {
        name: -5 * torch.rand(7, generator=gen, dtype=torch.float64)
        for name in ("pc", "pr", "rc", "rr")
    }
    values["nc"] = torch.randint(1, 6, (7,), generator=gen).to(torch.float64)
    values["nr"] = torch.randint(1, 6, (7,), generator=gen).to(torch.float64)
    return values


def _output(values: dict[str, torch.Tensor], start: int, stop: int, rpo_alpha: float | None):
    part = {key: value[start:stop] for key, value in values.items()}
    policy = PairLogps(part["pc"], part["pr"], part["nc"], part["nr"])
    return compute_dpo(policy, part["rc"], part["rr"], beta=0.2, rpo_alpha=rpo_alpha)


def _rank_metrics(rank: int, rpo_alpha: float | None) -> DPOMetrics:
    values = _inputs()
    metrics = DPOMetrics(with_nll=rpo_alpha is not None)
    for start, stop in SPLITS[rank]:
        metrics.update(_output(values, start, stop, rpo_alpha))
    return metrics


def _whole_batch(rpo_alpha: float | None) -> dict[str, float]:
    metrics = DPOMetrics(with_nll=rpo_alpha is not None)
    metrics.update(_output(_inputs(), 0, 7, rpo_alpha))
    return metrics.compute()


@pytest.mark.parametrize("rpo_alpha", [None, 0.5])
def test_micro_batches_and_ranks_equal_the_whole_batch(rpo_alpha: float | None) -> None:
    merged = _rank_metrics(0, rpo_alpha).merge(_rank_metrics(1, rpo_alpha))
    assert merged.num_samples == 7
    got, want = merged.compute(), _whole_batch(rpo_alpha)
    expected_names = set(METRIC_NAMES) | ({"nll_loss"} if rpo_alpha else set())
    assert set(got) == set(want) == expected_names
    for name in want:
        assert got[name] == pytest.approx(want[name], abs=1e-12), name


def test_whole_batch_values_are_plain_means() -> None:
    values = _inputs()
    out = _output(values, 0, 7, None)
    result = _whole_batch(None)
    assert result["loss"] == pytest.approx(out.losses.mean().item())
    margins = out.chosen_rewards - out.rejected_rewards
    assert result["rewards/margins"] == pytest.approx(margins.mean().item())
    assert result["rewards/accuracies"] == pytest.approx((margins > 0).double().mean().item())
    assert result["logps/rejected"] == pytest.approx(values["pr"].mean().item())


def test_mean_of_means_would_be_wrong_here() -> None:
    # guards the test's power: with these unequal splits, averaging micro-batch means differs
    per_micro = []
    for rank in (0, 1):
        for start, stop in SPLITS[rank]:
            m = DPOMetrics()
            m.update(_output(_inputs(), start, stop, None))
            per_micro.append(m.compute()["loss"])
    assert sum(per_micro) / 4 != pytest.approx(_whole_batch(None)["loss"], abs=1e-6)


def test_prefix_reset_empty_and_mismatch() -> None:
    metrics = DPOMetrics(prefix="eval_")
    assert metrics.compute() == {}
    metrics.update(_output(_inputs(), 0, 2, None))
    assert "eval_rewards/accuracies" in metrics.compute()
    metrics.reset()
    assert metrics.num_samples == 0 and metrics.compute() == {}
    with pytest.raises(ValueError, match="merge"):
        metrics.merge(DPOMetrics(with_nll=True))
    with pytest.raises(ValueError, match="rpo_alpha"):
        DPOMetrics(with_nll=True).update(_output(_inputs(), 0, 2, None))
    # no process group: all_reduce is a no-op
    assert DPOMetrics().all_reduce().num_samples == 0


WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch.distributed as dist
    sys.path.insert(0, sys.argv[4])
    import test_metrics as t
    rank, init_file, rpo = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=2)
    try:
        metrics = t._rank_metrics(rank, 0.5 if rpo else None).all_reduce()
        print(json.dumps({"n": metrics.num_samples, "metrics": metrics.compute()}))
    finally:
        dist.destroy_process_group()
    # as actor processes end: the interpreter's shutdown with gloo's threads aborted now and
    # then (tests/hf/layout_worker.py, end_worker)
    sys.stdout.flush()
    os._exit(0)
    """
)


def test_all_reduce_over_two_gloo_processes(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    init_file = tmp_path / "pg_init"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(script),
                str(rank),
                str(init_file),
                "1",
                str(Path(__file__).parent),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for rank in (0, 1)
    ]
    try:
        outputs = [proc.communicate(timeout=90) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    want = _whole_batch(0.5)
    for proc, (stdout, stderr) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, stderr
        result = json.loads(stdout.strip().splitlines()[-1])
        assert result["n"] == 7
        for name, value in want.items():
            assert result["metrics"][name] == pytest.approx(value, abs=1e-12), name
