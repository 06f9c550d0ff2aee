"""chatlearn: ChatLearn's DPO interface on an asyncio + ZeroMQ actor runtime.

Public names are imported lazily so that `import chatlearn` (which every actor process does
before it is pinned to its devices) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "init": "chatlearn.config",
    "get_args": "chatlearn.config",
    "set_args": "chatlearn.config",
    "Config": "chatlearn.config",
    "ConfigError": "chatlearn.config",
    "BaseModule": "chatlearn.actors.module",
    "TorchModule": "chatlearn.actors.module",
    "MegatronModule": "chatlearn.megatron.module",
    "Engine": "chatlearn.engine.engine",
    "DPOEngine": "chatlearn.engine.engine",
    "TrainingInterrupted": "chatlearn.engine.interrupts",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'chatlearn' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
