"""Placement: which process of which model runs on which devices.

Runs in the coordinator (the plan); the actor processes read their config through
``config_value`` too (``worker_core.py``, ``module.py``).

`plan_placement` turns every model's `models.<name>` resource keys and the host's resources into
one `ProcessAssignment` per actor process, or raises `PlacementError` (a `ConfigError`) naming the
key to change and, for a config read from YAML, the file and line it was written at. Placement
runs in the coordinator before any process starts, so "more cores or GPUs than the host has"
stops the run at once.

Keys read from `models.<name>`:
- `num_gpu` (alias `num_device`), `num_cpu`: the model's devices (at least one must be > 0).
- `gpu_per_process` (default 1): GPUs per process; `num_gpu / gpu_per_process` processes.
- `cpu_per_process` (extension; default: all of `num_cpu` in one process) for CPU-only models.
- `trainable`: a trainer is one replica whose processes form one torch.distributed group (data
  parallelism inside); an inference model has one replica per `tensor_model_parallel_size ×
  pipeline_model_parallel_size` devices (ChatLearn's rule), each replica its own group.

Mapping to hardware:
- GPU host: GPU models get disjoint GPUs. Every process of a replica sees the replica's GPUs
  (`CUDA_VISIBLE_DEVICES`, in rank order) and uses the ones at `LOCAL_RANK × gpu_per_process`
  (torchrun's convention, so user DDP/FSDP code works as is). CPU models get pinned cores and
  `CUDA_VISIBLE_DEVICES=""`.
- CPU-only host: every process is pinned to its own cores. A model that asks for GPUs falls back
  to cores: one process per `gpu_per_process` "devices" as on a GPU host, each process getting
  `num_cpu / num_processes` cores if `num_cpu` is set, else one core per requested GPU.
- Colocation (`runtime.colocation`, e.g. `["reference,policy_trainer"]`): the models of a group
  share one range of devices (sized for the largest) instead of getting disjoint ones; the OS
  scheduler then gives the trainer the time the reference leaves idle.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from chatlearn.actors.errors import PlacementError
from chatlearn.actors.identity import ActorIdentity

__all__ = [
    "HostResources",
    "ModelResources",
    "PlacementPlan",
    "ProcessAssignment",
    "parse_colocation",
    "plan_hosts",
    "plan_placement",
]

log = logging.getLogger("chatlearn.actors")


PARALLEL_SIZE_KEYS = (
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "expert_model_parallel_size",
)


def config_value(obj: Any, key: str, default: Any = None) -> Any:
    """Read `key` from a config section that is a mapping or an attribute-style object."""
    if obj is None:
        return default
    if isinstance(obj, Mapping):
        value = obj.get(key, default)
    else:
        try:
            value = getattr(obj, key)
        except AttributeError:
            return default
    return default if value is None else value


# keys of models.<name> that placement reads, for locating its errors in the config files
RESOURCE_KEYS = (
    "num_gpu",
    "num_cpu",
    "gpu_per_process",
    "cpu_per_process",
    "zero_size",
    *PARALLEL_SIZE_KEYS,
)


def _key_locations(model_cfg: Any) -> dict[str, str]:
    """The "file:line" of each resource key of a `chatlearn.config.ModelConfig` (else none)."""
    locator, key_path = getattr(model_cfg, "_locator", None), getattr(model_cfg, "_key_path", None)
    if locator is None or key_path is None:
        return {}
    return {key: locator.where(key_path(key)) for key in ("", *RESOURCE_KEYS)}


def _error(
    model: str, key: str, problem: str, fix: str, locations: Mapping[str, str] | None = None
) -> PlacementError:
    where = (locations or {}).get(key) or (locations or {}).get("")
    path = f"models.{model}.{key}" if key else f"models.{model}"
    return PlacementError(problem, where=where, key=path, fix=fix)


def _positive_int(
    model: str,
    key: str,
    value: Any,
    *,
    allow_zero: bool = True,
    locations: Mapping[str, str] | None = None,
) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        lowest = "0" if allow_zero else "1"
        raise _error(
            model,
            key,
            f"must be an integer >= {lowest}, got {value!r}",
            f"set {key}: {lowest if allow_zero else 1} or more",
            locations,
        )
    return value


@dataclass(frozen=True)
class HostResources:
    """What one host offers: its name, the CPU cores this process may use, and its GPUs."""

    host: str
    cpus: tuple[int, ...]
    gpus: tuple[int, ...] = ()

    @classmethod
    def detect(cls) -> HostResources:
        """This host: cores from our own affinity, GPUs from CUDA (only if torch sees one)."""
        return cls(
            host=socket.gethostname(),
            cpus=tuple(sorted(os.sched_getaffinity(0))),
            gpus=_detect_gpus(),
        )


def _detect_gpus() -> tuple[int, ...]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return ()
    if "torch" not in sys.modules and _no_nvidia_driver():
        return ()  # importing torch just to count zero GPUs costs a second or more
    try:
        import torch  # only the coordinator needs this, and only here
    except ImportError:
        return ()
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible:
        ids = [part.strip() for part in visible.split(",") if part.strip()]
        return (
            tuple(int(i) for i in ids[:count])
            if all(i.isdigit() for i in ids)
            else tuple(range(count))
        )
    return tuple(range(count))


def _no_nvidia_driver() -> bool:
    """True on Linux hosts without the NVIDIA kernel driver (so CUDA cannot see a GPU)."""
    return sys.platform.startswith("linux") and not (
        os.path.exists("/proc/driver/nvidia") or os.path.exists("/dev/nvidia0")
    )


@dataclass(frozen=True)
class ModelResources:
    """A model's resource request, parsed and checked from its `models.<name>` section."""

    name: str
    num_gpu: int = 0
    num_cpu: int = 0
    gpu_per_process: int = 1
    cpu_per_process: int | None = None
    trainable: bool = False
    model_parallel_size: int = 1  # devices per inference replica (tp × pp × ep, or zero_size)
    # "file:line" of each resource key ("" for the model's own entry), for errors
    locations: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_config(cls, name: str, model_cfg: Any) -> ModelResources:
        locations = _key_locations(model_cfg)

        def number(key: str, default: int, *, allow_zero: bool = True) -> int:
            value = config_value(model_cfg, key, default)
            return _positive_int(name, key, value, allow_zero=allow_zero, locations=locations)

        num_gpu = config_value(model_cfg, "num_gpu", 0) or config_value(model_cfg, "num_device", 0)
        # ChatLearn's replica size: zero_size if set, else tensor × pipeline × expert parallel.
        zero = number("zero_size", 1, allow_zero=False)
        group = 1
        for key in PARALLEL_SIZE_KEYS:
            group *= number(key, 1, allow_zero=False)
        res = cls(
            name=name,
            num_gpu=_positive_int(name, "num_gpu", num_gpu, locations=locations),
            num_cpu=number("num_cpu", 0),
            gpu_per_process=number("gpu_per_process", 1, allow_zero=False),
            cpu_per_process=config_value(model_cfg, "cpu_per_process", None),
            trainable=bool(config_value(model_cfg, "trainable", False)),
            model_parallel_size=zero if zero > 1 else group,
            locations=locations,
        )
        res.layout()  # validate now, so a bad config fails at launch, before any process starts
        return res

    @property
    def uses_gpu(self) -> bool:
        return self.num_gpu > 0

    def error(self, key: str, problem: str, fix: str) -> PlacementError:
        """A PlacementError about `models.<name>.<key>` ("" for the whole entry), located."""
        return _error(self.name, key, problem, fix, self.locations)

    def layout(self) -> tuple[int, int]:
        """(number of processes, ranks per replica); raises `PlacementError` if inconsistent."""
        if self.num_gpu == 0 and self.num_cpu == 0:
            raise self.error(
                "",
                "neither num_gpu nor num_cpu is set",
                "set num_gpu (alias num_device) or num_cpu to at least 1",
            )
        if self.uses_gpu:
            if self.num_gpu % self.gpu_per_process:
                raise self.error(
                    "num_gpu",
                    f"num_gpu ({self.num_gpu}) must be a multiple of "
                    f"gpu_per_process ({self.gpu_per_process})",
                    "make num_gpu a multiple of gpu_per_process",
                )
            num_processes = self.num_gpu // self.gpu_per_process
            per_replica = max(1, self.model_parallel_size // self.gpu_per_process)
        else:
            per_process = self.cpu_per_process or self.num_cpu
            per_process = _positive_int(
                self.name,
                "cpu_per_process",
                per_process,
                allow_zero=False,
                locations=self.locations,
            )
            if self.num_cpu % per_process:
                raise self.error(
                    "cpu_per_process",
                    f"num_cpu ({self.num_cpu}) must be a multiple of "
                    f"cpu_per_process ({per_process})",
                    f"set cpu_per_process to a divisor of {self.num_cpu}",
                )
            num_processes = self.num_cpu // per_process
            per_replica = self.model_parallel_size
        if self.trainable:
            return num_processes, num_processes
        if num_processes % per_replica:
            raise self.error(
                "tensor_model_parallel_size",
                f"{num_processes} processes cannot be split into replicas of "
                f"{per_replica} (tensor × pipeline × expert parallel size, or zero_size)",
                f"use a multiple of {per_replica} devices, or smaller parallel sizes",
            )
        return num_processes, per_replica

    def num_replica(self) -> int:
        num_processes, per_replica = self.layout()
        return num_processes // per_replica

    def cores_per_process(self, host_has_gpus: bool) -> int:
        """Cores each process is pinned to (0: not pinned, on GPU hosts for GPU models)."""
        num_processes, _ = self.layout()
        if not self.uses_gpu:
            return self.num_cpu // num_processes
        if host_has_gpus:
            return 0
        if self.num_cpu:
            if self.num_cpu < num_processes:
                raise self.error(
                    "num_cpu",
                    f"on this CPU-only host its {num_processes} processes "
                    f"need at least one core each, but num_cpu is {self.num_cpu}",
                    f"set num_cpu to {num_processes} or more, or lower num_gpu",
                )
            return self.num_cpu // num_processes
        return self.gpu_per_process


@dataclass(frozen=True)
class ProcessAssignment:
    """One actor process: its place in the model and the devices it is pinned to."""

    model: str
    replica_id: int
    rank: int  # rank within the replica's torch.distributed group
    world_size: int
    num_replica: int
    host: str
    cpus: tuple[int, ...] = ()  # pinned cores (empty: not pinned)
    gpus: tuple[int, ...] = ()  # this process's GPUs (host numbering)
    visible_gpus: tuple[int, ...] = ()  # the replica's GPUs: CUDA_VISIBLE_DEVICES
    env: Mapping[str, str] = field(default_factory=dict)
    host_local_rank: int | None = None  # set when the replica spans hosts (plan_hosts)

    @property
    def identity(self) -> ActorIdentity:
        """Which actor this process is (what its handle, spec and errors name)."""
        return ActorIdentity(
            model=self.model,
            replica_id=self.replica_id,
            rank=self.rank,
            world_size=self.world_size,
            num_replica=self.num_replica,
            host=self.host,
        )

    @property
    def local_rank(self) -> int:
        if self.host_local_rank is not None:
            return self.host_local_rank
        return self.rank  # one host: the rank within the replica is the local rank

    @property
    def device(self) -> str:
        return "cuda" if self.gpus else "cpu"

    @property
    def num_threads(self) -> int | None:
        return len(self.cpus) or None

    def pinning_payload(self) -> dict[str, Any]:
        return {
            "cpus": list(self.cpus),
            "gpus": list(self.gpus),
            "visible_gpus": list(self.visible_gpus),
            "num_threads": self.num_threads,
            "device": self.device,
        }


def relocate(
    unit: Sequence[ProcessAssignment],
    hosts: Sequence[HostResources],
    used: Mapping[str, tuple[Iterable[int], Iterable[int]]],
    *,
    avoid: str,
) -> list[ProcessAssignment] | None:
    """The processes of ``unit`` (a replica, or a model's) moved whole onto another host than
    ``avoid`` with room for them, the first in host file order: each gets as many free cores
    and GPUs there as it had; ``used`` maps a host to the (cpus, gpus) its live actors hold.
    None if no host has room (self-healing after a host is lost: runtime.py)."""
    for host in hosts:
        if host.host == avoid:
            continue
        taken_cpus, taken_gpus = (set(x) for x in used.get(host.host, ((), ())))
        cpus = [c for c in host.cpus if c not in taken_cpus]
        gpus = [g for g in host.gpus if g not in taken_gpus]
        if sum(len(a.cpus) for a in unit) > len(cpus) or sum(len(a.gpus) for a in unit) > len(gpus):
            continue
        if any(not a.cpus and not a.gpus for a in unit) and not (host.cpus or host.gpus):
            continue
        moved = []
        visible = tuple(gpus[: sum(len(a.gpus) for a in unit)])
        for local_rank, a in enumerate(unit):
            mine, cpus = tuple(cpus[: len(a.cpus)]), cpus[len(a.cpus) :]
            own, gpus = tuple(gpus[: len(a.gpus)]), gpus[len(a.gpus) :]
            moved.append(
                replace(
                    a,
                    host=host.host,
                    cpus=mine,
                    gpus=own,
                    visible_gpus=visible if own else (),
                    env=_pinning_env(mine, visible if own else (), bool(host.gpus)),
                    host_local_rank=local_rank if len(unit) < a.world_size else None,
                )
            )
        return moved
    return None


def _pinning_env(cpus: Sequence[int], visible_gpus: Sequence[int], host_has_gpus: bool) -> dict:
    env: dict[str, str] = {}
    if visible_gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in visible_gpus)
    elif host_has_gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU model must not grab a GPU by accident
    if cpus:
        # Read by the worker before it imports anything heavy; the thread counts make torch,
        # OpenMP and MKL use exactly the pinned cores instead of one thread per host core.
        env["CHATLEARN_CPU_AFFINITY"] = ",".join(str(c) for c in cpus)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(len(cpus))
    return env


@dataclass(frozen=True)
class PlacementPlan:
    """Per model (in the order given), its process assignments ordered by (replica, rank)."""

    host: HostResources
    assignments: dict[str, list[ProcessAssignment]]

    def used_cpus(self) -> set[int]:
        return {c for procs in self.assignments.values() for p in procs for c in p.cpus}

    def used_gpus(self) -> set[int]:
        return {g for procs in self.assignments.values() for p in procs for g in p.gpus}


def parse_colocation(value: Any) -> list[list[str]]:
    """`runtime.colocation` (`["a,b", ...]` or `[["a", "b"], ...]`) as lists of model names."""
    groups: list[list[str]] = []
    for item in value or []:
        names = item.split(",") if isinstance(item, str) else list(item)
        names = [n.strip() for n in names if n and n.strip()]
        if names:
            groups.append(names)
    return groups


def _device_groups(
    models: Sequence[ModelResources], colocation: Iterable[Sequence[str]]
) -> list[list[ModelResources]]:
    by_name = {m.name: m for m in models}
    seen: set[str] = set()
    groups: list[list[ModelResources]] = []
    for names in colocation:
        for name in names:
            if name in seen:
                raise PlacementError(
                    f"lists model {name!r} twice",
                    key="runtime.colocation",
                    fix="put each model in at most one colocation group",
                )
            seen.add(name)
        members = [by_name[n] for n in names if n in by_name]
        if members:
            groups.append(members)
    groups.extend([m] for m in models if m.name not in seen)
    return groups


def plan_placement(
    models: Sequence[ModelResources],
    host: HostResources,
    *,
    colocation: Iterable[Sequence[str]] = (),
    reserved_cpus: Iterable[int] = (),
    reserved_gpus: Iterable[int] = (),
    warn_cpu_fallback: bool = True,
) -> PlacementPlan:
    """Assign devices to every process of `models`; `reserved_*` are taken by earlier launches.

    Raises `PlacementError` naming the models and what they need when the request does not fit.
    ``warn_cpu_fallback``: say when GPU requests run on cores (this host's; `plan_hosts`, which
    tries each host, does not: this process cannot tell why another host has no GPU).
    """
    host_has_gpus = bool(host.gpus)
    asking = [m.name for m in models if m.uses_gpu]
    if asking and not host_has_gpus and warn_cpu_fallback:
        # as documented (a CPU-only host meets GPU requests with cores), but a user whose GPUs
        # are not visible (driver, CUDA_VISIBLE_DEVICES, a CPU build of torch) must hear of it
        log.warning(
            "%s %s num_gpu, but this host has no usable CUDA GPU (CUDA_VISIBLE_DEVICES=%s): "
            "%s on CPU cores instead",
            ", ".join(f"models.{name}" for name in asking),
            "asks for" if len(asking) == 1 else "ask for",
            os.environ.get("CUDA_VISIBLE_DEVICES", "unset"),
            "it runs" if len(asking) == 1 else "they run",
        )
    free_cpus = [c for c in host.cpus if c not in set(reserved_cpus)]
    free_gpus = [g for g in host.gpus if g not in set(reserved_gpus)]
    groups = _device_groups(models, colocation)

    def need(m: ModelResources) -> tuple[int, int]:  # (gpus, cpus) of the whole model
        num_processes, _ = m.layout()
        gpus = m.num_gpu if (m.uses_gpu and host_has_gpus) else 0
        return gpus, num_processes * m.cores_per_process(host_has_gpus)

    group_needs = [tuple(max(need(m)[i] for m in g) for i in (0, 1)) for g in groups]
    total_gpus = sum(n[0] for n in group_needs)
    total_cpus = sum(n[1] for n in group_needs)
    if total_gpus > len(free_gpus) or total_cpus > len(free_cpus):
        raise _not_fitting(groups, group_needs, need, host, len(free_gpus), len(free_cpus))

    assignments: dict[str, list[ProcessAssignment]] = {}
    gpu_offset = cpu_offset = 0
    for group, (group_gpus, group_cpus) in zip(groups, group_needs, strict=True):
        for m in group:  # colocated models all start at the group's offset: they share devices
            assignments[m.name] = _assign_model(
                m, host, free_gpus[gpu_offset:], free_cpus[cpu_offset:], host_has_gpus
            )
        gpu_offset += group_gpus
        cpu_offset += group_cpus
    ordered = {m.name: assignments[m.name] for m in models}
    return PlacementPlan(host=host, assignments=ordered)


def _not_fitting(
    groups: Sequence[Sequence[ModelResources]],
    group_needs: Sequence[tuple[int, ...]],
    need: Any,
    host: HostResources,
    free_gpus: int,
    free_cpus: int,
) -> PlacementError:
    """The error of requests that exceed the host, naming the key of the model that overflows."""
    detail = "; ".join(
        f"{'+'.join(m.name for m in g)} needs {n[0]} GPU(s), {n[1]} core(s)"
        for g, n in zip(groups, group_needs, strict=True)
    )
    problem = (
        f"the models do not fit this host ({host.host}: {free_gpus} free GPU(s), "
        f"{free_cpus} free CPU core(s)): {detail}"
    )
    # blame the largest model of the first group that does not fit beside the ones before it
    used_gpus = used_cpus = 0
    culprit, kind = groups[-1][0], 1
    for group, group_need in zip(groups, group_needs, strict=True):
        used_gpus, used_cpus = used_gpus + group_need[0], used_cpus + group_need[1]
        if used_gpus > free_gpus or used_cpus > free_cpus:
            kind = 0 if used_gpus > free_gpus else 1
            culprit = max(group, key=lambda m: need(m)[kind])
            break
    # a GPU request on a CPU-only host is met with cores: num_gpu is still the key to lower
    key = "num_gpu" if kind == 0 or (culprit.uses_gpu and not culprit.num_cpu) else "num_cpu"
    free = f"{free_gpus} GPU(s)" if kind == 0 else f"{free_cpus} core(s)"
    return culprit.error(
        key,
        problem,
        f"lower {key} so that all the models fit in {free}, or let models share devices with "
        "runtime.colocation",
    )


def _assign_model(
    m: ModelResources,
    host: HostResources,
    gpus: Sequence[int],
    cpus: Sequence[int],
    host_has_gpus: bool,
) -> list[ProcessAssignment]:
    num_processes, _ = m.layout()
    cores = m.cores_per_process(host_has_gpus)
    gpp = m.gpu_per_process if (m.uses_gpu and host_has_gpus) else 0
    slots = [
        _Slot(host, tuple(cpus[i * cores : (i + 1) * cores]), tuple(gpus[i * gpp : (i + 1) * gpp]))
        for i in range(num_processes)
    ]
    return _assign_slots(m, slots)


@dataclass(frozen=True)
class _Slot:
    """Where one process of a model goes: a host and the cores and GPUs it gets there."""

    host: HostResources
    cpus: tuple[int, ...]
    gpus: tuple[int, ...]


def _assign_slots(m: ModelResources, slots: Sequence[_Slot]) -> list[ProcessAssignment]:
    """The model's processes, in rank order, on ``slots`` (one per process, in that order).

    A process sees the GPUs of its replica's processes on the same host (CUDA_VISIBLE_DEVICES);
    its local rank counts only those, when the replica spans hosts.
    """
    num_processes, per_replica = m.layout()
    procs: list[ProcessAssignment] = []
    for index in range(num_processes):
        replica_id, rank = divmod(index, per_replica)
        slot = slots[index]
        replica = range(replica_id * per_replica, (replica_id + 1) * per_replica)
        peers = [i for i in replica if slots[i].host is slot.host]
        visible = tuple(g for i in peers for g in slots[i].gpus)
        procs.append(
            ProcessAssignment(
                model=m.name,
                replica_id=replica_id,
                rank=rank,
                world_size=per_replica,
                num_replica=num_processes // per_replica,
                host=slot.host.host,
                cpus=slot.cpus,
                gpus=slot.gpus,
                visible_gpus=visible,
                env=_pinning_env(slot.cpus, visible, bool(slot.host.gpus)),
                host_local_rank=peers.index(index) if len(peers) < per_replica else None,
            )
        )
    return procs


def plan_hosts(
    models: Sequence[ModelResources],
    hosts: Sequence[HostResources],
    *,
    colocation: Iterable[Sequence[str]] = (),
    reserved: Mapping[str, tuple[Iterable[int], Iterable[int]]] | None = None,
) -> PlacementPlan:
    """Multi-host placement: each device group goes whole onto the first host (in host file
    order) with room for it, planned there by `plan_placement`; a single model too large for any
    one host has its processes spread over the hosts in order (its replicas then span hosts).

    `reserved` maps a host name to its (cpus, gpus) taken by earlier launches.
    """
    reserved = dict(reserved or {})
    free = {
        h.host: (
            [c for c in h.cpus if c not in set(reserved.get(h.host, ((), ()))[0])],
            [g for g in h.gpus if g not in set(reserved.get(h.host, ((), ()))[1])],
        )
        for h in hosts
    }
    assignments: dict[str, list[ProcessAssignment]] = {}
    for group in _device_groups(models, colocation):
        placed = None
        for host in hosts:
            cpus, gpus = free[host.host]
            try:
                plan = plan_placement(
                    group,
                    HostResources(host.host, tuple(cpus), tuple(gpus)),
                    colocation=[] if len(group) == 1 else [[m.name for m in group]],
                    warn_cpu_fallback=False,
                )
            except PlacementError:
                continue
            placed = plan
            break
        if placed is None:
            if len(group) > 1:
                names = "+".join(m.name for m in group)
                raise PlacementError(
                    f"colocated models {names} fit on no single host",
                    key="runtime.colocation",
                    fix="give the hosts more slots, or do not colocate these models",
                )
            placed = PlacementPlan(hosts[0], {group[0].name: _spread(group[0], hosts, free)})
        for name, procs in placed.assignments.items():
            assignments[name] = procs
            for proc in procs:
                cpus, gpus = free[proc.host]
                free[proc.host] = (
                    [c for c in cpus if c not in proc.cpus],
                    [g for g in gpus if g not in proc.gpus],
                )
    return PlacementPlan(hosts[0], {m.name: assignments[m.name] for m in models})


def _spread(
    m: ModelResources,
    hosts: Sequence[HostResources],
    free: Mapping[str, tuple[list[int], list[int]]],
) -> list[ProcessAssignment]:
    """One model's processes over several hosts, filling each host in order."""
    num_processes, _ = m.layout()
    slots: list[_Slot] = []
    for host in hosts:
        has_gpus = bool(host.gpus)
        cores = m.cores_per_process(has_gpus)
        gpp = m.gpu_per_process if (m.uses_gpu and has_gpus) else 0
        cpus, gpus = free[host.host]
        fit = min(
            len(cpus) // cores if cores else num_processes,
            len(gpus) // gpp if gpp else num_processes,
        )
        slots.extend(
            _Slot(
                host, tuple(cpus[i * cores : (i + 1) * cores]), tuple(gpus[i * gpp : (i + 1) * gpp])
            )
            for i in range(fit)
        )
    if len(slots) < num_processes:
        raise m.error(
            "",
            f"its {num_processes} processes do not fit the hosts' free slots "
            f"({', '.join(h.host for h in hosts)})",
            "add hosts or slots, or lower num_gpu/num_cpu",
        )
    return _assign_slots(m, slots)
