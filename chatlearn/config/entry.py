"""`chatlearn.init()`, `get_args()`, `set_args()`: the process-wide config, as in ChatLearn.

`init()` reads only `-c/--config FILE` (also `--config=FILE`, `-cFILE`) from `sys.argv` and leaves
every other argument alone, so a user's own argparse keeps working. Without the flag it builds
the default config (no models). `init(args)` takes a mapping, a `Config`, or a path instead.
Actor processes receive the coordinator's config as `Config.to_dict()` and install it with
`set_args()`, so `get_args()` answers the same everywhere.

`init()` also installs the hook that prints an uncaught `ConfigError` as one line and exits with
code 2 (`chatlearn.config.report`); `init()` itself raises, so scripts that catch it still can.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import loader
from .core import Config
from .errors import ConfigError, logger
from .report import install_excepthook
from .schema import RUNTIME_KEYS

_config: Config | None = None


def config_path_from_argv(argv: Sequence[str] | None = None) -> str | None:
    """The file of the last `-c/--config` in `argv` (default `sys.argv[1:]`), or None."""
    args = list(sys.argv[1:] if argv is None else argv)
    found: str | None = None
    index = 0
    while index < len(args):
        arg = args[index]
        if arg == "--":  # everything after belongs to the program
            break
        if arg in ("-c", "--config"):
            if index + 1 >= len(args) or args[index + 1].startswith("-"):
                raise ConfigError(
                    f"{arg} needs a file",
                    where="command line",
                    key=arg,
                    fix=f"write {arg} path/to/config.yaml",
                )
            found = args[index + 1]
            index += 2
            continue
        if arg.startswith("--config="):
            found = arg.partition("=")[2]
        elif arg.startswith("-c") and not arg.startswith("--") and len(arg) > 2:
            value = arg[3:] if arg[2] == "=" else arg[2:]
            # `-cFILE` as argparse reads it, but only when it is clearly a config file, so a
            # user's own single-dash flag such as `-cuda` is left alone
            if value.endswith((".yaml", ".yml")) or os.path.isfile(value):
                found = value
        index += 1
    if found is not None and not found:
        raise ConfigError(
            "-c/--config was given an empty file name",
            where="command line",
            fix="write --config=path/to/config.yaml",
        )
    return found


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a main config file (with includes and model files); no global state."""
    file = Path(path)
    shown = loader.display_name(file) or str(file)
    if not file.is_file():
        problem = "is a directory, not a file" if file.is_dir() else "not found"
        raise ConfigError(
            f"config file {problem}",
            where=shown,
            fix=f"check the -c/--config path (working directory: {os.getcwd()})",
        )
    config_dir = file.parent.resolve()
    data, origins = loader.load_file(file, config_dir, display=shown)
    if not data:
        logger.warning(
            "%s: the config file holds no settings (empty, or comments only): every default "
            "applies, with no models and runtime.num_episode %s",
            shown,
            RUNTIME_KEYS["num_episode"].default,
        )
    return Config(data, str(config_dir), config_file=str(file.resolve()), origins=origins)


def init(args: Config | Mapping[str, Any] | str | os.PathLike[str] | None = None) -> Config:
    """Load the config and make it the process-wide one that `get_args()` returns.

    `args` None: the `-c/--config` file from `sys.argv` (or defaults without the flag); a mapping:
    YAML-shaped sections built in code; a Config: used as is (validated); a path: that file.
    From now on a ConfigError that the script does not catch is printed as one line (exit 2).
    """
    install_excepthook()
    if args is None:
        path = config_path_from_argv()
        config = load_config(path) if path is not None else Config()
    elif isinstance(args, Config):
        config = args.validate()
    elif isinstance(args, Mapping):
        config = Config(args)
    elif isinstance(args, str | os.PathLike):
        config = load_config(args)
    else:
        raise ConfigError(
            f"init() got a {type(args).__name__}",
            where="chatlearn.init",
            fix="pass nothing (reads -c/--config), a dict of sections, a Config, or a file path",
        )
    set_args(config)
    logger.info(
        "config %s: models %s",
        config.config_file or "built in code",
        ", ".join(config.models) or "none",
    )
    _leave_other_nodes()
    return config


# Set while `chatlearn launch` runs a script: a multi-host run is in progress in this process
# (defined here, below the runtime that reads it too: chatlearn.actors.hosts)
LAUNCH_ENV_VAR = "CHATLEARN_LAUNCH"
_SPAN_HOSTS = (
    "to train on several hosts, run `chatlearn launch --hostfile HOSTS script.py -c "
    "config.yaml` once, on one of them (HOSTS: a `hostname slots=N` line per host)"
)


def node_of_a_job() -> tuple[int, int] | None:
    """(RANK, WORLD_SIZE) when the environment makes this process one node of a job of several,
    as ChatLearn's multi-node jobs start the script on every node (PAI-DLC does, and its
    instructions for other clusters: RANK and WORLD_SIZE exported on each); None otherwise, in
    `chatlearn launch` (which spans hosts itself) and in actor processes (where RANK is the
    process's rank in its model)."""
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if getattr(main_spec, "name", None) == "chatlearn.actors.worker":
        return None
    if os.environ.get(LAUNCH_ENV_VAR):
        return None
    try:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except (KeyError, ValueError):
        return None
    return (rank, world_size) if world_size > 1 else None


def _leave_other_nodes() -> None:
    """In a multi-node job started ChatLearn's way, node 0 runs the training (on its own host:
    this runtime does not take the other nodes so) and the others exit with 0, as ChatLearn's
    init() ends them (once they served node 0's Ray cluster; here there is nothing to serve).
    Each ran the whole training besides, on its host, into the same output directory (there,
    after the first, "in use by another run")."""
    node = node_of_a_job()
    if node is None:
        return
    rank, world_size = node
    if rank > 0:
        logger.warning(
            "RANK=%d of WORLD_SIZE=%d in the environment: a node of a multi-node job, which "
            "this runtime does not join (node 0 runs the training): exiting with 0; %s",
            rank,
            world_size,
            _SPAN_HOSTS,
        )
        sys.exit(0)
    logger.warning(
        "RANK=0 of WORLD_SIZE=%d in the environment: this run trains on this host alone (the "
        "job's other nodes exit); %s",
        world_size,
        _SPAN_HOSTS,
    )


def get_args() -> Config:
    """The process-wide config set by `init()` (or `set_args()` in actor processes)."""
    if _config is None:
        raise ConfigError(
            "no config yet: chatlearn.init() has not been called",
            where="chatlearn.get_args",
            fix="call chatlearn.init() at the start of the main script, before creating modules",
        )
    return _config


def set_args(config: Config | Mapping[str, Any]) -> None:
    """Install `config` (or its `to_dict()` form) as the process-wide config."""
    global _config
    if isinstance(config, Mapping):
        config = Config.from_dict(config)
    if not isinstance(config, Config):
        raise ConfigError(
            f"set_args() got a {type(config).__name__}",
            where="chatlearn.set_args",
            fix="pass a Config or the dict made by Config.to_dict()",
        )
    _config = config


def reset_args() -> None:
    """Forget the process-wide config (for tests)."""
    global _config
    _config = None
