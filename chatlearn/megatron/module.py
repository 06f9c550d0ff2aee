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

As in ChatLearn, `model_args` is the model config file plus the defaults of the arguments the
module's `add_extra_args(parser)` adds, with `micro_batch_size` / `global_batch_size` taken from
the runtime (`train_micro_batch_size` / `train_global_batch_size` for a trainable model, the
model's `generation_batch_size` otherwise); `megatron_args` is the Megatron-LM argument
namespace built from it (chatlearn.megatron.args). A `load` key naming a Hugging Face directory
(Llama, Qwen2) or a Megatron torch_dist checkpoint makes `load_pretrained_model()` start from it
(chatlearn.megatron.convert, chatlearn.megatron.dist_ckpt), at any tensor/pipeline split;
`save_dist_checkpoint()` writes a torch_dist checkpoint and `save_hf_checkpoint()` an HF
directory. A model that started from HF (directly, or through a torch_dist checkpoint written
here) also goes back to HF with every `save_checkpoint`: `<checkpoint dir>/hf_model`, written by
the first rank (model config `save_hf_model: false` turns it off).

The coordinator's object is a template: it never initializes anything, and before setup the
properties fall back to BaseModule's formulas (which the rank layout matches). Constructing one
without megatron-core installed raises `MegatronNotInstalledError` naming the `megatron` extra.
This module imports neither torch nor megatron at import time (actor processes import it before
pinning).
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from pathlib import Path
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
        self._own_model_args: dict[str, Any] | None = None
        self._megatron_args: argparse.Namespace | None = None
        self._hf_config: Any = None  # the HF config of the checkpoint load_pretrained_model read

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
        self._megatron_args = self._build_megatron_args()
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

    # -- Megatron-LM arguments ---------------------------------------------------------------
    def add_extra_args(self, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """Override to add the module's own arguments (ChatLearn's hook); return the parser.

        Their defaults fill `model_args` and `megatron_args` where the model config has no value.
        """
        return parser

    @property
    def model_args(self) -> dict[str, Any]:
        """The model config, `add_extra_args` defaults and the runtime's batch sizes (a copy)."""
        if self._own_model_args is None:
            from chatlearn.megatron.args import extra_arg_defaults

            values = {**extra_arg_defaults(self), **super().model_args}
            values.update(self._runtime_batch_sizes(values))
            self._own_model_args = values
        return self._own_model_args

    def _runtime_batch_sizes(self, values: dict[str, Any]) -> dict[str, int]:
        if self.trainable:
            sizes = {
                "micro_batch_size": config_value(self.runtime_args, "train_micro_batch_size"),
                "global_batch_size": config_value(self.runtime_args, "train_global_batch_size"),
            }
        else:
            generation = config_value(self.module_args, "generation_batch_size")
            if generation is None:
                generation = config_value(self.runtime_args, "generation_batch_size")
            sizes = {"micro_batch_size": generation}
        resolved = {key: int(value) for key, value in sizes.items() if value is not None}
        for key, value in resolved.items():
            if values.get(key) not in (None, value):
                self._logger.info(
                    "%s: %s %s of the model config is replaced by the runtime's %d",
                    self.name, key, values[key], value,
                )  # fmt: skip
        return resolved

    @property
    def megatron_args(self) -> argparse.Namespace:
        """Megatron-LM's arguments for this model (ChatLearn's `get_args()`); see args.py."""
        if self._megatron_args is not None:
            return self._megatron_args
        return self._build_megatron_args()  # the template: from the config only

    def num_layers(self) -> int | None:
        """The transformer's layer count (`megatron_args.num_layers`), as ChatLearn's."""
        layers = self.megatron_args.num_layers
        return None if layers is None else int(layers)

    def _build_megatron_args(self) -> argparse.Namespace:
        from chatlearn.megatron.args import build_megatron_args

        return build_megatron_args(
            {**self.model_args, "seed": self.seed},
            tensor_model_parallel_size=int(self.tensor_model_parallel_size),
            pipeline_model_parallel_size=int(self.pipeline_model_parallel_size),
            world_size=max(1, self._world_size),
            rank=self._rank,
        )

    # -- checkpoints -----------------------------------------------------------------------
    def load_pretrained_model(self, params_dtype: str | None = None, model: Any = None) -> Any:
        """A GPTModel holding this rank's shards of the checkpoint named by `load`.

        `load` is a Hugging Face directory (Llama, Qwen2: the architecture comes from its
        config.json) or a Megatron torch_dist checkpoint (a checkpoint directory, or a root with
        `latest_checkpointed_iteration.txt`). A torch_dist checkpoint written by
        `save_dist_checkpoint` from an HF-started model records its HF config and is rebuilt from
        it; for any other (Megatron-LM's) pass the `model` built from your config, and its
        weights are loaded in place. Call it in `setup()` on every rank; the HF config is kept
        for `save_hf_checkpoint`.
        """
        from chatlearn.megatron.convert import (
            build_gpt_model_from_hf,
            is_hf_checkpoint,
            load_hf_checkpoint,
        )
        from chatlearn.megatron.dist_ckpt import (
            is_dist_checkpoint,
            load_dist_checkpoint,
            read_common_state,
            saved_hf_config,
        )

        load = self.megatron_args.load
        if not load:
            raise ValueError(
                f"{self.name}: set `load` in the model config to an HF directory or a Megatron "
                "torch_dist checkpoint"
            )
        dtype = params_dtype or str(self.megatron_args.params_dtype).removeprefix("torch.")
        divisible_by = int(self.model_args.get("make_vocab_size_divisible_by", 1))
        if is_hf_checkpoint(load):
            if model is not None:
                raise ValueError(
                    f"{self.name}: load={load!r} is an HF directory, whose config.json gives the "
                    "architecture; call load_pretrained_model() without a model"
                )
            model, self._hf_config = load_hf_checkpoint(load, dtype, divisible_by)
            return model
        if not is_dist_checkpoint(load):
            raise ValueError(
                f"{self.name}: load={load!r} is neither a Hugging Face checkpoint directory "
                "(config.json with a model_type) nor a Megatron torch_dist checkpoint "
                "(metadata.json, or latest_checkpointed_iteration.txt naming one)"
            )
        if model is None:
            hf_config = saved_hf_config(read_common_state(load))
            if hf_config is None:
                raise ValueError(
                    f"{self.name}: the torch_dist checkpoint {load!r} records no architecture "
                    "(not written by chatlearn from an HF model); build the GPTModel from your "
                    "config and pass it: self.load_pretrained_model(model=model)"
                )
            model = build_gpt_model_from_hf(hf_config, dtype, divisible_by)
            self._hf_config = hf_config
        load_dist_checkpoint(model, load)
        return model

    @property
    def hf_config(self) -> Any:
        """The transformers config of the checkpoint `load_pretrained_model` read, or None."""
        return self._hf_config

    def save_hf_checkpoint(self, model: Any, path: str | Path | None = None) -> Path | None:
        """Write `model` as an HF directory at `path` (default: `save`).

        Every rank of the model replica calls (the shards are gathered over TP and PP); the first
        rank writes and gets the path, the others None.
        """
        from chatlearn.megatron.convert import is_hf_checkpoint, save_hf_checkpoint

        if self._hf_config is None:
            raise RuntimeError(
                f"{self.name}: save_hf_checkpoint needs the HF config of the checkpoint the "
                "model came from (load_pretrained_model from an HF directory, or from a "
                "torch_dist checkpoint saved from one)"
            )
        target = path or self.megatron_args.save
        if not target:
            raise ValueError(f"{self.name}: give a path or set `save` in the model config")
        load = self.megatron_args.load
        source = load if load and is_hf_checkpoint(load) else None
        return save_hf_checkpoint(model, self._hf_config, target, source=source)

    def save_dist_checkpoint(
        self, model: Any, path: str | Path | None = None, iteration: int | None = None
    ) -> Path:
        """Write `model` as a Megatron torch_dist checkpoint under `path` (default: `save`).

        Every rank of the model calls. Megatron-LM's layout: `path/release` (or
        `path/iter_<iteration:07d>`) and `latest_checkpointed_iteration.txt`; the HF config is
        recorded when the model came from one. Returns the checkpoint directory.
        """
        from chatlearn.megatron.dist_ckpt import save_dist_checkpoint

        target = path or self.megatron_args.save
        if not target:
            raise ValueError(f"{self.name}: give a path or set `save` in the model config")
        return save_dist_checkpoint(model, target, iteration=iteration, hf_config=self._hf_config)

    def save_checkpoint(self, iteration: int) -> None:
        """TorchModule's checkpoint, plus `hf_model` (an HF directory) for an HF-started model.

        The HF directory is written by the first rank into its own checkpoint directory
        (`checkpoint_dir(iteration) / "hf_model"`); every rank takes part in the gather. Set
        `save_hf_model: false` in the model config to skip it.
        """
        super().save_checkpoint(iteration)
        model = getattr(self, "model", None)
        if self._hf_config is None or model is None:
            return
        if not self.model_args.get("save_hf_model", True):
            return
        self.save_hf_checkpoint(model, self.checkpoint_dir(iteration) / "hf_model")

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
