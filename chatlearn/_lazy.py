"""Lazy public names for a package's ``__init__``: imported on first use, not with the package.

`import chatlearn` (and `chatlearn.actors`, which every actor process imports before it pins
itself to its devices) must not import torch or start threads, so the packages re-export their
public names through a module-level ``__getattr__`` (PEP 562) instead of importing them.

A leaf below every layer (tests/test_layers.py): it imports only the standard library.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, exports: Mapping[str, Iterable[str]], namespace: dict[str, Any]
) -> tuple[list[str], Callable[[str], Any], Callable[[], list[str]]]:
    """``__all__``, ``__getattr__`` and ``__dir__`` for `package`, whose public names are
    `exports` (module -> the names it defines, each under the same name).

    ``__all__`` is every exported name, sorted. ``__getattr__(name)`` imports the defining
    module on first use and keeps the value in `namespace` (the package's ``globals()``), so
    later lookups do not reach it; a name not exported is an ``AttributeError``, as for any
    module. ``__dir__()`` lists the package's own names and the exported ones, imported or not.

    Use: ``__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())``.
    """
    defined_in = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> Any:
        module = defined_in.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *defined_in})

    return sorted(defined_in), __getattr__, __dir__
