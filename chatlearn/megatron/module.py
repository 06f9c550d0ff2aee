"""`MegatronModule`: ChatLearn's module kind for models built on megatron-core.

"If your DPO model is built on Megatron-LM, inherit MegatronModule." In the model's actor
process(es), before the subclass's own `setup()` body runs, it:

1. applies the CPU compatibility layer when CUDA is unavailable (`chatlearn.megatron.compat`),
2. makes sure a process group exists (the runtime forms one for several ranks; a single-rank
   model gets an in-memory one-rank group),
3. initializes megatron-core's parallel state from the model's config
   (`tensor_model_parallel_size`, `pipeline_model_parallel_size`; data parallel = the rest) and
   seeds Python, numpy, torch and megatron's RNG trackers.

A subclass's `setup()` does not need to call `super().setup()`: `__init_subclass__` wraps it so
the steps above run first, once, as ChatLearn ran its Megatron initialization before the user's
setup. Then `data_parallel_rank` / `data_parallel_size` come from megatron's groups, and
`is_last_rank()` is true on the one rank per data-parallel rank that returns outputs (the last
tensor-parallel rank of the last pipeline stage).

The coordinator's object is a template: it never initializes anything, and before setup the
properties fall back to BaseModule's formulas (which the rank layout matches). Constructing one
without megatron-core installed raises `MegatronNotInstalledError` naming the `megatron` extra.
This module imports neither torch nor megatron at import time (actor processes import it before
pinning).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from chatlearn.actors.module import ParallelSize, TorchModule
from chatlearn.actors.placement import config_value
from chatlearn.megatron.requirement import (
    MEGATRON_EXTRA,
    MegatronNotInstalledError,
    megatron_available,
)

if TYPE_CHECKING:
    from chatlearn.megatron.compat import CompatPatch
    from chatlearn.megatron.parallel import ParallelState

__all__ = ["DEFAULT_SEED", "MegatronModule"]

DEFAULT_SEED = 42  # the config's runtime.seed default
_WRAPPED = "__chatlearn_megatron_setup__"


class MegatronModule(TorchModule):
    """A TorchModule whose processes run megatron-core with its parallel state initialized."""

    def __init__(self, name: str, args: Any = None, replica_id: int = 0) -> None:
        if not megatron_available():
            raise MegatronNotInstalledError(
                f"{type(self).__name__}({name!r}) is a MegatronModule, which needs megatron-core; "
                f"install the extra: pip install 'chatlearn[{MEGATRON_EXTRA}]'"
            )
        super().__init__(name, args, replica_id)
        self._megatron_state: ParallelState | None = None
        self._compat_patches: list[CompatPatch] = []

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        user_setup = cls.__dict__.get("setup")
        if user_setup is not None and not getattr(user_setup, _WRAPPED, False):
            cls.setup = _with_megatron_setup(user_setup)  # type: ignore[method-assign]

    # -- lifecycle -------------------------------------------------------------------------
    def setup(self) -> None:
        """Initialize megatron (see the module docstring); subclasses build their model after."""
        self.setup_megatron()

    def setup_megatron(self) -> ParallelState:
        """Compat layer, process group, parallel state and seeds; idempotent."""
        if self._megatron_state is not None:
            return self._megatron_state
        from chatlearn.megatron.compat import apply_cpu_compat
        from chatlearn.megatron.parallel import (
            ParallelLayout,
            ensure_single_process_group,
            initialize_parallel_state,
        )

        self._compat_patches = apply_cpu_compat()
        if self._world_size <= 1:
            ensure_single_process_group()
        import torch.distributed as dist

        layout = ParallelLayout.from_config(self.module_args, dist.get_world_size())
        self._megatron_state = initialize_parallel_state(layout, seed=self.seed)
        self._logger.info(
            "megatron parallel state: tp=%d pp=%d dp=%d (rank %d: tp %d, pp %d, dp %d); "
            "CPU compat patches: %s",
            layout.tensor_model_parallel_size,
            layout.pipeline_model_parallel_size,
            layout.data_parallel_size,
            self._megatron_state.rank,
            self._megatron_state.tensor_model_parallel_rank,
            self._megatron_state.pipeline_model_parallel_rank,
            self._megatron_state.data_parallel_rank,
            [patch.name for patch in self._compat_patches] or "none",
        )
        return self._megatron_state

    # -- views -----------------------------------------------------------------------------
    @property
    def seed(self) -> int:
        """`seed` from the model config file, else `runtime.seed`, else 42."""
        value = self.model_args.get("seed")
        if value is None:
            value = config_value(self.runtime_args, "seed", DEFAULT_SEED)
        return int(value)

    @property
    def megatron_parallel_state(self) -> ParallelState:
        if self._megatron_state is None:
            raise RuntimeError(f"{self.name}: megatron is initialized in setup(), not yet here")
        return self._megatron_state

    @property
    def cpu_compat_patches(self) -> list[str]:
        """Names of the CPU compatibility patches applied in this process (empty on GPU)."""
        return [patch.name for patch in self._compat_patches]

    @property
    def tensor_model_parallel_size(self) -> ParallelSize:
        """An int, and callable as ChatLearn's `self.tensor_model_parallel_size()`."""
        if self._megatron_state is not None:
            return ParallelSize(self._megatron_state.tensor_model_parallel_size)
        return ParallelSize(config_value(self.module_args, "tensor_model_parallel_size", 1))

    @property
    def pipeline_model_parallel_size(self) -> ParallelSize:
        if self._megatron_state is not None:
            return ParallelSize(self._megatron_state.pipeline_model_parallel_size)
        return ParallelSize(config_value(self.module_args, "pipeline_model_parallel_size", 1))

    def tensor_parallel_rank(self) -> int:
        return self.megatron_parallel_state.tensor_model_parallel_rank

    def pipeline_parallel_rank(self) -> int:
        return self.megatron_parallel_state.pipeline_model_parallel_rank

    @property
    def data_parallel_size(self) -> int:
        if self._megatron_state is not None:
            return self._megatron_state.data_parallel_size
        return super().data_parallel_size

    @property
    def data_parallel_rank(self) -> int:
        if self._megatron_state is not None:
            return self._megatron_state.data_parallel_rank
        return super().data_parallel_rank

    def is_last_rank(self) -> bool:
        """The rank that returns outputs for its data-parallel rank (see the module docstring)."""
        if self._megatron_state is not None:
            return self._megatron_state.is_last_rank()
        return super().is_last_rank()


def _with_megatron_setup(user_setup: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(user_setup)
    def setup(self: MegatronModule, *args: Any, **kwargs: Any) -> Any:
        self.setup_megatron()
        return user_setup(self, *args, **kwargs)

    setattr(setup, _WRAPPED, True)
    return setup
