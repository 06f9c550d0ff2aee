"""Multi-rank models: a torch.distributed (gloo) group formed before setup(), and CPU pinning."""

from __future__ import annotations

import os

import actors_testlib as lib
import pytest
import torch

from chatlearn.actors import ActorSystem, HostResources

pytestmark = pytest.mark.timeout(90)


async def test_two_rank_cpu_model_forms_a_gloo_group_on_disjoint_cores():
    cfg = lib.make_config(
        {"dist": {"num_cpu": 2, "cpu_per_process": 1, "trainable": True}},
        {"train_micro_batch_size": 1, "train_global_batch_size": 2},
    )
    # The test host may have more cores; the plan uses the first two it is given.
    host = HostResources("localhost", cpus=tuple(sorted(os.sched_getaffinity(0)))[:2])
    async with ActorSystem(cfg, host=host) as system:
        (group,) = await system.launch(lib.DistModule("dist", cfg))
        assert len(group) == 2 and group.world_size == 2 and group.num_replica == 1
        reports = await group.call_all("report")
        # all_reduce of rank + 1 inside setup(): 1 + 2
        assert [r["setup_sum"] for r in reports] == [3.0, 3.0]
        assert [r["rank"] for r in reports] == [0, 1]
        assert {r["world_size"] for r in reports} == {2}
        assert {r["backend"] for r in reports} == {"gloo"}
        assert [r["env"] for r in reports] == [
            {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"},
            {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"},
        ]
        assert [r["is_last_rank"] for r in reports] == [False, True]
        assert [r["data_parallel"] for r in reports] == [[0, 2], [1, 2]]
        # each rank is pinned to its own core, with torch's thread count matching
        cpus = [r["cpus"] for r in reports]
        assert all(len(c) == 1 for c in cpus) and set(cpus[0]).isdisjoint(cpus[1]), cpus
        assert [r["torch_threads"] for r in reports] == [1, 1]
        assert [h.info["cpus"] for h in group] == cpus
        # a collective in a step: scatter different values, every rank gets the sum
        assert await group.scatter("all_reduce", [10.0, 32.5]) == [42.5, 42.5]
    assert system.failure is None


async def test_a_single_process_model_can_form_its_own_group_from_the_environment():
    """ChatLearn gives every process of a model RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, also
    a model of one process, whose setup() may call init_process_group() (env://) itself: that
    failed here with "environment variable RANK expected, but not set"."""
    cfg = lib.make_config(
        {"solo": {"num_cpu": 1, "trainable": True}},
        {"train_micro_batch_size": 1, "train_global_batch_size": 1},
    )
    async with ActorSystem(cfg) as system:
        (group,) = await system.launch(lib.SelfInitDistModule("solo", cfg))
        (report,) = await group.call_all("report")
    assert report["group"] == [0, 1]
    assert report["env"] == {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
    }
    assert system.failure is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
async def test_gpu_model_ranks_get_their_devices_and_nccl():
    num_gpu = min(2, torch.cuda.device_count())
    cfg = lib.make_config(
        {"g": {"num_gpu": num_gpu, "trainable": True}},
        {"train_micro_batch_size": 1, "train_global_batch_size": num_gpu},
    )
    async with ActorSystem(cfg) as system:
        (group,) = await system.launch(lib.GpuModule("g", cfg))
        reports = await group.call_all("report")
    host_gpus = HostResources.detect().gpus[:num_gpu]
    visible = ",".join(str(g) for g in host_gpus)
    assert [r["visible"] for r in reports] == [visible] * num_gpu
    assert [r["device"] for r in reports] == list(range(num_gpu))  # LOCAL_RANK's device
    assert [r["sum"] for r in reports] == [float(num_gpu)] * num_gpu
    if num_gpu > 1:
        assert {r["backend"] for r in reports} == {"nccl"}


def test_rendezvous_ports_come_from_outside_the_kernels_ephemeral_range() -> None:
    """MASTER_PORT was a port from bind(0): between the coordinator's probe and rank 0's bind
    (seconds: the interpreter and torch starting), another process's connect or bind(0) could
    be given it, and the model failed to start (EADDRINUSE, seen with test runs side by side).
    Outside the ephemeral range only a process that names the port takes it."""
    import socket

    from chatlearn.actors.process import _ephemeral_ports, free_tcp_port

    low, high = _ephemeral_ports()
    ports = {free_tcp_port() for _ in range(50)}
    assert not [port for port in ports if low <= port <= high]
    assert len(ports) > 40  # drawn at random: concurrent runs do not pick alike
    with socket.socket() as sock:
        port = free_tcp_port()
        sock.bind(("127.0.0.1", port))  # and free when given
