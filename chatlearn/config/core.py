"""`Config`: the whole configuration of a run, its cross-key checks, and its wire form.

A Config is built from a YAML-shaped mapping (`runtime_env`, `models`, `runtime` sections), from
a config file (`chatlearn.config.load_config`), or in code. The coordinator ships it to every
actor process as `to_dict()` (plain msgpack-able types only) and the actor rebuilds it with
`Config.from_dict()`. `validate()` runs at init and again before `learn()`, since code may change
the config in between; every problem is a `ConfigError` that names the file and line the value
came from, the key path, and the fix.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import loader
from .errors import ConfigError, logger
from .model_args import MODEL_ARG_KEYS
from .schema import (
    CHATLEARN_ONLY_KEYS,
    CHATLEARN_REPLACED_KEYS,
    LORA_MODEL_KEYS,
    PROGRAM_KEYS,
    SECTIONS,
    read_quoted_number,
)
from .sections import Locator, ModelConfig, RuntimeConfig, RuntimeEnvConfig, Section

_PLAIN_SCALARS = (str, int, float, bool, bytes, type(None))
# (file:line, key path) of the unknown keys already warned about: once per process, however
# often the config is built again (init, validate, actors)
_warned_keys: set[tuple[str, str]] = set()


class Config:
    """The global config: `runtime_args`, `models` (name → ModelConfig), `env_args`, `config_dir`.

    `Config(param_dict, config_dir)` builds and validates from a YAML-shaped mapping, like
    ChatLearn's; `model_config_file` paths are resolved against `config_dir` (default: the working
    directory), and a model's inline `model_args:` mapping is merged over its file's contents.
    Unknown top-level sections are kept in `extra` (with a warning, or an error when the name is a
    near miss of a real section such as `model:`).
    """

    def __init__(
        self,
        param_dict: Mapping[str, Any] | None = None,
        config_dir: str | os.PathLike[str] | None = None,
        *,
        config_file: str | os.PathLike[str] | None = None,
        origins: Mapping[str, str] | None = None,
        warn: bool = True,
        validate: bool = True,
    ) -> None:
        self.config_file = os.fspath(config_file) if config_file is not None else None
        self.config_dir = os.fspath(config_dir) if config_dir is not None else None
        self._locator = Locator(origins, loader.display_name(self.config_file))
        self._shipped = False  # set by from_dict: model_args are complete, files not re-read
        self.runtime_args = RuntimeConfig()
        self.env_args = RuntimeEnvConfig()
        self.models: dict[str, ModelConfig] = {}
        self.extra: dict[str, Any] = {}
        # ChatLearn's `get_args().active_module_args`: in a model's process, that model's
        # `models.<name>` section (set before its `setup()`, as ChatLearn's `model_setup` does),
        # so code that does not hold the module (a helper, a layer factory) can read its
        # settings, e.g. `.lora`; None in the coordinator, where no model is set up
        self.active_module_args: ModelConfig | None = None
        self.runtime_args._attach("runtime", self._locator)
        self.env_args._attach("runtime_env", self._locator)
        if param_dict is not None:
            self._build(param_dict, warn=warn)
        if validate:
            self.validate()

    # -- building ----------------------------------------------------------------------------------
    def _build(self, data: Mapping[str, Any], *, warn: bool) -> None:
        where = self._locator.where
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"expected a mapping of sections, got a {type(data).__name__}",
                where=where(""),
                fix="pass a dict such as {'runtime': {...}, 'models': {...}}",
            )
        runtime_key = "runtime"
        for key in data:
            if key in SECTIONS:
                continue
            if key == "rlhf":  # ChatLearn's old name of runtime
                if "runtime" in data:
                    raise ConfigError(
                        "both rlhf: and runtime: are given",
                        where=where("rlhf"),
                        key="rlhf",
                        fix="merge rlhf: into runtime: (rlhf is the old name of runtime)",
                    )
                logger.warning("%s: section rlhf is deprecated; name it runtime", where("rlhf"))
                runtime_key = "rlhf"
                continue
            if key == "includes":
                raise ConfigError(
                    "includes are read from config files only",
                    where=where("includes"),
                    key="includes",
                    fix="merge the included settings into the dict, or use load_config(file)",
                )
            # a misspelled section would silently drop everything in it
            near = difflib.get_close_matches(str(key), [*SECTIONS, "includes"], n=1, cutoff=0.75)
            if near:
                raise ConfigError(
                    "unknown section",
                    where=where(str(key)),
                    key=str(key),
                    fix=f"rename it to {near[0]}:",
                )
            if warn:
                logger.warning(
                    "%s: unknown top-level section %r kept in Config.extra (known sections: %s)",
                    where(str(key)),
                    key,
                    ", ".join(SECTIONS),
                )
            self.extra[str(key)] = data[key]
        self.env_args._load(self._section(data, "runtime_env"))
        self.runtime_args._load(self._section(data, runtime_key))
        for name, values in self._section(data, "models").items():
            self._add_model(name, values)
        if warn:
            self._warn_unknown_keys()

    def _section(self, data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
        value = data.get(key)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self._locator.error(
                key,
                f"expected a mapping of key: value, got {type(value).__name__}",
                f"write `{key}:` followed by indented `key: value` lines",
            )
        return value

    def _add_model(self, name: Any, values: Any) -> None:
        path = f"models.{name}"
        if not isinstance(name, str) or not name:
            raise self._locator.error(path, "model names must be strings", "quote the name")
        if values is None:
            values = {}
        if not isinstance(values, Mapping):
            raise self._locator.error(
                path,
                f"expected a mapping of the model's keys, got {type(values).__name__}",
                f"write `{name}:` followed by indented keys such as num_gpu: 1",
            )
        values = dict(values)
        if "num_device" in values:
            num_device = values.pop("num_device")
            if "num_gpu" in values and values["num_gpu"] != num_device:
                raise self._locator.error(
                    f"{path}.num_device",
                    f"num_device ({num_device}) and num_gpu ({values['num_gpu']}) disagree",
                    "keep only num_gpu (num_device is ChatLearn's old name for it)",
                )
            values.setdefault("num_gpu", num_device)
            self._locator.origins.setdefault(
                f"{path}.num_gpu", self._locator.where(f"{path}.num_device")
            )
        model = ModelConfig()
        model._attach(path, self._locator)
        object.__setattr__(model, "_runtime", self.runtime_args)
        object.__setattr__(model, "_config_dir", self.config_dir)
        inline_args = values.pop("model_args", None)
        model._load(values)
        if inline_args is not None and not isinstance(inline_args, Mapping):
            model.model_args = inline_args  # raises the type error with its location
        if self._shipped and inline_args is not None:
            model.model_args = inline_args  # to_dict() already holds the file's contents
        else:
            model_args: dict[str, Any] = {}
            if model.model_config_file:
                found = self._model_file(path, model.model_config_file)
                model_args = self._load_model_file(path, found)
                # ChatLearn keeps the path it read (config_dir joined with the name, e.g.
                # configs/model.yaml), so a program can open the file itself
                model._store("model_config_file", _as_opened(found))
            # `model_args:` written inline extends (and overrides) the model config file
            model_args = loader.deep_merge(model_args, inline_args or {})
            for key, spec in MODEL_ARG_KEYS.items():
                if key in model_args:  # `learning_rate: "1e-5"` read as ChatLearn reads it
                    value = read_quoted_number(spec, model_args[key])
                    if spec.kind == "int" and isinstance(value, float) and value.is_integer():
                        # `max_length: 1e3` (a float in YAML) is a whole number, and kept as
                        # one: the tokenizer slices by it ("slice indices must be integers")
                        value = int(value)
                    model_args[key] = value
            model.model_args = model_args
        self.models[name] = model

    def _model_file(self, path: str, file_name: str) -> Path:
        key = f"{path}.model_config_file"
        where = self._locator.where(key)
        # ChatLearn resolves it against the main config's directory; where it is not there, it
        # is looked for beside the file that names it (an example's config, included by one's
        # own elsewhere). `where` is that file's name as messages give it, with its line.
        written_in = Path(where.rpartition(":")[0] or where)
        return loader.resolve_path(
            file_name,
            Path(self.config_dir or os.getcwd()),
            where=where,
            key=key,
            what="model config file",
            beside=written_in.parent if written_in.is_file() else None,
        )

    def _load_model_file(self, path: str, found: Path) -> dict[str, Any]:
        data, origins = loader.load_file(found, Path(self.config_dir or os.getcwd()))
        for sub_path, origin in origins.items():
            # a key also written inline (`model_args:`, recorded when the config was read)
            # takes the inline value (see `_add_model`), and so keeps the inline place
            self._locator.origins.setdefault(f"{path}.model_args.{sub_path}", origin)
        return data

    def _warn_unknown_keys(self) -> None:
        """Unknown keys are kept (programs read their own settings) but logged once each, with
        the place they were written: a typo would otherwise silently leave the default."""
        sections: list[Section] = [self.runtime_args, self.env_args, *self.models.values()]
        for section in sections:
            for key in section._values:
                if key not in section._KEYS:
                    self._warn_unknown_key(section, key)

    def _warn_unknown_key(self, section: Section, key: str) -> None:
        kind = section._path.partition(".")[0]
        if key in PROGRAM_KEYS.get(kind, ()):
            return
        if kind == "runtime" and key == "query_key" and section._values[key] == "query":
            # ChatLearn's default, in every config of its (`${query_key:query}`): nothing to say
            # of it being unread (data with a "query" field is its own one-line error)
            return
        path = section._key_path(key)
        where = self._locator.where(path)
        if (where, path) in _warned_keys:
            return
        _warned_keys.add((where, path))
        if kind == "models" and key == "lora":
            why = (
                "ChatLearn's LoRA section: chatlearn.hf's HFDPOTrainer applies it when its "
                "enable_lora is true (lora_dim as r, lora_scaling as alpha, lora_dropout, every "
                "linear layer; part_module_name, lora_layer and column_only_qkv are not read) "
                "unless model_args set lora or enable_lora; other modules see it as "
                "self.enable_lora and self.module_args.lora; MegatronModule has no LoRA"
            )
        elif kind == "models" and key in LORA_MODEL_KEYS:
            why = (
                "not read here (ChatLearn's switch is models.<name>.lora.enable_lora); the "
                "ready-made HF modules read `lora: {r, alpha, dropout, target_modules}` or "
                "`enable_lora` from the model's model_args (its model_config_file)"
            )
        elif key in CHATLEARN_REPLACED_KEYS.get(kind, {}):
            why = f"a ChatLearn setting not read here: {CHATLEARN_REPLACED_KEYS[kind][key]}"
        elif key in CHATLEARN_ONLY_KEYS.get(kind, ()):
            why = "a ChatLearn setting that has no effect in this runtime; kept as given"
        else:
            near = difflib.get_close_matches(
                key, [*section._KEYS, *section._ALIASES], n=1, cutoff=0.8
            )
            hint = f"; did you mean {near[0]}?" if near else " (readable with .get())"
            why = f"not a known key, kept as given{hint}"
        logger.warning("%s: %s: %s", where, path, why)

    # -- access ------------------------------------------------------------------------------------
    def where(self, key: str) -> str:
        """The file:line key path `key` was written at (or its closest enclosing section's)."""
        return self._locator.where(key)

    def error(self, key: str, problem: str, fix: str) -> ConfigError:
        """A ConfigError about key path `key` (e.g. `models.policy.model_args.beta`), located at
        the file and line the key was written (or the closest enclosing section)."""
        return self._locator.error(key, problem, fix)

    @property
    def rlhf_args(self) -> RuntimeConfig:
        """ChatLearn's old name of `runtime_args`."""
        return self.runtime_args

    def _attach_models(self) -> None:
        # models may have been added in code (config.models[name] = ModelConfig(...))
        for name, model in self.models.items():
            if not isinstance(model, ModelConfig):
                raise self._locator.error(
                    f"models.{name}",
                    f"expected a ModelConfig, got {type(model).__name__}",
                    "assign ModelConfig(num_cpu=1, ...) or use Config.add_model()",
                )
            if model._locator is not self._locator:
                for key in model._values:
                    self._locator.origins.setdefault(
                        f"models.{name}.{key}", model._locator.where(model._key_path(key))
                    )
                model._attach(f"models.{name}", self._locator)
            object.__setattr__(model, "_runtime", self.runtime_args)
            object.__setattr__(model, "_config_dir", self.config_dir)

    def add_model(self, name: str, /, **keys: Any) -> ModelConfig:
        """Add (or replace) model `name` in code, e.g. add_model("reference", num_cpu=1)."""
        self._add_model(name, keys)
        for key in keys:
            self._locator.mark_code(f"models.{name}.{key}")
        return self.models[name]

    def model(self, name: str) -> ModelConfig:
        """The config of model `name`; a ConfigError listing the known names if there is none."""
        self._attach_models()
        if name in self.models:
            return self.models[name]
        known = ", ".join(sorted(self.models)) or "none (the config has no models: section)"
        near = difflib.get_close_matches(name, list(self.models), n=1)
        hint = f"did you mean {near[0]!r}? Otherwise " if near else ""
        raise ConfigError(
            f"no model named {name!r}; known models: {known}",
            where=self._locator.where("models"),
            key=f"models.{name}",
            fix=f"{hint}add `{name}:` under `models:` (with num_gpu or num_cpu), "
            "or construct the module with a known model name",
        )

    # -- wire form ---------------------------------------------------------------------------------
    def to_dict(self, resolved: bool = False) -> dict[str, Any]:
        """Plain (msgpack-able) form; `from_dict` rebuilds the same config in another process."""
        self._attach_models()
        models = {
            name: {**model.to_dict(resolved), "model_args": model.model_args}
            for name, model in self.models.items()
        }
        data = {
            "runtime_env": self.env_args.to_dict(resolved),
            "runtime": self.runtime_args.to_dict(resolved),
            "models": models,
            "extra": self.extra,
        }
        plain = {key: _plain(value, key, self._locator) for key, value in data.items()}
        plain.update(
            config_dir=self.config_dir,
            config_file=self.config_file,
            origins=dict(self._locator.origins),
        )
        return plain

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], *, validate: bool = True, warn: bool = False
    ) -> Config:
        """Rebuild a config from `to_dict()` output (the form shipped to actor processes).

        Besides the sections, `config_dir` (where model_config_file paths start), `config_file`,
        `origins` and `extra` are read. A model's `model_args` is taken as complete (its
        model_config_file is not read again); a model without `model_args` reads the file.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"expected a mapping of sections, got a {type(data).__name__}",
                where="Config.from_dict",
                fix="pass a dict such as {'runtime': {...}, 'models': {...}}",
            )
        data = dict(data)
        meta = {key: data.pop(key, None) for key in ("config_dir", "config_file", "origins")}
        extra = data.pop("extra", None) or {}
        config = cls(
            None,
            meta["config_dir"],
            config_file=meta["config_file"],
            origins=meta["origins"],
            validate=False,
        )
        config._shipped = True
        config._build(data, warn=warn)
        config.extra.update(extra)
        if validate:
            config.validate()
        return config

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Config):
            return NotImplemented
        # the same settings; where they were written (origins) does not matter
        mine, theirs = self.to_dict(resolved=True), other.to_dict(resolved=True)
        del mine["origins"], theirs["origins"]
        return mine == theirs

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        models = ", ".join(self.models) or "none"
        return f"Config(file={self.config_file!r}, models: {models})"

    # -- validation --------------------------------------------------------------------------------
    def validate(self) -> Config:
        """Check the whole config (again); raise a ConfigError for the first problem found."""
        from .checks import check_config, check_output_paths  # the rules beside this class

        self._attach_models()
        for section in (self.runtime_args, self.env_args, *self.models.values()):
            section._recheck()
        self.to_dict()  # everything must be shippable to the actor processes
        check_config(self)
        if not self._shipped:  # the coordinator's config: outputs are written from here
            check_output_paths(self)
        return self


def _as_opened(found: Path) -> str:
    """A model config file's path as ChatLearn stores it: relative to the working directory when
    the file is under it (`configs/model.yaml`), else absolute."""
    absolute = found.absolute()
    if absolute.is_relative_to(Path.cwd()):
        return os.path.relpath(absolute)
    return str(absolute)


def _plain(value: Any, path: str, locator: Locator) -> Any:
    """A copy of `value` made of msgpack-able types (tuples become lists); else a ConfigError."""
    if isinstance(value, _PLAIN_SCALARS):
        return value
    if isinstance(value, list | tuple):
        return [_plain(item, path, locator) for item in value]
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise locator.error(
                    path, f"key {key!r} is not a string", f"quote the key: '{key}': ..."
                )
            out[key] = _plain(item, f"{path}.{key}", locator)
        return out
    raise locator.error(
        path,
        f"a {type(value).__name__} cannot be sent to the actor processes",
        "use plain values (strings, numbers, booleans, lists, mappings); quote dates",
    )
