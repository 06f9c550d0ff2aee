"""ChatLearn's `chatlearn.models`: its module classes under the paths its API reference gives
them (`chatlearn.models.base_module.BaseModule`, `chatlearn.models.torch_module.TorchModule`,
`chatlearn.models.megatron_module.MegatronModule`), the same classes as `chatlearn`'s own.

The rest of ChatLearn's package (its Megatron model code such as `chatlearn.models.megatron.lora`,
its vLLM, DeepSpeed and FSDP modules) is not provided: importing any of it is an ImportError
that says what to use instead, not a bare ModuleNotFoundError (`_NotProvided`, a finder that
answers for this package's other submodule names only).

Layer 4 (docs/architecture.md, "Layers"): its modules re-export `actors` and `megatron` classes.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec
from types import ModuleType

# ChatLearn's module files that exist here too
PROVIDED = frozenset({"base_module", "torch_module", "megatron_module"})

NOT_PROVIDED = (
    "is not provided by this runtime: import the modules from chatlearn or "
    "chatlearn.models.base_module / torch_module / megatron_module (BaseModule, TorchModule, "
    "MegatronModule); LoRA is applied by chatlearn.hf's ready-made modules (model_args.lora), "
    "MegatronModule has none (docs/chatlearn-compat.md)"
)


class _NotProvided(MetaPathFinder):
    """Raises the one-line ImportError for a submodule of this package that is not here."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> ModuleSpec | None:
        prefix = __name__ + "."
        if fullname.startswith(prefix) and fullname[len(prefix) :].split(".")[0] not in PROVIDED:
            raise ImportError(f"{fullname} {NOT_PROVIDED}", name=fullname)
        return None  # the package's own files: the standard finders


if not any(isinstance(finder, _NotProvided) for finder in sys.meta_path):
    sys.meta_path.insert(0, _NotProvided())
