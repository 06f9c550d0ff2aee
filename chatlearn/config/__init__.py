"""Configuration: ChatLearn's YAML config (`runtime_env`, `models`, `runtime`) as typed objects.

    import chatlearn
    config = chatlearn.init()                    # -c/--config FILE from sys.argv
    config.runtime_args.train_micro_batch_size   # attribute access; .get(key) for optional keys
    config.model("policy_trainer").num_gpu       # ConfigError naming the known models if absent

Modules: `schema` (every known key, its type and default — the tables are in its docstring),
`loader` (YAML, `${NAME:default}`, includes), `sections` (RuntimeConfig, ModelConfig,
RuntimeEnvConfig), `core` (Config, wire form), `checks` (cross-key rules, output paths),
`model_args` (types of the model_args keys the ready-made modules read), `entry` (init,
get_args, set_args), `report` (an uncaught ConfigError as one line on stderr, exit code 2).

Layer 1 (docs/architecture.md, "Layers"): may import `transport` only.
"""

from __future__ import annotations

from .core import Config
from .entry import config_path_from_argv, get_args, init, load_config, reset_args, set_args
from .errors import ConfigError
from .schema import ENV_KEYS, MODEL_KEYS, RUNTIME_KEYS, KeySpec
from .sections import ModelConfig, RuntimeConfig, RuntimeEnvConfig

__all__ = [
    "ENV_KEYS",
    "MODEL_KEYS",
    "RUNTIME_KEYS",
    "Config",
    "ConfigError",
    "KeySpec",
    "ModelConfig",
    "RuntimeConfig",
    "RuntimeEnvConfig",
    "config_path_from_argv",
    "get_args",
    "init",
    "load_config",
    "reset_args",
    "set_args",
]
