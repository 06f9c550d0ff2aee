"""chatlearn: ChatLearn's DPO interface on an asyncio + ZeroMQ actor runtime.

Public names are imported lazily so that `import chatlearn` (which every actor process does
before it is pinned to its devices) does not import torch.
"""

from __future__ import annotations

from chatlearn._lazy import lazy_exports

__version__ = "0.1.0"

# module -> the public names it defines
_EXPORTS: dict[str, tuple[str, ...]] = {
    "chatlearn.config": ("init", "get_args", "set_args", "Config", "ConfigError"),
    "chatlearn.actors.module": ("BaseModule", "TorchModule"),
    "chatlearn.megatron.module": ("MegatronModule",),
    "chatlearn.engine.engine": ("Engine", "DPOEngine"),
    "chatlearn.engine.interrupts": ("TrainingInterrupted",),
}

__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
