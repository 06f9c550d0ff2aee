"""A model's ranks on one host load its checkpoint one after another when together they would not
fit in the host's memory (``model_args.load_in_turns``), where every rank loads it
(``load_once: false``; by default rank 0 alone does: chatlearn/hf/load_once.py).

Every rank of such a model builds it from the checkpoint in host memory (``from_pretrained``) before
its layout takes it over: moved to the GPU (whole, or unit by unit as FSDP2 shards it), or sharded
in host memory, where each rank keeps 1/N of it. Loaded at once, a host's ranks hold it N times
over for a while: 8 GPUs and a 70B checkpoint in bf16 are 8 × 140 GB of host memory. In turns,
a rank loads only once the one before it has handed its copy over (to its GPU, or to its shard),
so the host holds one whole copy at a time, at the price of N loads one after another instead of
together.

``load_in_turns`` is null by default (auto: in turns when the host's ranks' copies would take more
than `SHARE` of the memory available on it), true or false. The ranks agree on the plan with one
``all_gather`` of (host, memory available, the checkpoint's bytes), then a rank waits at
``turn`` barriers before loading and passes ``turns - turn`` more after handing its copy over:
every rank calls ``turns`` barriers, and barrier ``k`` completes when the host's ``k``-th rank
(counted from 0) has loaded, on every host at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Above this share of the memory available on a host, its ranks load in turns (auto).
SHARE = 0.8
# Bytes per parameter of the dtypes checkpoints are stored in and loaded as.
_ITEM_BYTES = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}
# This process's cgroup (its namespace's root): a memory limit and use, v2 or v1, and the
# inactive file cache among that use (memory.stat beside them).
CGROUP = Path("/sys/fs/cgroup")
_CGROUP_FILES = (
    ("memory.max", "memory.current", "inactive_file"),
    ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "total_inactive_file"),
)
_WEIGHT_NAMES = (
    ("model.safetensors", "model.safetensors.index.json"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json"),
)
_WEIGHT_FILES = ("*.safetensors", "*.bin")


def checkpoint_bytes(model_path: str | Path, dtype: Any = None) -> int:
    """Host memory the model of ``model_path`` takes once loaded (as ``dtype``, if given): its
    weight files' bytes scaled from the dtype they are stored in (config.json's
    ``torch_dtype``) to the one loaded; 0 when the directory has no weight file."""
    directory = Path(model_path).expanduser()
    stored_bytes = sum(f.stat().st_size for f in _weight_files(directory))
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    stored = _ITEM_BYTES.get(_dtype_name(config.get("torch_dtype") or config.get("dtype")), 4)
    return stored_bytes * _loaded_item_bytes(dtype, stored) // stored


def stored_bytes(model_path: str | Path) -> int:
    """The bytes of the weight files ``from_pretrained`` reads from ``model_path`` (0 where there
    are none, or no such directory)."""
    try:
        return sum(f.stat().st_size for f in _weight_files(Path(model_path).expanduser()))
    except OSError:
        return 0


def _loaded_item_bytes(dtype: Any, stored: int) -> int:
    """Bytes a parameter takes loaded as ``dtype`` (`load_causal_lm`'s): any name it accepts
    ("fp32", "bf16", "half": their bytes were the stored dtype's, a 70B in bf16 loaded as fp32
    counted as half its size); without one, from_pretrained's default, float32 before
    transformers 5 and the stored dtype ("auto") since."""
    from chatlearn.hf.model import resolve_dtype

    try:
        resolved = resolve_dtype(dtype)
    except ValueError:  # not one (validate_model_args refuses it first)
        return stored
    if resolved is not None:
        return int(resolved.itemsize)
    if dtype is None:
        import transformers

        if int(str(transformers.__version__).split(".")[0]) < 5:
            return 4
    return stored


def _weight_files(directory: Path) -> list[Path]:
    """The files ``from_pretrained`` loads from ``directory``, as transformers picks them:
    safetensors before pickles, one file or the shards its index names. A Hub download holds
    both formats (and Mistral's consolidated.safetensors beside the shards), a Trainer's
    checkpoint-N directory its optimizer's state (twice the model in fp32), none of it loaded;
    without the usual names, the safetensors files, or else the .bin ones."""
    for single, index in _WEIGHT_NAMES:
        if (directory / single).is_file():
            return [directory / single]
        try:
            weight_map = json.loads((directory / index).read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
            return [directory / n for n in names if (directory / n).is_file()]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    for pattern in _WEIGHT_FILES:
        files = [f for f in directory.glob(pattern) if f.is_file()]
        if files:
            return files
    return []


def available_memory() -> int:
    """Bytes of memory this process's host has available to it: the host's, or less in a
    container whose cgroup limits its memory (Kubernetes, Docker, Slurm: a limit of 256 GB on a
    2 TB host), where psutil reports the host's and a model that "fits" is killed for going over
    the limit. The cgroup's use counts without its inactive file cache, which the kernel
    reclaims before it kills (as ``docker stats`` counts it)."""
    import psutil

    available = int(psutil.virtual_memory().available)
    for limit_file, usage_file, inactive in _CGROUP_FILES:
        try:
            limit = (CGROUP / limit_file).read_text().strip()
            if limit == "max" or int(limit) >= 2**60:  # no limit (v1's is a page-rounded 2**63)
                return available
            usage = int((CGROUP / usage_file).read_text())
        except (OSError, ValueError):
            continue
        try:
            stat = (CGROUP / limit_file).with_name("memory.stat").read_text().split()
            usage -= int(stat[stat.index(inactive) + 1])
        except (OSError, ValueError, IndexError):
            pass
        return max(0, min(available, int(limit) - usage))
    return available


def _dtype_name(dtype: Any) -> str:
    return str(dtype).lower().removeprefix("torch.") if dtype is not None else ""


@dataclass(frozen=True)
class TurnPlan:
    """This rank's place among its host's ranks: it loads after ``turn`` of them, and the
    busiest host has ``turns`` ranks (the barriers every rank passes)."""

    turn: int
    turns: int
    ranks_here: int
    model_bytes: int
    available: int


def plan_turns(
    peers: Sequence[tuple[str, int, int]], rank: int, setting: bool | None
) -> TurnPlan | None:
    """The plan from every rank's (host, memory available, model bytes), or None: load
    together. ``setting``: true, false, or None (auto: when a host's ranks' copies would take
    more than `SHARE` of the memory available there). Every rank computes the same from the
    same list."""
    if setting is False or len(peers) < 2:
        return None
    hosts: dict[str, list[int]] = {}
    for index, (host, _, _) in enumerate(peers):
        hosts.setdefault(host, []).append(index)
    if max(len(ranks) for ranks in hosts.values()) < 2:
        return None  # one rank a host: nothing to take turns with
    if setting is None:
        crowded = any(
            len(ranks) * max(peers[r][2] for r in ranks) > SHARE * min(peers[r][1] for r in ranks)
            for ranks in hosts.values()
            if len(ranks) > 1
        )
        if not crowded:
            return None
    host, _, _ = peers[rank]
    here = hosts[host]
    return TurnPlan(
        turn=here.index(rank),
        turns=max(len(ranks) for ranks in hosts.values()),
        ranks_here=len(here),
        model_bytes=max(peers[r][2] for r in here),
        available=min(peers[r][1] for r in here),
    )


class LoadTurns:
    """``wait()`` before loading, ``done()`` once this rank's copy has left host memory (or
    become its shard); ``done()`` again, or without a plan, does nothing."""

    def __init__(self, plan: TurnPlan | None) -> None:
        self.plan = plan
        self._passed = 0

    @classmethod
    def agree(
        cls, model_args: Mapping[str, Any], name: str, log: logging.Logger, *, hands_over: bool
    ) -> LoadTurns:
        """The plan of this process's model (a collective over its process group), said on
        ``log`` by each host's first rank. ``hands_over``: the layout takes the loaded copy out
        of host memory (to the GPU, or into this rank's shard); without that turns would only
        delay the start."""
        import torch
        import torch.distributed as dist

        from chatlearn.algorithms.collectives import collective_device

        setting = model_args.get("load_in_turns")
        model_path = model_args.get("model_path")
        if not (dist.is_available() and dist.is_initialized()) or not model_path:
            return cls(None)  # one process, or a model built from its config by every rank
        if not hands_over:
            return cls(None)
        if setting is False or dist.get_world_size() < 2:
            return cls(None)
        # numbers, not objects (all_gather_object would unpickle what the peers send): the
        # host as the first 8 bytes of its name's digest
        host = int.from_bytes(hashlib.sha256(socket.gethostname().encode()).digest()[:8], "big")
        mine = [
            host - 2**63,  # into int64
            available_memory(),
            checkpoint_bytes(model_path, model_args.get("dtype")),
        ]
        local = torch.tensor(mine, dtype=torch.int64, device=collective_device())
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, local)
        peers = [(str(h), a, b) for h, a, b in (t.tolist() for t in gathered)]
        plan = plan_turns(peers, dist.get_rank(), setting)
        if plan is not None and plan.turn == 0:
            log.info(
                "%s: its %d ranks on this host load %s one after another (%.3g GiB each, "
                "%.3g GiB of memory available)%s",
                name,
                plan.ranks_here,
                model_path,
                plan.model_bytes / 2**30,
                plan.available / 2**30,
                "" if setting else "; load_in_turns: false loads them together",
            )
        return cls(plan)

    def wait(self) -> None:
        """Wait for this rank's turn."""
        if self.plan is not None:
            self._barriers(self.plan.turn)

    def done(self) -> None:
        """This rank's copy is handed over: the next rank's turn."""
        if self.plan is not None:
            self._barriers(self.plan.turns)

    def _barriers(self, upto: int) -> None:
        import torch.distributed as dist

        while self._passed < upto:
            dist.barrier()
            self._passed += 1
