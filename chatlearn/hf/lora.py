"""LoRA adapters with peft for the trainer: only the adapters train and have optimizer state.

    model_args:  lora: {r: 16, alpha: 32, dropout: 0.05, target_modules: all-linear}
                 (or ChatLearn's `enable_lora: true`, with these defaults; `enable_lora:
                 false` beside the section or in it turns LoRA off; ChatLearn's `lora_dim`
                 and `lora_dropout` are read as r and dropout)
    models.<name>.lora: {enable_lora: true, lora_dim: 8, lora_scaling: 1.0, lora_dropout: 0}
                 (ChatLearn's per-model section, used when model_args set neither `lora` nor
                 `enable_lora`: r = lora_dim, alpha = lora_scaling, all linear layers)

    model = apply_lora(model, module_lora_settings(module))   # a peft model, base frozen
    merged = merged_state_dict(model, full_state_dict)        # HF keys, adapters folded in

The reference is never adapted: it stays the frozen base model.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch

from chatlearn.config.errors import located_error
from chatlearn.config.model_args import chatlearn_lora_request, lora_request
from chatlearn.hf.model import locate_model_args

_PEFT_PREFIX = "base_model.model."


def lora_settings(model_args: Mapping[str, Any]) -> dict[str, Any] | None:
    """The LoRA settings a model's config asks for, or None without LoRA
    (`chatlearn.config.model_args.lora_request`; a mistake is a `ConfigError` naming the key and,
    for a model of the process-wide config, its file and line)."""
    return lora_request(model_args, *locate_model_args(model_args))


def module_lora_settings(module: Any) -> dict[str, Any] | None:
    """The LoRA settings of a module: its model_args' (`lora_settings`) when they set `lora` or
    `enable_lora`, else ChatLearn's `models.<name>.lora` section when its `enable_lora` is true
    (`chatlearn.config.model_args.chatlearn_lora_request`)."""
    model_args = module.model_args
    if "lora" in model_args or "enable_lora" in model_args:
        return lora_settings(model_args)
    path = f"models.{module.name}"
    return chatlearn_lora_request(
        module.module_args.lora,
        path,
        functools.partial(located_error, module.global_args),
    )


def apply_lora(model: Any, settings: Mapping[str, Any], *, seed: int = 0) -> Any:
    """`model` with LoRA adapters (a `PeftModelForCausalLM`); base weights frozen.

    The adapters' random init is seeded from `seed` without touching the global RNG state, so
    every rank (and a resumed run) starts from the same adapters.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=int(settings["r"]),
        lora_alpha=settings["alpha"],
        lora_dropout=float(settings["dropout"]),
        target_modules=settings["target_modules"],
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def is_peft_model(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def merged_state_dict(model: Any, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base model's state dict (Hugging Face keys) with every adapter folded into its layer,
    as peft's ``merge_and_unload`` would: W + scaling · B @ A, transposed where peft transposes
    (GPT-2's Conv1D stores its weight as in × out, ``fan_in_fan_out``; an embedding's adapter,
    ``lora_embedding_A/B``, is out × in). `state` is the peft model's full state dict (e.g.
    gathered on one rank); each change is made as its weight is reached, never all at once.
    A layer kind merged otherwise (convolutions, DoRA) is a ValueError: see `unmergeable`."""
    layers = _lora_layers(model)
    merged: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        layer = layers.get(key)
        if layer is not None:
            name, module, adapter = layer
            # two fp32 copies of the weight at most (the change and the sum), never `state`'s
            # own tensor changed in place (it may be the live model's parameter)
            merged_value = value.to(torch.float32, copy=True)
            merged_value.add_(_delta(module, name, adapter, state))
            value = merged_value.to(value.dtype)
        merged[key.removeprefix(_PEFT_PREFIX).replace(".base_layer.", ".")] = value
    return merged


def unmergeable(model: Any) -> list[str]:
    """The adapted layers `merged_state_dict` cannot fold in (kind and name)."""
    return [
        f"{name} ({type(module).__name__})"
        for name, module, adapter in _lora_layers(model).values()
        if _kind(module, adapter) is None
    ]


def _lora_layers(model: Any) -> dict[str, tuple[str, Any, str]]:
    """base weight key -> (layer name, peft layer, active adapter) of every adapted layer."""
    from peft.tuners.lora import LoraLayer

    found = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                found[f"{name}.base_layer.weight"] = (name, module, adapter)
    return found


def _kind(module: Any, adapter: str) -> str | None:
    if getattr(module, "use_dora", {}).get(adapter):
        return None  # a magnitude vector rescales the merged weight
    if adapter in getattr(module, "lora_embedding_A", {}):
        return "embedding"
    lora_a = getattr(module, "lora_A", {})
    if adapter in lora_a and isinstance(lora_a[adapter], torch.nn.Linear):
        return "linear"
    return None


def _delta(module: Any, name: str, adapter: str, state: Mapping[str, torch.Tensor]) -> Any:
    kind = _kind(module, adapter)
    scaling = module.scaling[adapter]
    if kind == "embedding":
        a = state[f"{name}.lora_embedding_A.{adapter}"].float()
        b = state[f"{name}.lora_embedding_B.{adapter}"].float()
        return (b @ a).mul_(scaling).T
    if kind == "linear":
        a = state[f"{name}.lora_A.{adapter}.weight"].float()
        b = state[f"{name}.lora_B.{adapter}.weight"].float()
        delta = (b @ a).mul_(scaling)
        return delta.T if module.fan_in_fan_out else delta
    raise ValueError(
        f"cannot merge the LoRA adapter of {name} ({type(module).__name__}) into its weight; "
        "set merge_lora: false (the adapter is saved either way)"
    )
