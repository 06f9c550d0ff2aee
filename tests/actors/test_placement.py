"""Placement plans: per-process devices from models.<name> resources and the host's."""

from __future__ import annotations

import pytest

from chatlearn.actors import HostResources, ModelResources, PlacementError, plan_placement
from chatlearn.actors.placement import parse_colocation

CPU_HOST = HostResources("cpu-host", cpus=tuple(range(8)))
GPU_HOST = HostResources("gpu-host", cpus=tuple(range(16)), gpus=tuple(range(8)))


def res(name: str, **keys) -> ModelResources:
    return ModelResources.from_config(name, keys)


def test_cpu_models_get_disjoint_pinned_cores():
    plan = plan_placement(
        [res("ref", num_cpu=2), res("pol", num_cpu=4, cpu_per_process=2, trainable=True)],
        CPU_HOST,
    )
    ref, pol = plan.assignments["ref"], plan.assignments["pol"]
    assert [(p.replica_id, p.rank, p.world_size, p.cpus) for p in ref] == [(0, 0, 1, (0, 1))]
    assert [(p.replica_id, p.rank, p.world_size, p.cpus) for p in pol] == [
        (0, 0, 2, (2, 3)),
        (0, 1, 2, (4, 5)),
    ]
    assert pol[1].env["CHATLEARN_CPU_AFFINITY"] == "4,5"
    assert pol[1].env["OMP_NUM_THREADS"] == "2" and pol[1].env["MKL_NUM_THREADS"] == "2"
    assert "CUDA_VISIBLE_DEVICES" not in pol[1].env  # nothing to hide on a CPU-only host
    assert pol[1].num_threads == 2 and pol[1].device == "cpu"
    assert plan.used_cpus() == {0, 1, 2, 3, 4, 5}


def test_inference_processes_are_replicas_trainer_processes_one_group():
    plan = plan_placement(
        [
            res("ref", num_cpu=3, cpu_per_process=1),
            res("pol", num_cpu=2, cpu_per_process=1, trainable=True),
        ],
        CPU_HOST,
    )
    assert [(p.replica_id, p.rank, p.num_replica) for p in plan.assignments["ref"]] == [
        (0, 0, 3),
        (1, 0, 3),
        (2, 0, 3),
    ]
    assert [(p.replica_id, p.rank, p.num_replica) for p in plan.assignments["pol"]] == [
        (0, 0, 1),
        (0, 1, 1),
    ]
    tp2 = plan_placement([res("ref", num_gpu=4, tensor_model_parallel_size=2)], GPU_HOST)
    assert [(p.replica_id, p.rank, p.gpus) for p in tp2.assignments["ref"]] == [
        (0, 0, (0,)),
        (0, 1, (1,)),
        (1, 0, (2,)),
        (1, 1, (3,)),
    ]


def test_gpu_models_get_gpus_and_see_their_replica_devices():
    plan = plan_placement(
        [
            res("ref", num_gpu=2),
            res("pol", num_device=4, trainable=True),
            res("cpu_side", num_cpu=2),
        ],
        GPU_HOST,
    )
    ref, pol, side = (plan.assignments[k] for k in ("ref", "pol", "cpu_side"))
    assert [p.gpus for p in ref] == [(0,), (1,)]
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in ref] == ["0", "1"]
    assert [p.gpus for p in pol] == [(2,), (3,), (4,), (5,)]
    # torchrun convention: every rank sees its group's GPUs and uses the one at LOCAL_RANK
    assert {p.env["CUDA_VISIBLE_DEVICES"] for p in pol} == {"2,3,4,5"}
    assert [p.local_rank for p in pol] == [0, 1, 2, 3]
    assert all(p.cpus == () for p in ref + pol) and pol[0].device == "cuda"
    assert side[0].cpus == (0, 1) and side[0].env["CUDA_VISIBLE_DEVICES"] == ""


def test_gpu_per_process():
    plan = plan_placement([res("big", num_gpu=4, gpu_per_process=2, trainable=True)], GPU_HOST)
    assert [(p.rank, p.gpus) for p in plan.assignments["big"]] == [(0, (0, 1)), (1, (2, 3))]
    with pytest.raises(PlacementError, match=r"num_gpu \(3\) must be a multiple of"):
        res("odd", num_gpu=3, gpu_per_process=2)


def test_cpu_only_host_falls_back_from_gpus_to_cores(caplog: pytest.LogCaptureFixture):
    # One process per requested device; one core per "GPU" unless num_cpu says otherwise.
    plan = plan_placement(
        [
            res("ref", num_gpu=1),
            res("pol", num_gpu=2, trainable=True),
            res("wide", num_gpu=2, num_cpu=4, trainable=True),
        ],
        CPU_HOST,
    )
    assert [p.cpus for p in plan.assignments["ref"]] == [(0,)]
    assert [p.cpus for p in plan.assignments["pol"]] == [(1,), (2,)]
    assert [p.cpus for p in plan.assignments["wide"]] == [(3, 4), (5, 6)]
    assert all(p.gpus == () for procs in plan.assignments.values() for p in procs)
    # said, not silent: GPUs that are not visible would otherwise go unnoticed
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith("models.ref, models.pol, models.wide ask for num_gpu, but this ")
    assert "no usable CUDA GPU" in warning and "they run on CPU cores instead" in warning
    caplog.clear()
    plan_placement([res("cpu", num_cpu=1)], CPU_HOST)
    assert not caplog.records


def test_colocated_models_share_devices():
    models = [
        res("ref", num_cpu=2),
        res("pol", num_cpu=4, cpu_per_process=2, trainable=True),
        res("other", num_cpu=1),
    ]
    plan = plan_placement(models, CPU_HOST, colocation=parse_colocation(["ref,pol"]))
    assert [p.cpus for p in plan.assignments["ref"]] == [(0, 1)]
    assert [p.cpus for p in plan.assignments["pol"]] == [(0, 1), (2, 3)]
    assert [p.cpus for p in plan.assignments["other"]] == [(4,)]  # after the group's 4 cores
    assert parse_colocation([["a", "b"], "c, d", ""]) == [["a", "b"], ["c", "d"]]
    with pytest.raises(PlacementError, match="twice"):
        plan_placement(models, CPU_HOST, colocation=[["ref", "pol"], ["ref"]])


def test_requests_that_do_not_fit_name_models_and_the_fix():
    with pytest.raises(PlacementError) as info:
        plan_placement([res("ref", num_cpu=4), res("pol", num_cpu=6)], CPU_HOST)
    text = str(info.value)
    assert "ref needs 0 GPU(s), 4 core(s)" in text and "pol needs 0 GPU(s), 6 core(s)" in text
    assert "8 free CPU core(s)" in text and "runtime.colocation" in text
    with pytest.raises(PlacementError, match="9 GPU"):
        plan_placement([res("huge", num_gpu=9)], GPU_HOST)
    # earlier launches hold their devices
    with pytest.raises(PlacementError, match="6 free CPU"):
        plan_placement([res("late", num_cpu=7)], CPU_HOST, reserved_cpus=[0, 1])


def test_invalid_model_requests():
    with pytest.raises(PlacementError, match="num_gpu .* or num_cpu"):
        res("none")
    with pytest.raises(PlacementError, match="cpu_per_process"):
        res("odd", num_cpu=3, cpu_per_process=2)
    with pytest.raises(PlacementError, match="integer >= 0"):
        res("neg", num_cpu=-1)
    with pytest.raises(PlacementError, match="replicas of 2"):
        res("tp", num_gpu=3, tensor_model_parallel_size=2)
    with pytest.raises(PlacementError, match="need at least one core each"):
        plan_placement([res("thin", num_gpu=4, num_cpu=2)], CPU_HOST)


def test_host_detection_reads_affinity():
    import os

    host = HostResources.detect()
    assert host.cpus == tuple(sorted(os.sched_getaffinity(0))) and host.host
