"""ChatLearn's module API: `BaseModule` and `TorchModule`, which user models subclass.

Runs on both sides: templates in the coordinator, the live instances in the actor processes.

A module object created in the user's script (the coordinator) is a *template*: its constructor
only reads config, and the runtime uses it for the model's name, class and config. The live
instance is built in the model's actor process(es) with the same `(name, args, replica_id)`
constructor, after the config shipped from the coordinator has been installed; there the runtime
sets its rank and world size, forms the torch.distributed group, and then calls `setup()`.

Lifecycle methods a subclass overrides: `setup()`, `build_dataset(samples, is_eval=False)`,
`forward_step(data, iteration)`, `train_step(data_list, iteration)`, `save_checkpoint(iteration)`,
`load_checkpoint(iteration)`, `before_episode()`, `after_episode()`, `validate()`, and
`onload()`/`offload()` for colocated models; and, in the coordinator on the template before any
process starts, `check_args()` (checks of the model's settings: one line instead of an error from
every process once started) and `setup_allowance()` (the time its setup() may take beyond
`runtime.startup_timeout`, e.g. to read a large checkpoint). The runtime calls them through
`invoke`, which passes `iteration` only if the method declares it (so `forward_step(self, data)`
works too) and keeps the `_iteration` / `_train_iteration` counters.

Checkpoints: the engine calls `save_checkpoint(iteration)` / `load_checkpoint(iteration)` on every
trainer rank with `checkpoint_dir()` set to this rank's own directory of the checkpoint being
written or read (`chatlearn/engine/checkpoint.py` has the layout and the atomic commit). A module
saves whatever it likes there; `TorchModule` saves `self.model`, `self.optimizer`,
`self.scheduler` (those it has) and the torch, numpy and Python RNG states by default. During a
save, `checkpoint_reason` says why the engine saves: "interval" or "step" (periodic), "signal"
(a graceful stop, its time bounded by `stop_timeout`), "end" (the run's last checkpoint) or
"request" (`engine.save_checkpoint()`); None outside the engine's saves. A module may write
costly extras (an export for inference) only at "end" and "request", as `chatlearn.hf` does, and
say their size with `final_checkpoint_extra_bytes()` (counted in the engine's disk-room check).

This module must not import torch at import time: actor processes import it before they are
pinned to their devices. `TorchModule` imports torch inside its methods.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import inspect
import logging
import numbers
import random
import resource
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from chatlearn.actors.errors import ModuleError
from chatlearn.actors.placement import ModelResources, config_value, parse_colocation
from chatlearn.actors.storage import RunStorage, StorageUnavailableError
from chatlearn.actors.timers import Timers

__all__ = [
    "BaseModule",
    "ParallelSize",
    "TorchModule",
    "construct_module",
    "invoke",
    "resume_loads_checkpoint",
]

# lifecycle method -> the counter that supplies (and counts) its `iteration` argument
_ITERATION_COUNTERS: dict[str, str | None] = {
    "forward_step": "_iteration",
    "eval_step": None,
    "train_step": "_train_iteration",
    "save_checkpoint": None,
    "load_checkpoint": None,
}
# ChatLearn advances these counters before the call, the others after it: inside `train_step`
# `self._train_iteration` is already the step's iteration + 1 (its decorator increments it before
# calling), while inside `forward_step` `self._iteration` is the call's own iteration. A module
# that reads the counter instead of declaring `iteration` sees the number it saw there.
_COUNTED_BEFORE_THE_CALL = frozenset({"train_step"})


class BaseModule:
    """Base class of every model: ChatLearn's attributes, helpers and lifecycle hooks."""

    def __init__(self, name: str, args: Any = None, replica_id: int = 0) -> None:
        self.name = name
        if args is None:
            from chatlearn.config import get_args

            args = get_args()
        self.global_args = args
        self._module_args = _model_section(args, name)
        self.replica_id = replica_id
        self.trainable = bool(config_value(self._module_args, "trainable", False))
        self._logger = logging.getLogger(f"ChatLearn-{name}")
        self._padding_config: dict[str, dict[str, Any]] = {}
        # Counters the runtime keeps: forward calls, optimizer steps, current episode.
        self._iteration = 0
        self._train_iteration = 0
        self._episode_id = 0
        self._resume_training = False
        # ChatLearn's runtime_args.consumed_samples at the start of a model's processes (what its
        # data checkpoint restores); None: the config's value
        self._start_consumed_samples: int | None = None
        # Set by the runtime in the actor process (the template keeps the defaults).
        self._rank = 0
        self._world_size = 1
        self._num_replica: int | None = None
        self._peak_memory = 0.0
        self._checkpoint_dir: Path | None = None  # set by the engine around save/load calls
        # inside a `save_checkpoint` the engine runs, why it saves: "interval" or "step" (the
        # periodic ones), "signal" (a graceful stop), "end" (the run's last) or "request"
        # (`engine.save_checkpoint()`); None when the module's own code calls it
        self.checkpoint_reason: str | None = None
        self._is_colocate: bool | None = None  # set_colocate's; else from runtime.colocation
        # ChatLearn's metric hooks: dicts appended by the module's steps, reduced (mean) into
        # the trainer's step metrics as `<prefix>/<key>` (`get_and_clear_metrics`)
        self._metric_prefix = ""
        self._metric_list: list[dict[str, Any]] = []
        # ChatLearn's switch, from the model's `lora:` sub-config (`module_args.lora`)
        lora = config_value(self._module_args, "lora", None)
        self.enable_lora = (
            bool(lora.get("enable_lora", False)) if isinstance(lora, Mapping) else False
        )

    # -- config views ----------------------------------------------------------------------
    @property
    def runtime_args(self) -> Any:
        """The `runtime:` section of the config."""
        return config_value(self.global_args, "runtime_args")

    def get_runtime_args(self) -> Any:
        """`runtime_args` as a method, as ChatLearn's BaseModule has it."""
        return self.runtime_args

    @property
    def module_args(self) -> Any:
        """This model's `models.<name>` section (num_gpu, trainable, ...)."""
        return self._module_args

    @property
    def model_args(self) -> dict[str, Any]:
        """The parsed `models.<name>.model_config_file` (a dict; empty without one)."""
        value = config_value(self._module_args, "model_args", None)
        return value if value is not None else {}

    # -- placement views -------------------------------------------------------------------
    @property
    def num_replica(self) -> int:
        if self._num_replica is None:
            self._num_replica = ModelResources.from_config(
                self.name, self._module_args
            ).num_replica()
        return self._num_replica

    @property
    def rank(self) -> int:
        """Rank within this replica's torch.distributed group."""
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def data_parallel_size(self) -> int:
        """Data-parallel ranks inside this replica (its world size over tensor × pipeline)."""
        return max(1, self._world_size // self._model_parallel_size())

    @property
    def data_parallel_rank(self) -> int:
        return self._rank // self._model_parallel_size()

    def _model_parallel_size(self) -> int:
        tp = config_value(self._module_args, "tensor_model_parallel_size", 1)
        pp = config_value(self._module_args, "pipeline_model_parallel_size", 1)
        return max(1, min(self._world_size, int(tp) * int(pp)))

    def is_last_rank(self) -> bool:
        return self._rank == self._world_size - 1

    def get_rank(self) -> int:
        """ChatLearn's name of `rank`."""
        return self.rank

    @property
    def is_colocate(self) -> bool:
        """Whether this model shares its devices with others (``runtime.colocation``)."""
        if self._is_colocate is not None:  # set_colocate's
            return self._is_colocate
        groups = parse_colocation(config_value(self.runtime_args, "colocation", None))
        return any(self.name in group and len(group) > 1 for group in groups)

    def set_colocate(self, flag: bool) -> None:
        self._is_colocate = bool(flag)

    @property
    def parameter_sync_frequency(self) -> int:
        """ChatLearn's ``models.<name>.sync_frequency`` (1 unless set; no effect here)."""
        return int(config_value(self._module_args, "sync_frequency", 1) or 1)

    @property
    def resume_training(self) -> bool:
        return self._resume_training

    # -- helpers ---------------------------------------------------------------------------
    def get_and_clear_metrics(self) -> tuple[str, dict[str, float]]:
        """ChatLearn's: the prefix and the mean of each number the dicts in `_metric_list` hold
        (one-element tensors included), emptying the list."""
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for metrics in self._metric_list or ():
            if not isinstance(metrics, Mapping):
                continue
            for key, value in metrics.items():
                number = as_number(value)
                if number is not None:
                    sums[str(key)] = sums.get(str(key), 0.0) + number
                    counts[str(key)] = counts.get(str(key), 0) + 1
        self._metric_list = []
        return self._metric_prefix, {key: sums[key] / counts[key] for key in sums}

    def add_padding_config(
        self,
        key: str,
        value: float = 0.0,
        padding_type: str = "right",
        *,
        padding_value: float | None = None,
    ) -> None:
        """Pad `key` with `value` on the `padding_type` side when batching (default: right, 0).

        `padding_value=` is accepted as ChatLearn's spelling of `value`.
        """
        if padding_type not in ("right", "left"):
            raise ValueError(f"padding_type must be 'right' or 'left', got {padding_type!r}")
        pad = value if padding_value is None else padding_value
        self._padding_config[key] = {"padding_value": pad, "padding_type": padding_type}

    def padding_config(self) -> dict[str, dict[str, Any]]:
        return dict(self._padding_config)

    def peak_memory(self) -> float:
        """Peak memory of this process in GiB (resident set size; CUDA memory in TorchModule)."""
        # ru_maxrss is KiB on Linux, bytes on macOS.
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        gib = rss / (1024**3 if sys.platform == "darwin" else 1024**2)
        self._peak_memory = max(self._peak_memory, gib)
        return self._peak_memory

    def checkpoint_dir(self, iteration: int | None = None) -> Path:
        """This rank's directory in the checkpoint of `iteration` (default: the current one).

        Inside `save_checkpoint`/`load_checkpoint` run by the engine it is the directory being
        written (a staging directory that becomes the checkpoint once every rank is done) or read.
        Elsewhere it is where that checkpoint is:
        `<checkpoint root>/iter_<iteration:07d>/<name>/rank_<rank>`, the root being
        `runtime.data_checkpoint_path` or `output_dir/exp_name/checkpoints`.
        """
        if self._checkpoint_dir is not None:
            return self._checkpoint_dir
        from chatlearn.actors.checkpoint_paths import (
            checkpoint_name,
            checkpoint_root,
            module_checkpoint_dir,
        )

        number = self._train_iteration if iteration is None else iteration
        checkpoint = checkpoint_root(self.runtime_args) / checkpoint_name(number)
        return module_checkpoint_dir(checkpoint, self.name, self.rank)

    def error(self, msg: str = "") -> None:
        """Report a fatal error of this module: logged, then raised to the coordinator."""
        self._logger.error(msg)
        raise ModuleError(f"{self.name}: {msg}")

    def _set_runtime_state(
        self,
        *,
        episode_id: int | None = None,
        iteration: int | None = None,
        train_iteration: int | None = None,
        resume_training: bool | None = None,
        consumed_samples: int | None = None,
    ) -> None:
        """Set the counters from the coordinator (episode start, resume)."""
        if episode_id is not None:
            self._episode_id = episode_id
        if iteration is not None:
            self._iteration = iteration
        if train_iteration is not None:
            self._train_iteration = train_iteration
        if resume_training is not None:
            self._resume_training = resume_training
        if consumed_samples is not None:
            self._start_consumed_samples = consumed_samples

    def _start_state(self) -> dict[str, Any]:
        """The counters a process of this model starts with, set before its ``setup()``: a
        template's, which the engine sets for a resumed run (ChatLearn sets them before
        ``setup()`` too, so a module may load its own checkpoint there)."""
        return {
            "iteration": self._iteration,
            "train_iteration": self._train_iteration,
            "episode_id": self._episode_id,
            "resume_training": self._resume_training,
            "consumed_samples": self._start_consumed_samples,
        }

    # -- ChatLearn's module helpers (issue 16; docs/chatlearn-compat.md) -------------------
    # the run's private directory, set by the runtime in actors on the coordinator's host
    _runtime_dir: Path | None = None

    @property
    def tensor_model_parallel_size(self) -> ParallelSize:
        """Callable, as ChatLearn's method (`self.tensor_model_parallel_size()`), and an int."""
        return ParallelSize(config_value(self._module_args, "tensor_model_parallel_size", 1))

    @property
    def pipeline_model_parallel_size(self) -> ParallelSize:
        return ParallelSize(config_value(self._module_args, "pipeline_model_parallel_size", 1))

    @property
    def expert_model_parallel_size(self) -> ParallelSize:
        return ParallelSize(config_value(self._module_args, "expert_model_parallel_size", 1))

    def get_data_parallel_rank(self) -> int:
        return self.data_parallel_rank

    def get_data_parallel_size(self) -> int:
        return self.data_parallel_size

    @property
    def total_gpu(self) -> int:
        """GPUs of the model (`num_gpu`); 0 for a model on CPU cores."""
        return int(config_value(self._module_args, "num_gpu", 0))

    @property
    def gpu_per_process(self) -> int:
        return int(config_value(self._module_args, "gpu_per_process", 1))

    @property
    def total_cpu(self) -> int:
        """CPU cores of the model (`num_cpu`); 0 for a model on GPUs."""
        return int(config_value(self._module_args, "num_cpu", 0))

    def is_master_node(self) -> bool:
        """Whether this process runs on the coordinator's host (ChatLearn's master node)."""
        return self._runtime_dir is not None

    @property
    def num_gpu_per_replica(self) -> int:
        """GPUs of one replica: all of a trainer's (one replica, data parallel inside), tp × pp
        (× ep, or zero_size) of an inference model's."""
        return self.total_gpu // max(1, self.num_replica)

    @property
    def _num_gpu_per_replica(self) -> int:
        """ChatLearn's attribute name of `num_gpu_per_replica`."""
        return self.num_gpu_per_replica

    @property
    def _runtime_args(self) -> Any:
        """ChatLearn's attribute name of `runtime_args`."""
        return self.runtime_args

    def num_layers(self) -> int | None:
        """ChatLearn's hook for parameter sync between models, which this runtime does not do;
        `MegatronModule` returns `megatron_args.num_layers`, as ChatLearn's does."""
        raise NotImplementedError(
            f"{type(self).__name__}.num_layers() is not provided by BaseModule/TorchModule: it "
            "serves ChatLearn's parameter sync, which this runtime does not do; read the layer "
            "count from your model's config (MegatronModule.num_layers() returns "
            "megatron_args.num_layers)"
        )

    @property
    def config_dir(self) -> str | None:
        """The main config file's directory (None for a config built in code)."""
        return config_value(self.global_args, "config_dir", None)

    @property
    def timers(self) -> Timers:
        """This module's named timers: `self.timers("name").start()` / `.stop()`, `.log()`."""
        timers = self.__dict__.get("_timers")
        if timers is None:
            timers = self.__dict__["_timers"] = Timers()
        return timers

    def put(self, key: str, data: Any) -> None:
        """Store `data` under `key` for every module of the run (see chatlearn.actors.storage)."""
        self._run_storage().put(key, data)

    def get(self, key: str) -> Any:
        """What any module of the run stored under `key` with `put`; KeyError if nothing."""
        return self._run_storage().get(key)

    def _run_storage(self) -> RunStorage:
        runtime_dir = self._runtime_dir
        if runtime_dir is None:
            # the runtime sets _num_replica in every actor; the user's template has none
            where = "on another host than the coordinator" if self._num_replica else "yet"
            raise StorageUnavailableError(
                f"{self.name}: put/get share values through the run's directory on the "
                f"coordinator's host, which this process cannot reach {where}; call them in "
                "the model's methods (setup, forward_step, ...) of a run on one host"
            )
        return RunStorage(runtime_dir)

    # -- lifecycle hooks (override in subclasses) -----------------------------------------
    def setup(self) -> None:
        """Build the model, tokenizer, optimizer. Runs in the actor, after the dist group."""

    def build_dataset(self, train_prompts: list[Any], is_eval: bool = False) -> Any:
        """Return a `torch.utils.data.Dataset` (optionally with `collate_fn`) over the samples."""

    def forward_step(self, data: dict[str, Any], iteration: int = 0) -> dict[str, Any] | None:
        """Inference on one batch; returns batch-first tensors or lists (not merged with input)."""

    def train_step(self, data: list[dict[str, Any]], iteration: int = 0) -> Any:
        """One optimizer step over a list of micro-batches; may return a dict of float metrics."""

    def eval_step(self, data: dict[str, Any]) -> dict[str, Any] | None:
        """Evaluation on one batch."""

    def save_checkpoint(self, iteration: int) -> None:
        """Save model (and optimizer) state for `iteration`."""

    def load_checkpoint(self, iteration: int) -> None:
        """Load the state saved for `iteration`."""

    def final_checkpoint_extra_bytes(self) -> int:
        """Right after a save: the bytes a save at the run's end ("end", also "request") would
        write on this process beyond this one (an export for inference written only then), or
        0 (the default: as many). The engine asks at every save and counts them when it checks,
        at the first checkpoint, that the disk has room for the checkpoints the run will still
        write: a run whose end's export does not fit is told hours before it ends."""
        return 0

    def before_episode(self) -> None:
        """Called at the start of every episode."""

    def after_episode(self) -> None:
        """Called at the end of every episode."""

    def init(self) -> None:
        """Called before ``setup()`` in each of the model's processes, as ChatLearn does (its
        hook to initialise the process's environment)."""

    def validate(self) -> None:
        """Optional checks after ``setup()``, in each of the model's processes; an exception
        ends the run before training starts."""

    def check_args(self) -> None:
        """Checks of this model's settings that need neither its processes nor its files: run
        in the coordinator on the object given to the engine, after the config is validated and
        before any process starts, so a setting the module cannot run is one line in a second,
        not an error from every process once they have started (a model that takes a while to
        load: minutes). Raise ``self.global_args.error(key, problem, fix)``. What needs the
        model's files (on its hosts) or its devices is checked in ``setup``."""

    def setup_allowance(self) -> tuple[float, str]:
        """Seconds this model's ``setup()`` may take beyond ``runtime.startup_timeout``, and why
        (said if it runs out): asked in the coordinator before its processes start (a restarted
        process has the same). 0 by default; the ready-made Hugging Face modules allow for
        reading their checkpoint (chatlearn/hf/base.py)."""
        return 0.0, ""

    def onload(self) -> None:
        """Bring state back to the device (colocated models)."""

    def offload(self) -> None:
        """Free device memory while a colocated model runs."""

    # ChatLearn's memory hooks: `TorchModule`'s offload()/onload() call the ones a module
    # defines, in ChatLearn's order (`_chatlearn_offload`); by default they do nothing.
    def offload_weights(self) -> None:
        """Move or free the weights (when ``module_args.offload_weights``)."""

    def onload_weights(self) -> None:
        """Bring back what ``offload_weights`` moved."""

    def free_grad_buffers(self) -> None:
        """Free the gradient buffers (a trainer, when ``module_args.free_grad_buffers``)."""

    def build_grad_buffers(self) -> None:
        """Rebuild what ``free_grad_buffers`` freed."""

    def offload_main_weights(self) -> None:
        """Move the trainer's main (master) weights (when ``module_args.offload_weights``)."""

    def onload_main_weights(self) -> None:
        """Bring back what ``offload_main_weights`` moved."""

    def offload_optimizer_states(self) -> None:
        """Move the optimizer's states (when ``module_args.offload_optimizer_states``)."""

    def onload_optimizer_states(self) -> None:
        """Bring back what ``offload_optimizer_states`` moved."""


_MEMORY_HOOKS = (
    "offload_weights",
    "onload_weights",
    "free_grad_buffers",
    "build_grad_buffers",
    "offload_main_weights",
    "onload_main_weights",
    "offload_optimizer_states",
    "onload_optimizer_states",
)


def defines_memory_hooks(module: BaseModule) -> bool:
    """Whether the module's class defines any of ChatLearn's memory hooks itself."""
    return any(
        getattr(type(module), hook) is not getattr(BaseModule, hook) for hook in _MEMORY_HOOKS
    )


def _model_section(args: Any, name: str) -> Any:
    """`models.<name>` of the config; a `ConfigError` naming the known models if absent."""
    lookup = getattr(args, "model", None)
    if callable(lookup):
        return lookup(name)  # chatlearn.config.Config: its error names the file and the fix
    models = config_value(args, "models", {})
    if name not in models:
        from chatlearn.config import ConfigError

        raise ConfigError(
            f"no model named {name!r}; known models: {', '.join(sorted(models)) or 'none'}",
            key=f"models.{name}",
            fix=f"add `{name}:` under `models:`, or construct the module with a known name",
        )
    return models[name]


class ParallelSize(int):
    """A parallel size that is an int and also callable: ChatLearn's modules call
    `self.tensor_model_parallel_size()`, code written here reads it as a number."""

    def __call__(self) -> int:
        return int(self)


def construct_module(klass: type, name: str, args: Any, replica_id: int) -> BaseModule:
    """Build the live module in its actor as `klass(name, args=args, replica_id=replica_id)`, or
    as `klass(name)` for a ChatLearn guide's `__init__(self, name)` (the config is installed
    process-wide, so `super().__init__(name)` finds it); otherwise a TypeError that says which
    signature is expected."""
    expected = (
        "define `def __init__(self, name, args=None, replica_id=0)` calling "
        "`super().__init__(name, args, replica_id)` (or `__init__(self, name)` calling "
        "`super().__init__(name)`, or no __init__ at all): the runtime builds each model's "
        "module again in its processes from the name and the config alone"
    )
    try:
        signature: inspect.Signature | None = inspect.signature(klass)
    except (TypeError, ValueError):
        signature = None
    full_call = True
    if signature is not None:
        try:
            signature.bind(name, args=args, replica_id=replica_id)
        except TypeError:
            try:
                signature.bind(name)
            except TypeError:
                raise TypeError(
                    f"{klass.__qualname__}.__init__{signature} cannot be called as "
                    f"{klass.__qualname__}(name, args=..., replica_id=...) nor as "
                    f"{klass.__qualname__}(name); {expected}"
                ) from None
            full_call = False
    if full_call:
        module = klass(name, args=args, replica_id=replica_id)
    else:
        module = klass(name)
    if "_module_args" not in getattr(module, "__dict__", {}):
        raise TypeError(
            f"{klass.__qualname__}.__init__ did not call BaseModule.__init__; {expected}"
        )
    module.replica_id = replica_id
    return module


class TorchModule(BaseModule):
    """A module whose model is plain PyTorch (DDP/FSDP inside the module if it likes)."""

    def peak_memory(self) -> float:
        """Peak CUDA memory allocated in GiB when CUDA is in use, else peak resident memory."""
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            gib = torch.cuda.max_memory_allocated() / 1024**3
            self._peak_memory = max(self._peak_memory, gib)
            return self._peak_memory
        return super().peak_memory()

    def is_last_rank(self) -> bool:
        torch = sys.modules.get("torch")
        if torch is not None and torch.distributed.is_available():
            dist = torch.distributed
            if dist.is_initialized():
                return dist.get_rank() == dist.get_world_size() - 1
        return super().is_last_rank()

    def empty_cache(self) -> None:
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()

    # -- colocated turns (free_memory) ----------------------------------------------------
    def offload(self) -> None:
        """Move the device tensors of `self.model` (parameters, gradients, buffers) and
        `self.optimizer`'s state to CPU and release the cached device memory: the engine calls
        it after this model's turn when colocated models take turns (`free_memory: true`).
        On CPU there is nothing to move: the call happens and changes nothing.

        A module that defines ChatLearn's memory hooks (`offload_weights`, ...) gets those
        called instead, as ChatLearn's TorchModule calls them: it keeps its memory its own way,
        which a move of `self.model` would not know of, or would undo."""
        if defines_memory_hooks(self):
            # once until the next onload(), as a second move finds nothing left to move: a
            # hook that stashes what it frees would lose it to a second call
            if not getattr(self, "_hooks_offloaded", False):
                self._chatlearn_offload()
            return
        moved = list(getattr(self, "_offloaded", []))
        for holder, name, tensor in _device_tensors(self):
            if tensor.device.type != "cpu":
                _put(holder, name, tensor.to("cpu"))
                moved.append((holder, name, tensor.device))
        self._offloaded = moved
        self.empty_cache()

    def onload(self) -> None:
        """Move back what `offload()` moved, each tensor to the device it came from (a module
        with ChatLearn's memory hooks: those, as `offload()`, if it offloaded)."""
        if defines_memory_hooks(self):
            # only after an offload(), as the move below brings back only what it moved: the
            # engine onloads a reference at its first turn and a restarted process, both never
            # offloaded, whose onload hooks had nothing to bring back (or failed looking)
            if getattr(self, "_hooks_offloaded", False):
                self._chatlearn_onload()
            return
        # in offload's order: a parameter's data before its gradient (they must share a device)
        for holder, name, device in getattr(self, "_offloaded", []):
            _put(holder, name, _get(holder, name).to(device))
        self._offloaded = []

    def _chatlearn_offload(self, optimizer_states: bool = True) -> None:
        """ChatLearn's TorchModule.offload(): each hook where its ``module_args`` flag is set
        (``free_memory: true`` sets them all, a trainer's gradients and optimizer included),
        the gradient buffers first to make room, the weights last."""
        args = self.module_args
        if self.trainable:
            if args.free_grad_buffers:
                self.free_grad_buffers()
            if args.offload_weights:
                self.offload_main_weights()
            if optimizer_states and args.offload_optimizer_states:
                self.offload_optimizer_states()
        if args.offload_weights:
            self.offload_weights()
        self._hooks_offloaded = True
        gc.collect()
        self.empty_cache()

    def _chatlearn_onload(self, optimizer_states: bool = True) -> None:
        """ChatLearn's TorchModule.onload(): the weights first, then a trainer's buffers, main
        weights and optimizer states, each where its flag is set."""
        args = self.module_args
        if args.offload_weights:
            self.onload_weights()
        if self.trainable:
            if args.free_grad_buffers:
                self.build_grad_buffers()
            if args.offload_weights:
                self.onload_main_weights()
            if optimizer_states and args.offload_optimizer_states:
                self.onload_optimizer_states()
        self._hooks_offloaded = False
        self.empty_cache()

    # -- checkpoints -----------------------------------------------------------------------
    _CHECKPOINTED = ("model", "optimizer", "scheduler")

    def _checkpointed(self) -> Iterator[tuple[str, Any]]:
        """(name, object) of `self.model/optimizer/scheduler` that have state dicts."""
        for name in self._CHECKPOINTED:
            obj = getattr(self, name, None)
            if callable(getattr(obj, "state_dict", None)) and callable(
                getattr(obj, "load_state_dict", None)
            ):
                yield name, obj

    def save_checkpoint(self, iteration: int) -> None:
        """Save `model.pt`, `optimizer.pt`, `scheduler.pt` (for the attributes the module has)
        and `rng.pt` (torch, CUDA, numpy and Python RNG states) in `checkpoint_dir(iteration)`.

        Every rank saves its own files (ranks' RNG states, and model-parallel shards, differ).
        Override it (and `load_checkpoint`) for other state; call super() to keep this part.
        """
        directory = self.checkpoint_dir(iteration)
        directory.mkdir(parents=True, exist_ok=True)
        saved = dict(self._checkpointed())
        if "model" not in saved:  # a resume would silently start from fresh weights
            self._logger.warning(
                "%s: no self.model with a state_dict(); the checkpoint holds no weights "
                "(override save_checkpoint/load_checkpoint for other layouts)",
                self.name,
            )
        save_rank_state(directory, saved)

    def load_checkpoint(self, iteration: int) -> None:
        """Load what `save_checkpoint` saved (tensors only: `torch.load(weights_only=True)`)."""
        directory = self.checkpoint_dir(iteration)
        if not directory.is_dir():
            raise FileNotFoundError(f"{self.name}: no checkpoint directory {directory}")
        objects = dict(self._checkpointed())
        if "model" in objects and not (directory / "model.pt").is_file():
            raise FileNotFoundError(f"{self.name}: the checkpoint has no {directory / 'model.pt'}")
        load_rank_state(directory, objects, logger=self._logger)


@contextlib.contextmanager
def onloaded_to_save(module: Any) -> Iterator[None]:
    """Around a module's ``save_checkpoint``: a module that ChatLearn's memory hooks offloaded
    (a colocated trainer between turns, `TorchModule.offload`) is onloaded for the save and
    offloaded again, its optimizer states left where they are, as ChatLearn saves it; its
    hooks may have freed the weights the save reads. Others are saved as they are."""
    if not getattr(module, "_hooks_offloaded", False):
        yield
        return
    module._chatlearn_onload(optimizer_states=False)
    try:
        yield
    finally:
        module._chatlearn_offload(optimizer_states=False)


def _device_tensors(module: BaseModule) -> Iterator[tuple[Any, str, Any]]:
    """(holder, name, tensor) of the training state `offload()` moves: the model's parameters
    (`.data`, then `.grad`: a gradient must sit where its parameter does), its buffers, and the
    optimizer's per-parameter state. Lazy, so a gradient is read after its parameter moved."""
    import torch

    model: Any = getattr(module, "model", None)
    if callable(getattr(model, "parameters", None)) and callable(getattr(model, "buffers", None)):
        for parameter in model.parameters():
            yield parameter, "data", parameter.data
            if parameter.grad is not None:
                yield parameter, "grad", parameter.grad
        for buffer in model.buffers():
            yield buffer, "data", buffer.data
    optimizer = getattr(module, "optimizer", None)
    for state in getattr(optimizer, "state", {}).values():
        for key, value in list(state.items()):
            if isinstance(value, torch.Tensor):
                yield state, key, value


def _get(holder: Any, name: str) -> Any:
    return holder[name] if isinstance(holder, dict) else getattr(holder, name)


def _put(holder: Any, name: str, value: Any) -> None:
    if isinstance(holder, dict):
        holder[name] = value
    else:
        setattr(holder, name, value)


# files `TorchModule.save_checkpoint` writes: their presence says the ready-made save ran
_TORCH_MODULE_FILES = ("model.pt", "rng.pt")


def as_number(value: Any) -> float | None:
    """A metric's value as a float: numbers, one-element tensors and numpy scalars; None for
    anything else."""
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "numel", lambda: 1)() == 1:
        value = item()
    return float(value) if isinstance(value, bool | int | float) else None


def resume_loads_checkpoint(module: BaseModule, directory: Path) -> bool:
    """Whether a resume calls `module.load_checkpoint` (ChatLearn's rule): yes where the module's
    class defines its own, or where `TorchModule.save_checkpoint` wrote the checkpoint (it saved
    `model.pt`/`rng.pt`: the default save, or an override calling super()); otherwise (an override
    of `save_checkpoint` only, not calling super(), or no checkpoint methods at all) the resume
    restores the data position and counters only, and the module keeps the weights `setup()`
    built."""
    method = type(module).load_checkpoint
    if method is BaseModule.load_checkpoint:
        return False
    if method is not TorchModule.load_checkpoint:
        return True
    return any((directory / name).is_file() for name in _TORCH_MODULE_FILES)


def save_rank_state(directory: Path, objects: Mapping[str, Any]) -> None:
    """`<name>.pt` with each object's `state_dict()`, and `rng.pt`, in `directory`: what one
    rank saves of its own (modules with other layouts, e.g. sharded models, use it for the rest)."""
    import torch

    for name, obj in objects.items():
        torch.save(obj.state_dict(), directory / f"{name}.pt")
    torch.save(_rng_state(), directory / "rng.pt")


def load_rank_state(
    directory: Path, objects: Mapping[str, Any], *, logger: logging.Logger | None = None
) -> None:
    """Inverse of `save_rank_state` (tensors only: `torch.load(weights_only=True)`); an object
    without its file starts fresh, with a warning."""
    import torch

    for name, obj in objects.items():
        path = directory / f"{name}.pt"
        if not path.is_file():
            # e.g. a scheduler added after the checkpoint was written
            (logger or logging.getLogger(__name__)).warning(
                "no %s in the checkpoint; it starts fresh", path
            )
            continue
        obj.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    rng = directory / "rng.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, map_location="cpu", weights_only=True))


def _rng_state() -> dict[str, Any]:
    """Every random generator a training step may draw from, in tensors and plain types."""
    import torch

    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        kind, keys, pos, has_gauss, cached = numpy.random.get_state()
        # as a tensor: weights_only loading accepts tensors, not numpy arrays
        state["numpy"] = {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype(numpy.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    python = state.get("python")
    if python is not None:
        version, internal, gauss = python
        random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    saved = state.get("numpy")
    numpy = sys.modules.get("numpy")
    if saved is not None and numpy is not None:
        keys = saved["keys"].numpy().astype(numpy.uint32)
        numpy.random.set_state(
            (saved["kind"], keys, saved["pos"], saved["has_gauss"], saved["cached_gaussian"])
        )


class CallClock:
    """What an actor's compute thread runs and since when (`time.monotonic`), read by its
    heartbeats from the event loop's thread: one tuple ``(name, iteration or None, start)``, so
    a reading never pairs one call's name with another's start. `invoke` narrows it to the hook
    it calls (a service call may run several, each its own clock); the enclosing call's clock
    restarts when the hook returns. The label is formatted when read, not per call."""

    __slots__ = ("now",)

    def __init__(self) -> None:
        self.now: tuple[str, int | None, float] | None = None

    def reading(self) -> tuple[str, float] | None:
        """``(label, seconds it has run)`` or None when idle."""
        now = self.now
        if now is None:
            return None
        name, iteration, start = now
        label = name if iteration is None else f"{name} (iteration {iteration})"
        return label, time.monotonic() - start


# the CallClock of the compute thread this code runs on (none elsewhere)
_compute_thread = threading.local()


def set_call_clock(clock: CallClock) -> None:
    """Make `clock` the one `invoke` narrows on this thread (the actor's compute thread)."""
    _compute_thread.clock = clock


def _timed_call(
    fn: Callable[..., Any], name: str, iteration: int | None, args: Any, kwargs: Any
) -> Any:
    """``fn(*args, **kwargs)``, on the compute thread's `CallClock` as ``name`` (per micro-batch:
    a tuple swap, no context manager)."""
    clock: CallClock | None = getattr(_compute_thread, "clock", None)
    if clock is None:
        return fn(*args, **kwargs)
    outer = clock.now
    clock.now = (name, iteration, time.monotonic())
    try:
        return fn(*args, **kwargs)
    finally:
        clock.now = None if outer is None else (outer[0], outer[1], time.monotonic())


# lifecycle methods whose iteration ChatLearn passes by position, not as `iteration=`
_POSITIONAL_ITERATION = ("save_checkpoint", "load_checkpoint")


def _takes_positional(fn: Callable[..., Any]) -> bool:
    """Whether the (bound) method accepts one positional argument."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.VAR_POSITIONAL,
    )
    return any(p.kind in positional for p in parameters)


@functools.lru_cache(maxsize=256)
def _iteration_position(func: Callable[..., Any]) -> int | None:
    """Index of the `iteration` parameter among a method's arguments after self, or None."""
    try:
        names = list(inspect.signature(func).parameters)
    except (TypeError, ValueError):
        return None
    return names.index("iteration") - 1 if "iteration" in names else None


def invoke(module: Any, method: str, args: Any = (), kwargs: Mapping[str, Any] | None = None):
    """Call `module.<method>(*args, **kwargs)` as the runtime does.

    For the lifecycle steps (`forward_step`, `train_step`, `eval_step`, `save_checkpoint`,
    `load_checkpoint`) an `iteration` keyword is passed only if the method declares it; when the
    caller gives none, forward/train steps get the module's own counter, which then advances.
    """
    if not method or method.startswith("__"):
        raise AttributeError(f"{type(module).__name__} has no callable method {method!r}")
    fn = getattr(module, method)
    if not callable(fn):
        raise TypeError(f"{type(module).__name__}.{method} is not callable")
    kwargs = dict(kwargs or {})
    if method in _ITERATION_COUNTERS and isinstance(module, BaseModule):
        counter = _ITERATION_COUNTERS[method]
        iteration = kwargs.pop("iteration", None)
        if iteration is None and counter is not None:
            iteration = getattr(module, counter)
        position = _iteration_position(getattr(fn, "__func__", fn))
        # Passed only if declared, and not when the caller already gave it positionally.
        if iteration is not None and position is not None and position >= len(args):
            kwargs["iteration"] = iteration
        elif (
            iteration is not None
            and position is None
            and not args
            and method in _POSITIONAL_ITERATION
            and _takes_positional(fn)
        ):
            # ChatLearn's engine calls save_checkpoint(iteration) by position: any name works
            args = (iteration,)
        before = method in _COUNTED_BEFORE_THE_CALL
        if counter is not None and before:
            setattr(module, counter, getattr(module, counter) + 1)
        result = _timed_call(fn, method, iteration, args, kwargs)
        if counter is not None and not before:
            setattr(module, counter, getattr(module, counter) + 1)
        return result
    return _timed_call(fn, method, None, args, kwargs)


def setup_allowance(module: BaseModule) -> tuple[float, str]:
    """`module.setup_allowance()`: seconds (a number ≥ 0, numpy's too, or with its reason as a
    pair); anything else one line naming the method (a pair of another size was "not enough
    values to unpack" from the launch)."""
    found = module.setup_allowance()
    seconds, why = found if isinstance(found, tuple) and len(found) == 2 else (found, "")
    if isinstance(seconds, bool) or not isinstance(seconds, numbers.Real) or not seconds >= 0:
        raise TypeError(
            f"{type(module).__name__}.setup_allowance() must give seconds ≥ 0, or (seconds, "
            f"why), not {found!r}"
        )
    return float(seconds), str(why)
