"""megatron-core's parallel state on the process group the actor runtime already formed.

The runtime starts one process per model rank and initializes `torch.distributed` (gloo on CPU,
NCCL on GPU) before `setup()`. This module splits that world into tensor-, pipeline- and
data-parallel groups from the model's config, seeds megatron's RNG trackers, and answers the
questions the engine asks a rank: which data-parallel rank am I, and do I return outputs?

Rank layout. Ranks are ordered tensor-parallel fastest, then pipeline, then data parallel
(megatron order "tp-cp-ep-pp-dp", Megatron-LM's `--use-tp-pp-dp-mapping`): the ranks of one
model replica are contiguous, so `data_parallel_rank == rank // (tp * pp)` — the formula
chatlearn's BaseModule uses — and megatron agrees with it. Within a replica the output rank
(`is_last_rank()`) is the last tensor-parallel rank of the last pipeline stage, i.e. the last rank
of the replica; with one data-parallel rank that is the global last rank, as in ChatLearn.

Usage, inside a model process:

    state = initialize_parallel_state(ParallelLayout.from_config(module_args, world_size), seed=1)
    state.data_parallel_rank, state.data_parallel_size, is_last_rank()
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from chatlearn.megatron.compat import apply_cpu_compat
from chatlearn.megatron.requirement import require_megatron

__all__ = [
    "MEGATRON_RANK_ORDER",
    "ParallelLayout",
    "ParallelState",
    "RankCoordinates",
    "current_parallel_state",
    "destroy_parallel_state",
    "ensure_single_process_group",
    "initialize_parallel_state",
    "is_last_rank",
    "seed_parallel_rngs",
]

# tensor parallel fastest, data parallel slowest: a replica's ranks are contiguous.
MEGATRON_RANK_ORDER = "tp-cp-ep-pp-dp"


class RankCoordinates(NamedTuple):
    tensor: int
    pipeline: int
    data: int


@dataclass(frozen=True, slots=True)
class ParallelLayout:
    """How `world_size` ranks split into tensor × pipeline × data parallel."""

    world_size: int
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1

    def __post_init__(self) -> None:
        for key in ("world_size", "tensor_model_parallel_size", "pipeline_model_parallel_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if self.world_size % self.model_parallel_size:
            raise ValueError(
                f"world size {self.world_size} is not divisible by tensor_model_parallel_size "
                f"({self.tensor_model_parallel_size}) × pipeline_model_parallel_size "
                f"({self.pipeline_model_parallel_size}) = {self.model_parallel_size}; change the "
                f"model's device count or its parallel sizes so that it is"
            )

    @classmethod
    def from_config(cls, module_args: Any, world_size: int) -> ParallelLayout:
        """From a model's config section (`tensor_model_parallel_size`, ...; default 1)."""
        return cls(
            world_size=world_size,
            tensor_model_parallel_size=_int_option(module_args, "tensor_model_parallel_size"),
            pipeline_model_parallel_size=_int_option(module_args, "pipeline_model_parallel_size"),
        )

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // self.model_parallel_size

    def coordinates(self, rank: int) -> RankCoordinates:
        """(tensor, pipeline, data) ranks of a global rank, in MEGATRON_RANK_ORDER."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside [0, {self.world_size})")
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        return RankCoordinates(rank % tp, (rank // tp) % pp, rank // (tp * pp))

    def is_last_rank(self, rank: int) -> bool:
        """True for the one rank per data-parallel rank that returns the replica's outputs."""
        coords = self.coordinates(rank)
        return (
            coords.pipeline == self.pipeline_model_parallel_size - 1
            and coords.tensor == self.tensor_model_parallel_size - 1
        )


@dataclass(frozen=True, slots=True)
class ParallelState:
    """This rank's place in the layout, as megatron-core's parallel state reports it."""

    layout: ParallelLayout
    rank: int
    tensor_model_parallel_rank: int
    pipeline_model_parallel_rank: int
    data_parallel_rank: int
    seed: int | None

    @property
    def data_parallel_size(self) -> int:
        return self.layout.data_parallel_size

    @property
    def tensor_model_parallel_size(self) -> int:
        return self.layout.tensor_model_parallel_size

    @property
    def pipeline_model_parallel_size(self) -> int:
        return self.layout.pipeline_model_parallel_size

    @property
    def is_first_stage(self) -> bool:
        return self.pipeline_model_parallel_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pipeline_model_parallel_rank == self.layout.pipeline_model_parallel_size - 1

    def is_last_rank(self) -> bool:
        return self.layout.is_last_rank(self.rank)


_STATE: ParallelState | None = None


def initialize_parallel_state(layout: ParallelLayout, *, seed: int | None = None) -> ParallelState:
    """Build megatron's groups on the initialized default process group; optionally seed.

    Applies the CPU compatibility layer first when CUDA is unavailable. Idempotent for the same
    layout; a different layout while one is active is an error (destroy it first).
    """
    global _STATE
    require_megatron("chatlearn.megatron.parallel")
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialized: megatron's parallel state is built on the "
            "model's process group, which the actor runtime forms before setup() "
            "(outside it, call torch.distributed.init_process_group first)"
        )
    world_size = torch.distributed.get_world_size()
    if layout.world_size != world_size:
        raise ValueError(
            f"layout is for {layout.world_size} ranks but the process group has {world_size}"
        )
    apply_cpu_compat()
    from megatron.core import parallel_state as mpu

    if _STATE is not None and mpu.model_parallel_is_initialized():
        if _STATE.layout != layout:
            raise RuntimeError(
                f"megatron parallel state is already initialized as {_STATE.layout}; call "
                f"destroy_parallel_state() before initializing {layout}"
            )
    else:
        mpu.initialize_model_parallel(
            tensor_model_parallel_size=layout.tensor_model_parallel_size,
            pipeline_model_parallel_size=layout.pipeline_model_parallel_size,
            order=MEGATRON_RANK_ORDER,
        )
    rank = torch.distributed.get_rank()
    state = ParallelState(
        layout=layout,
        rank=rank,
        tensor_model_parallel_rank=mpu.get_tensor_model_parallel_rank(),
        pipeline_model_parallel_rank=mpu.get_pipeline_model_parallel_rank(),
        data_parallel_rank=mpu.get_data_parallel_rank(),
        seed=seed,
    )
    # megatron built the groups; they must agree with the layout chatlearn reasons with.
    expected = layout.coordinates(rank)
    actual = RankCoordinates(
        state.tensor_model_parallel_rank,
        state.pipeline_model_parallel_rank,
        state.data_parallel_rank,
    )
    assert actual == expected, f"megatron placed rank {rank} at {actual}, expected {expected}"
    _STATE = state
    if seed is not None:
        seed_parallel_rngs(seed)
    return state


def ensure_single_process_group() -> None:
    """Initialize a one-rank default group if none exists (megatron needs one even alone).

    The actor runtime forms a group only for models with several ranks; a single-rank megatron
    model gets an in-memory store here instead of a TCP rendezvous.
    """
    dist = torch.distributed
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def seed_parallel_rngs(seed: int) -> None:
    """Seed Python, numpy and torch, then megatron's RNG trackers (as Megatron-LM does).

    The CPU seed is the same on every tensor-parallel and data-parallel rank, so that every rank
    builds the same unsplit initial weights; pipeline stages get `seed + 100 * stage` (different
    layers). The tracker's model-parallel state differs per tensor-parallel rank (dropout inside
    tensor-parallel regions); on CPU the tracker is the compatibility layer's CPU tracker.
    """
    state = current_parallel_state()
    require_megatron("chatlearn.megatron.parallel")
    from megatron.core import tensor_parallel

    stage_seed = seed + 100 * state.pipeline_model_parallel_rank
    random.seed(stage_seed)
    try:
        import numpy as np

        np.random.seed(stage_seed % 2**32)
    except ImportError:  # numpy is a dependency, but seeding must not fail without it
        pass
    torch.manual_seed(stage_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)


def current_parallel_state() -> ParallelState:
    """The state built by `initialize_parallel_state` in this process."""
    if _STATE is None:
        raise RuntimeError("megatron parallel state is not initialized in this process")
    return _STATE


def is_last_rank() -> bool:
    """Whether this rank returns outputs: the last rank of its model-parallel replica.

    Without an initialized parallel state (a single process), the only rank is the last one.
    """
    if _STATE is None:
        return True
    return _STATE.is_last_rank()


def destroy_parallel_state() -> None:
    """Tear down megatron's groups (tests and re-initialization); the default group stays."""
    global _STATE
    _STATE = None
    try:
        from megatron.core import parallel_state as mpu
    except ImportError:
        return
    mpu.destroy_model_parallel()


def _int_option(section: Any, key: str) -> int:
    if section is None:
        return 1
    value = _lookup(section, key)
    if value is None:  # ChatLearn also reads parallel sizes from the model's config file
        model_args = _lookup(section, "model_args")
        value = _lookup(model_args, key) if model_args is not None else None
    if value is None:
        return 1
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"models.<name>.{key} must be an integer, got {value!r}")
    return value


def _lookup(section: Any, key: str) -> Any:
    if isinstance(section, Mapping):
        return section.get(key)
    return getattr(section, key, None)
