"""Typed config sections with ChatLearn's feel: attribute access, `.get()`, unknown keys kept.

`RuntimeConfig` (the `runtime:` section), `ModelConfig` (one `models.<name>:` entry) and
`RuntimeEnvConfig` (`runtime_env:`) share `Section`: known keys (see `chatlearn.config.schema`)
are checked when set — from YAML or by assignment in code — and have defaults; other keys are
kept as given, readable as attributes and with `.get(key)` (absent → None and a warning, like
ChatLearn). Values the user did not set are not stored, so defaults that depend on other keys
(`train_global_batch_size` = micro, a model's `generation_batch_size` = the runtime's) follow
changes made in code until `learn()`. `to_dict()` holds only what was set; `to_dict(resolved=True)`
shows every known key with its effective value.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any, ClassVar

from .errors import IN_CODE, ConfigError, ValueProblem, logger
from .schema import (
    CHATLEARN_DEFAULTS,
    ENV_KEYS,
    MODEL_KEYS,
    PARALLEL_KEYS,
    RUNTIME_KEYS,
    KeySpec,
    check_value,
    read_quoted_number,
)

_MISSING: Any = object()


class Locator:
    """Where each key path came from ("file:line" or "config built in code"), for messages."""

    def __init__(self, origins: Mapping[str, str] | None = None, config_file: str | None = None):
        self.origins: dict[str, str] = dict(origins or {})
        self.config_file = config_file

    def where(self, path: str) -> str:
        # the key itself, else the closest enclosing section, else the file
        while path:
            if path in self.origins:
                return self.origins[path]
            path = path.rpartition(".")[0]
        return self.config_file or IN_CODE

    def mark_code(self, path: str) -> None:
        self.origins[path] = IN_CODE
        for key in [k for k in self.origins if k.startswith(path + ".")]:
            del self.origins[key]

    def error(self, path: str, problem: str, fix: str) -> ConfigError:
        return ConfigError(problem, where=self.where(path), key=path, fix=fix)


class Section:
    """Base of the config sections: known keys checked, unknown keys kept."""

    _KEYS: ClassVar[dict[str, KeySpec]] = {}
    _ALIASES: ClassVar[dict[str, str]] = {}
    _PATH: ClassVar[str] = ""
    # ChatLearn's keys this runtime does not act on, with ChatLearn's defaults (read when absent)
    _CHATLEARN_DEFAULTS: ClassVar[dict[str, Any]] = {}
    # derived (read-only) attributes that ChatLearn's config classes store like any other, so
    # programs assign them: (what each is derived from, what to set), for an assignment's error
    _DERIVED_FROM: ClassVar[dict[str, tuple[str, str]]] = {}

    def __init__(self, values: Mapping[str, Any] | None = None, /, **kwargs: Any) -> None:
        object.__setattr__(self, "_values", {})
        object.__setattr__(self, "_path", self._PATH)
        object.__setattr__(self, "_locator", Locator())
        for key, value in {**(values or {}), **kwargs}.items():
            setattr(self, key, value)

    # -- loading (keeps the file locations) and attaching to a Config --------------------------
    def _attach(self, path: str, locator: Locator) -> None:
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_locator", locator)

    def _load(self, values: Mapping[str, Any]) -> None:
        """Store a mapping's values (a config file's or dict's): numbers written as strings are
        read as numbers where the key takes one, as ChatLearn reads its files (an assignment in
        code stays strict)."""
        for key, value in values.items():
            spec = self._KEYS.get(self._ALIASES.get(key, key)) if isinstance(key, str) else None
            self._store(key, read_quoted_number(spec, value))

    def _key_path(self, key: str) -> str:
        return f"{self._path}.{key}"

    def _error(self, key: str, problem: str, fix: str) -> ConfigError:
        return self._locator.error(self._key_path(key), problem, fix)

    def _store(self, key: Any, value: Any) -> None:
        if not isinstance(key, str) or not key:
            raise self._locator.error(
                self._path, f"key {key!r} is not a name", "write keys as plain names (strings)"
            )
        key = self._ALIASES.get(key, key)
        if isinstance(getattr(type(self), key, None), property):
            logger.warning(
                "%s: %s is derived from other keys; ignoring the value given",
                self._locator.where(self._key_path(key)),
                self._key_path(key),
            )
            return
        spec = self._KEYS.get(key)
        if spec is not None:
            try:
                value = check_value(key, spec, value)
            except ValueProblem as problem:
                raise self._error(key, problem.problem, problem.fix) from None
        self._values[key] = value

    def _recheck(self) -> None:
        """Check every stored known value again (lists may have been changed in place)."""
        for key in list(self._values):
            if key in self._KEYS:
                self._store(key, self._values[key])

    # -- attribute access ------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        key = self._ALIASES.get(name, name)
        if key in self.__dict__["_values"] or key in self._KEYS:
            return self._resolve(key)
        if key in self._CHATLEARN_DEFAULTS:
            return self._chatlearn_default(key)
        raise AttributeError(
            f"{self._path} has no key {name!r}; use .get({name!r}) for keys that may be absent"
        )

    def __setattr__(self, name: str, value: Any) -> None:
        attr = getattr(type(self), name, None)
        if name.startswith("_") or isinstance(attr, property):
            if isinstance(attr, property) and attr.fset is None:
                self._assign_derived(name, value)
                return
            object.__setattr__(self, name, value)
            return
        self._store(name, value)
        self._locator.mark_code(self._key_path(self._ALIASES.get(name, name)))

    def _assign_derived(self, name: str, value: Any) -> None:
        """An assignment to a derived attribute. ChatLearn's config classes store whatever is
        assigned, and its programs and tests set such values in code (``models["policy"].
        num_replica = 1``): the value the attribute already has is accepted (nothing to do); any
        other would change nothing here, so it is one line saying what to set instead."""
        current = getattr(self, name)
        if value == current:
            return
        derived = self._DERIVED_FROM.get(name)
        if derived is None:
            raise AttributeError(f"{self._path}.{name} is derived from other keys; set those")
        source, fix = derived
        raise ConfigError(
            f"is derived from {source} ({current!r} here), so {value!r} cannot be assigned",
            where=IN_CODE,
            key=self._key_path(name),
            fix=fix,
        )

    def __delattr__(self, name: str) -> None:
        key = self._ALIASES.get(name, name)
        if key not in self._values:
            raise AttributeError(name)
        del self._values[key]  # back to the default

    def _resolve(self, key: str) -> Any:
        if key in self._values:
            return self._values[key]
        return self._default(key)

    def _default(self, key: str) -> Any:
        default = self._KEYS[key].default
        if isinstance(default, list | dict):
            # materialize mutable defaults so that in-place changes are kept
            self._values[key] = copy.deepcopy(default)
            return self._values[key]
        return default

    def _chatlearn_default(self, key: str) -> Any:
        return copy.deepcopy(self._CHATLEARN_DEFAULTS[key])

    def get(self, key: str, default: Any = _MISSING) -> Any:
        """The value of `key`; an absent key gives `default`, or None with a warning."""
        canonical = self._ALIASES.get(key, key)
        if canonical in self._values or canonical in self._KEYS:
            return self._resolve(canonical)
        if canonical in self._CHATLEARN_DEFAULTS:
            return self._chatlearn_default(canonical)
        if default is _MISSING:
            logger.warning("%s not found in %s; using None", key, self._path)
            return None
        return default

    def __contains__(self, key: object) -> bool:
        key = self._ALIASES.get(key, key) if isinstance(key, str) else key
        return key in self._values or key in self._KEYS

    def keys(self) -> list[str]:
        return [*self._KEYS, *(k for k in self._values if k not in self._KEYS)]

    def items(self) -> Iterator[tuple[str, Any]]:
        return ((key, self._resolve(key)) for key in self.keys())

    def is_set(self, key: str) -> bool:
        """Whether `key` was given (in a file or in code) rather than left at its default."""
        return self._ALIASES.get(key, key) in self._values

    def to_dict(self, resolved: bool = False) -> dict[str, Any]:
        """The keys that were set (or, resolved, every key with its effective value)."""
        if resolved:
            return {key: copy.deepcopy(value) for key, value in self.items()}
        return copy.deepcopy(self._values)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self.to_dict(resolved=True) == other.to_dict(resolved=True)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_dict(resolved=True)!r})"

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *self.keys()})

    @property
    def _args_dict(self) -> ArgsDict:
        """ChatLearn's dict of a section (`args.runtime_args._args_dict["data_path"]`): a live
        view over every key, known ones with their effective values; writes go through the
        same checks as attribute assignment."""
        return ArgsDict(self)


class ArgsDict(MutableMapping[str, Any]):
    """A section seen as a dict (see `Section._args_dict`)."""

    def __init__(self, section: Section) -> None:
        self._section = section

    def __getitem__(self, key: str) -> Any:
        if key not in self._section:
            raise KeyError(key)
        return self._section._resolve(self._section._ALIASES.get(key, key))

    def __setitem__(self, key: str, value: Any) -> None:
        setattr(self._section, key, value)

    def __delitem__(self, key: str) -> None:
        try:
            delattr(self._section, key)
        except AttributeError:
            raise KeyError(key) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._section.keys())

    def __len__(self) -> int:
        return len(self._section.keys())

    def __repr__(self) -> str:
        return repr(dict(self))


class RuntimeConfig(Section):
    """The `runtime:` section: episodes, batch sizes, data, outputs, and runtime knobs."""

    _KEYS = RUNTIME_KEYS
    _PATH = "runtime"
    _CHATLEARN_DEFAULTS = CHATLEARN_DEFAULTS["runtime"]

    def _store(self, key: Any, value: Any) -> None:
        if key == "save_interval":
            raise self._error(
                key, "save_interval is no longer supported", "use save_episode_interval (episodes)"
            )
        super()._store(key, value)

    def _default(self, key: str) -> Any:
        if key == "train_global_batch_size":
            return self.train_micro_batch_size
        if key == "pipeline_window":
            return 2 * self.micro_batches_per_step
        return super()._default(key)

    @property
    def micro_batches_per_step(self) -> int:
        """Micro-batches in one optimizer step over all data-parallel ranks (global / micro)."""
        return max(1, self.train_global_batch_size // self.train_micro_batch_size)

    def _resolve(self, key: str) -> Any:
        if key == "output_dir":
            return self.output_path  # as ChatLearn, which rewrites output_dir at init
        return super()._resolve(key)

    @property
    def output_dir_as_given(self) -> str:
        """`output_dir` as written, before ChatLearn's `/exp_name` is appended."""
        return str(super()._resolve("output_dir"))

    @property
    def output_path(self) -> str:
        """Where outputs go: output_dir/exp_name (output_dir itself if it already ends so).

        Reading `output_dir` gives this path too, as in ChatLearn."""
        output_dir, exp_name = self.output_dir_as_given, self.exp_name
        if not exp_name or os.path.basename(os.path.normpath(output_dir)) == exp_name:
            return output_dir
        return os.path.join(output_dir, exp_name)

    @property
    def checkpoint_path(self) -> str:
        """Where the run's checkpoints live: data_checkpoint_path, or output_path/checkpoints."""
        return self.data_checkpoint_path or os.path.join(self.output_path, "checkpoints")

    @property
    def saves_checkpoints(self) -> bool:
        """Whether the run writes checkpoints by itself (so also at its end and on a graceful
        stop)."""
        return bool(self.save_episode_interval or self.save_step_interval)

    def resolve_data_ratio(self, num_datasets: int) -> list[int]:
        """Per-dataset mixing counts for `num_datasets` datasets (ChatLearn's sampler rules)."""
        ratio = self.data_ratio
        if ratio is None or ratio == []:
            return [1] * num_datasets
        if isinstance(ratio, int):
            return [ratio] * num_datasets
        if len(ratio) != num_datasets:
            raise self._error(
                "data_ratio",
                f"has {len(ratio)} entries but {num_datasets} datasets were given",
                f"give one entry per dataset, e.g. data_ratio: {[1] * num_datasets}",
            )
        return list(ratio)


# ChatLearn's sub-configs of a model (its LoraConfig and BatchGenerationConfig, which every model
# has): their fields and defaults; ChatLearn's modules read them by attribute
# (`self.module_args.lora.enable_lora`). This runtime acts on neither here: LoRA is a
# `model_args` setting (chatlearn.hf.lora), batch generation is ChatLearn's vLLM path.
CHATLEARN_SUB_CONFIGS: dict[str, dict[str, Any]] = {
    "lora": {
        "enable_lora": False,
        "part_module_name": None,
        "lora_dim": 8,
        "lora_dropout": 0.0,
        "lora_scaling": 1.0,
        "lora_layer": "ColumnParallelLinear,Embedding,LinearLayer,RowParallelLinear,"
        "VocabParallelEmbedding",
        "column_only_qkv": False,
    },
    "batch_generation": {"ranking": False, "min_prompt_length": 0},
}


class SubConfig(dict[str, Any]):
    """A ChatLearn sub-config as a model section gives it: its defaults updated with what the
    section sets, read by key or by attribute."""

    def __init__(self, path: str, values: Mapping[str, Any]) -> None:
        super().__init__(values)
        self._path = path

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"{self._path} has no key {name!r}") from None


class ModelConfig(Section):
    """One `models.<name>:` entry: devices, processes, parallelism, and `model_args`."""

    _KEYS = MODEL_KEYS
    _ALIASES = {"num_device": "num_gpu"}
    _PATH = "models.?"
    _CHATLEARN_DEFAULTS = {**CHATLEARN_DEFAULTS["models"], "config_dir": None}
    _DERIVED_FROM = {
        "num_replica": (
            "num_cpu and cpu_per_process",
            "set cpu_per_process to num_cpu / the replicas wanted (each replica is one process "
            "of that many cores; a trainer is one replica, its processes data-parallel ranks)",
        ),
    }

    def __init__(self, values: Mapping[str, Any] | None = None, /, **kwargs: Any) -> None:
        object.__setattr__(self, "_model_args", {})
        object.__setattr__(self, "_runtime", None)
        object.__setattr__(self, "_config_dir", None)  # the Config's, set when attached
        super().__init__(values, **kwargs)

    def _chatlearn_default(self, key: str) -> Any:
        # as ChatLearn's validation derives them: free_memory offloads the weights, and a
        # trainer's gradients and optimizer states too
        if key == "offload_weights":
            return self.free_memory
        if key in ("free_grad_buffers", "offload_optimizer_states"):
            return self.free_memory and self.trainable
        if key == "config_dir":
            return self._config_dir
        return super()._chatlearn_default(key)

    def _store(self, key: Any, value: Any) -> None:
        if key in ("model_args", "args_dict"):
            self.model_args = value
            return
        super()._store(key, value)

    def __getattr__(self, name: str) -> Any:
        if name in CHATLEARN_SUB_CONFIGS:
            return self._sub_config(name)
        return super().__getattr__(name)

    def _assign_derived(self, name: str, value: Any) -> None:
        """As ChatLearn takes ``num_replica`` assigned in code: a GPU model's replicas follow
        its GPUs and parallel sizes there too, so another value is ignored (with a warning
        here, silently there: ChatLearn's own tests assign it so); a CPU model's replicas come
        from the assignment there, so here another value is the error saying which keys to
        set."""
        if name == "num_replica" and self.num_gpu > 0 and value != self.num_replica:
            logger.warning(
                "%s: %s = %r ignored: a GPU model's replicas follow num_gpu and the parallel "
                "sizes (%r here), as in ChatLearn, which ignores this assignment too",
                IN_CODE,
                self._key_path(name),
                value,
                self.num_replica,
            )
            return
        super()._assign_derived(name, value)

    def _sub_config(self, name: str) -> SubConfig:
        given = self._values.get(name)
        values = dict(CHATLEARN_SUB_CONFIGS[name])
        if isinstance(given, Mapping):
            values.update(given)
        return SubConfig(self._key_path(name), values)

    @property
    def model_args(self) -> dict[str, Any]:
        """The model's own settings, read from `model_config_file` (module.model_args)."""
        return self._model_args

    @model_args.setter
    def model_args(self, value: Mapping[str, Any]) -> None:
        if not isinstance(value, Mapping):
            raise self._error(
                "model_args", f"expected a mapping, got {type(value).__name__}", "pass a dict"
            )
        object.__setattr__(self, "_model_args", dict(value))

    @property
    def args_dict(self) -> dict[str, Any]:
        """ChatLearn's name of `model_args` (assignable, as ChatLearn's attribute)."""
        return self._model_args

    @args_dict.setter
    def args_dict(self, value: Mapping[str, Any]) -> None:
        self.model_args = value

    def _runtime_args(self) -> RuntimeConfig:
        return self._runtime if self._runtime is not None else RuntimeConfig()

    def _default(self, key: str) -> Any:
        if key in PARALLEL_KEYS:
            # ChatLearn reads Megatron parallel sizes from the model's own config file
            from_file = self._model_args.get(key)
            return from_file if from_file is not None else 1
        if key == "generation_batch_size":
            return self._runtime_args().generation_batch_size
        if key == "cpu_per_process":
            return self.num_cpu or None
        return super()._default(key)

    def _resolve(self, key: str) -> Any:
        value = super()._resolve(key)
        # a null in YAML for these means "unset": fall back to the derived default
        if value is None and key in (*PARALLEL_KEYS, "generation_batch_size", "cpu_per_process"):
            return self._default(key)
        return value

    # -- derived values (read-only) --------------------------------------------------------------
    @property
    def uses_gpu(self) -> bool:
        return self.num_gpu > 0

    @property
    def num_processes(self) -> int:
        """Processes (ranks) of the model: devices / devices per process."""
        if self.num_gpu > 0:
            return self.num_gpu // self.gpu_per_process
        return self.num_cpu // self.cpu_per_process if self.num_cpu > 0 else 0

    @property
    def model_parallel_size(self) -> int:
        return (
            self.tensor_model_parallel_size
            * self.pipeline_model_parallel_size
            * self.expert_model_parallel_size
        )

    @property
    def _parallel_units(self) -> int:
        # GPUs for GPU models (ChatLearn: replicas = GPUs / (tp·pp)); processes for CPU models
        return self.num_gpu if self.num_gpu > 0 else self.num_processes

    @property
    def num_replica(self) -> int:
        """Inference replicas = devices / (tp·pp·ep) (or / zero_size); a trainer is one replica."""
        if self.trainable:
            return 1
        group = self.zero_size if self.zero_size > 1 else self.model_parallel_size
        return max(1, self._parallel_units // group)

    @property
    def data_parallel_size(self) -> int:
        """Data-parallel ranks inside one replica (a trainer's ranks / (tp·pp·ep))."""
        if self.trainable:
            return max(1, self._parallel_units // self.model_parallel_size)
        return self.zero_size if self.zero_size > 1 else 1

    @property
    def forward_chunk_size(self) -> int | None:
        """Rows per `forward_step` call; None means the whole batch in one call."""
        size = self.generation_batch_size
        return size if size is not None and size > 0 else None


class RuntimeEnvConfig(Section):
    """The `runtime_env:` section (Ray's runtime_env in ChatLearn; env_vars reach actors)."""

    _KEYS = ENV_KEYS
    _PATH = "runtime_env"
