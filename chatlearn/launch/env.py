"""The explicit environment of remote actors: an allow list of prefixes plus an env file.

Remote actors do not inherit the coordinator's whole environment (secrets, terminal settings and
host-specific paths must not leak to other hosts). They get the variables whose names start with
one of `DEFAULT_EXPORT_PREFIXES` (or equal one of `DEFAULT_EXPORT_NAMES`), extra prefixes given
with ``--export``, and the ``KEY=VALUE`` lines of an env file (``--env-file``, default
``.chatlearn_env`` in the working directory if it exists), which win over the environment.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from chatlearn.launch.hostfile import HostfileError, read_text_file

__all__ = [
    "DEFAULT_ENV_FILE",
    "DEFAULT_EXPORT_NAMES",
    "DEFAULT_EXPORT_PREFIXES",
    "exported_environment",
    "read_env_file",
]

DEFAULT_EXPORT_PREFIXES = (
    "NCCL_",
    "PYTHON",
    "CUDA_",
    "TORCH_",
    "GLOO_",
    "OMP_",
    "MKL_",
    "HF_",
    "TRANSFORMERS_",
    "CHATLEARN_",
    "UCX_",
)
DEFAULT_EXPORT_NAMES = ("PATH", "LD_LIBRARY_PATH", "VIRTUAL_ENV")
DEFAULT_ENV_FILE = ".chatlearn_env"

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Set by `chatlearn launch` for the coordinator only; never forwarded.
_NEVER_EXPORTED = ("CHATLEARN_LAUNCH",)


def read_env_file(path: str | Path) -> dict[str, str]:
    """``KEY=VALUE`` lines (``#`` comments, blank lines); an error names the line.

    A value with a NUL byte is refused here: no environment can hold it, and every actor given
    it failed at start-up ("embedded null byte") and was restarted as if it had crashed.
    """
    text = read_text_file(path, "env file")
    env: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        name = name.strip()
        if not sep or not _NAME_RE.match(name):
            raise HostfileError(f"{path}:{lineno}: expected KEY=VALUE, got {raw.strip()!r}")
        if "\0" in value:
            raise HostfileError(
                f"{path}:{lineno}: the value of {name} contains a NUL byte, which no "
                "environment variable can hold; remove it"
            )
        env[name] = value.strip()
    return env


def exported_environment(
    environ: Mapping[str, str] | None = None,
    *,
    prefixes: Iterable[str] = (),
    env_file: str | Path | None = None,
) -> dict[str, str]:
    """The variables remote actors get (see the module docstring)."""
    environ = os.environ if environ is None else environ
    allowed = (*DEFAULT_EXPORT_PREFIXES, *prefixes)
    env = {
        k: v
        for k, v in environ.items()
        if (k in DEFAULT_EXPORT_NAMES or k.startswith(allowed)) and k not in _NEVER_EXPORTED
    }
    if env_file is not None:
        env.update(read_env_file(env_file))
    elif Path(DEFAULT_ENV_FILE).is_file():
        env.update(read_env_file(DEFAULT_ENV_FILE))
    return env
