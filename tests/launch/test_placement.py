"""Multi-host placement (`plan_hosts`): whole device groups per host, in host file order."""

from __future__ import annotations

import pytest

from chatlearn.actors.errors import PlacementError
from chatlearn.actors.placement import HostResources, ModelResources, plan_hosts

HOSTS = [HostResources("h1", (0, 1)), HostResources("h2", (0, 1, 2, 3))]


def _where(plan, name):
    return [(p.host, p.rank, p.cpus, p.local_rank) for p in plan.assignments[name]]


def test_models_fill_hosts_in_order_and_a_large_one_goes_where_it_fits():
    models = [
        ModelResources("ref", num_cpu=1),
        ModelResources("big", num_cpu=3, cpu_per_process=1, trainable=True),
        ModelResources("small", num_cpu=1),
    ]
    plan = plan_hosts(models, HOSTS)
    assert _where(plan, "ref") == [("h1", 0, (0,), 0)]
    assert _where(plan, "big") == [("h2", 0, (0,), 0), ("h2", 1, (1,), 1), ("h2", 2, (2,), 2)]
    assert _where(plan, "small") == [("h1", 0, (1,), 0)]


def test_a_model_larger_than_any_host_spans_hosts_with_local_ranks():
    plan = plan_hosts([ModelResources("t", num_cpu=5, cpu_per_process=1, trainable=True)], HOSTS)
    assert _where(plan, "t") == [
        ("h1", 0, (0,), 0),
        ("h1", 1, (1,), 1),
        ("h2", 2, (0,), 0),
        ("h2", 3, (1,), 1),
        ("h2", 4, (2,), 2),
    ]
    assert {p.world_size for p in plan.assignments["t"]} == {5}


def test_colocated_models_share_one_host_or_fail_clearly():
    models = [ModelResources("ref", num_cpu=3), ModelResources("pol", num_cpu=3, trainable=True)]
    plan = plan_hosts(models, HOSTS, colocation=[["ref", "pol"]])
    assert _where(plan, "ref")[0][:3] == ("h2", 0, (0, 1, 2))
    assert _where(plan, "pol")[0][:3] == ("h2", 0, (0, 1, 2))
    big = [ModelResources("ref", num_cpu=5), ModelResources("pol", num_cpu=5, trainable=True)]
    with pytest.raises(PlacementError, match="colocated models ref\\+pol fit on no single host"):
        plan_hosts(big, HOSTS, colocation=[["ref", "pol"]])


def test_too_little_room_names_the_model_and_hosts():
    with pytest.raises(PlacementError, match=r"models.t: its 7 processes .* \(h1, h2\)"):
        plan_hosts([ModelResources("t", num_cpu=7, cpu_per_process=1, trainable=True)], HOSTS)
    taken = {"h1": ((0, 1), ()), "h2": ((0,), ())}
    plan = plan_hosts([ModelResources("m", num_cpu=1)], HOSTS, reserved=taken)
    assert _where(plan, "m") == [("h2", 0, (1,), 0)]
