"""chatlearn: ChatLearn's DPO interface on an asyncio + ZeroMQ actor runtime.

Public names are imported lazily so that `import chatlearn` (which every actor process does
before it is pinned to its devices) does not import torch.
"""

from __future__ import annotations

from typing import Any

from chatlearn._lazy import lazy_exports

__version__ = "0.1.0"

# module -> the public names it defines
_EXPORTS: dict[str, tuple[str, ...]] = {
    "chatlearn.config": ("init", "get_args", "set_args", "Config", "ConfigError"),
    "chatlearn.actors.module": ("BaseModule", "TorchModule"),
    "chatlearn.megatron.module": ("MegatronModule",),
    "chatlearn.engine.engine": ("Engine", "DPOEngine"),
    "chatlearn.engine.interrupts": ("TrainingInterrupted", "TrainingStopped"),
    "chatlearn.utils.logger": ("logger",),
}

__all__, _exported, __dir__ = lazy_exports(__name__, _EXPORTS, globals())

_ONLINE = (
    "ChatLearn's online RL engines and flows: this runtime trains DPO (DPOEngine); write "
    "other flows on Engine (docs/chatlearn-compat.md)"
)
_EVALUATION = (
    "ChatLearn's evaluator: give held-out samples to engine.set_eval_dataset(samples) and "
    "evaluate them in the trainer's eval_step (docs/chatlearn-compat.md)"
)
# ChatLearn's public names for what this runtime does not do: importing one says so, and what
# to use instead, rather than a bare "cannot import name"
NOT_PROVIDED: dict[str, str] = {
    "Evaluator": _EVALUATION,
    "EvalEngine": _EVALUATION,
    "RLHFEngine": _ONLINE,
    "OnlineDPOEngine": _ONLINE,
    "GRPOEngine": _ONLINE,
    "GRPOMathEngine": _ONLINE,
    "Environment": _ONLINE,
    "Trainer": _ONLINE,
    "ControlDependencies": _ONLINE,
    "VLLMModule": "ChatLearn's vLLM generation module: DPO generates nothing; the reference is "
    "a TorchModule or MegatronModule (or chatlearn.hf's HFReference) with forward_step",
    "FSDPModule": "use TorchModule with models.<name>.parallel: fsdp (README: choosing a layout)",
    # the base of ChatLearn's Hugging Face DPO example (examples/huggingface/models/dpo)
    "DeepSpeedModule": "ChatLearn's DeepSpeed module: use chatlearn.hf's HFReference and "
    "HFDPOTrainer (Hugging Face models; ZeRO-3's sharding is models.<name>.parallel: fsdp), or "
    "TorchModule for a model of your own (README: choosing a layout)",
    "get": "Ray's futures: there is no Ray here; engine and module calls return their values",
}


def __getattr__(name: str) -> Any:
    why = NOT_PROVIDED.get(name)
    if why is not None:
        raise ImportError(f"chatlearn.{name} is not provided by this runtime: {why}")
    return _exported(name)
