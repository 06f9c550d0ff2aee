"""LoRA adapters with peft for the trainer: only the adapters train and have optimizer state.

    model_args:  lora: {r: 16, alpha: 32, dropout: 0.05, target_modules: all-linear}
                 (or ChatLearn's `enable_lora: true`, with these defaults; `enable_lora:
                 false` beside the section or in it turns LoRA off; ChatLearn's `lora_dim`
                 and `lora_dropout` are read as r and dropout)

    model = apply_lora(model, lora_settings(model_args))      # a peft model, base frozen
    merged = merged_state_dict(model, full_state_dict)        # HF keys, adapters folded in

The reference is never adapted: it stays the frozen base model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from chatlearn.config.model_args import lora_request
from chatlearn.hf.model import locate_model_args

_PEFT_PREFIX = "base_model.model."


def lora_settings(model_args: Mapping[str, Any]) -> dict[str, Any] | None:
    """The LoRA settings a model's config asks for, or None without LoRA
    (`chatlearn.config.model_args.lora_request`; a mistake is a `ConfigError` naming the key and,
    for a model of the process-wide config, its file and line)."""
    return lora_request(model_args, *locate_model_args(model_args))


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
    """The base model's state dict (Hugging Face keys) with every adapter folded into its layer:
    W + scaling · B @ A. `state` is the peft model's full state dict (e.g. gathered on one rank)."""
    from peft.tuners.lora import LoraLayer

    scaling = {
        name: layer.scaling[adapter]
        for name, layer in model.named_modules()
        if isinstance(layer, LoraLayer)
        for adapter in layer.active_adapters
    }
    merged: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        name = key.removeprefix(_PEFT_PREFIX).replace(".base_layer.", ".")
        layer = key.rsplit(".base_layer.", 1)[0] if ".base_layer." in key else None
        if layer in scaling and key.endswith(".base_layer.weight"):
            a = state[f"{layer}.lora_A.default.weight"]
            b = state[f"{layer}.lora_B.default.weight"]
            value = value + scaling[layer] * (b.float() @ a.float()).to(value.dtype)
        merged[name] = value
    return merged
