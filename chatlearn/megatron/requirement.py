"""Whether megatron-core is installed, and the error that says how to install it.

Everything in `chatlearn.megatron` that needs megatron-core calls `require_megatron()` first, so
that a user without the extra gets one clear message naming it instead of a bare
`ModuleNotFoundError: No module named 'megatron'` from deep inside a module's `setup()`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from types import ModuleType

__all__ = [
    "MEGATRON_EXTRA",
    "MegatronNotInstalledError",
    "megatron_available",
    "megatron_version",
    "require_megatron",
]

# The pip extra of this project that brings megatron-core (see pyproject.toml).
MEGATRON_EXTRA = "megatron"
_INSTALL_HINT = f"pip install 'chatlearn[{MEGATRON_EXTRA}]'"


class MegatronNotInstalledError(ImportError):
    """megatron-core is needed for this feature but cannot be imported."""


def megatron_available() -> bool:
    """True when `megatron.core` can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec("megatron.core") is not None
    except ModuleNotFoundError:  # the `megatron` namespace itself is missing
        return False


def megatron_version() -> str | None:
    """The installed megatron-core version, or None."""
    try:
        return importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:
        return None


def require_megatron(feature: str = "chatlearn.megatron") -> ModuleType:
    """Import and return `megatron.core`, or raise `MegatronNotInstalledError` naming the extra."""
    try:
        return importlib.import_module("megatron.core")
    except ImportError as exc:
        raise MegatronNotInstalledError(
            f"{feature} needs megatron-core, which is not installed "
            f"({type(exc).__name__}: {exc}). Install the extra: {_INSTALL_HINT}"
        ) from exc
