"""`megatron_args`: the Megatron-LM argument namespace ChatLearn's Megatron modules read.

ChatLearn ran Megatron-LM's `initialize_megatron(extra_args_provider=module.add_extra_args,
args_dict=module.model_args)` and exposed `get_args()` as `module.megatron_args`. Only
megatron-core is installed here, so the namespace is built the same way from a table of
Megatron-LM's argument defaults:

1. the defaults below (Megatron-LM names, Megatron-LM defaults), then every megatron-core
   `TransformerConfig` field under its own name (when megatron-core is importable),
2. the module's `add_extra_args(parser)` arguments (their defaults),
3. every key of `model_args` (the model config file; unknown keys are kept, as ChatLearn did),
4. the runtime: parallel sizes, world size, rank, micro/global batch sizes,
5. what Megatron-LM's `validate_args` derives: `data_parallel_size`, `ffn_hidden_size`,
   `kv_channels`, `num_query_groups`, `max_position_embeddings`/`seq_length`, `params_dtype`,
   `padded_vocab_size`.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from chatlearn.megatron.gpt import padded_vocab_size

__all__ = ["MEGATRON_LM_DEFAULTS", "build_megatron_args", "extra_arg_defaults"]

# Megatron-LM (megatron/training/arguments.py) names and defaults of the arguments ChatLearn's
# example modules and configs use.
MEGATRON_LM_DEFAULTS: dict[str, Any] = {
    # model
    "num_layers": None,
    "hidden_size": None,
    "ffn_hidden_size": None,
    "num_attention_heads": None,
    "kv_channels": None,
    "group_query_attention": False,
    "num_query_groups": 1,
    "seq_length": None,
    "max_position_embeddings": None,
    "position_embedding_type": "learned_absolute",
    "rotary_base": 10000,
    "rotary_percent": 1.0,
    "normalization": "LayerNorm",
    "norm_epsilon": 1e-5,
    "swiglu": False,
    "add_bias_linear": True,
    "add_qkv_bias": False,
    "untie_embeddings_and_output_weights": False,
    "make_vocab_size_divisible_by": 128,
    "hidden_dropout": 0.1,
    "attention_dropout": 0.1,
    "init_method_std": 0.02,
    "apply_query_key_layer_scaling": False,
    "attention_softmax_in_fp32": False,
    "use_flash_attn": False,
    "num_experts": None,
    # training
    "micro_batch_size": None,
    "global_batch_size": None,
    "train_iters": None,
    "lr": None,
    "min_lr": 0.0,
    "lr_decay_style": "linear",
    "lr_warmup_iters": 0,
    "weight_decay": 0.01,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_eps": 1e-8,
    "clip_grad": 1.0,
    "bf16": False,
    "fp16": False,
    "seed": 1234,
    "recompute_granularity": None,
    "recompute_method": None,
    "recompute_num_layers": None,
    "sequence_parallel": False,
    "use_distributed_optimizer": False,
    "log_interval": 100,
    # parallelism
    "tensor_model_parallel_size": 1,
    "pipeline_model_parallel_size": 1,
    "virtual_pipeline_model_parallel_size": None,
    "expert_model_parallel_size": 1,
    "distributed_backend": "nccl",
    # checkpoints
    "load": None,
    "save": None,
    "save_interval": None,
    "ckpt_format": "torch_dist",
    "no_load_optim": False,
    "no_load_rng": False,
    "finetune": False,
    "use_checkpoint_args": False,
    # tokenizer
    "tokenizer_type": None,
    "tokenizer_model": None,
    "vocab_file": None,
    "merge_file": None,
    "vocab_size": None,
}


def extra_arg_defaults(module: Any) -> dict[str, Any]:
    """The defaults of the arguments `module.add_extra_args(parser)` adds (argparse dests)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    before = {action.dest for action in parser._actions}
    returned = module.add_extra_args(parser)
    if returned is not None:
        parser = returned  # ChatLearn's hook returns the parser; tolerate one that does not
    defaults = vars(parser.parse_known_args([])[0])
    return {key: value for key, value in defaults.items() if key not in before}


def build_megatron_args(
    model_args: Mapping[str, Any],
    *,
    tensor_model_parallel_size: int,
    pipeline_model_parallel_size: int,
    world_size: int,
    rank: int,
) -> argparse.Namespace:
    """The namespace described in the module docstring (steps 1, 3, 4 and 5).

    `model_args` already holds the extra arguments' defaults and the runtime's batch sizes
    (`MegatronModule.model_args`).
    """
    values: dict[str, Any] = _transformer_config_defaults()
    values.update(MEGATRON_LM_DEFAULTS)
    values.update(model_args)
    values.update(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        world_size=world_size,
        rank=rank,
    )
    _derive(values)
    return argparse.Namespace(**values)


def _derive(values: dict[str, Any]) -> None:
    """Megatron-LM's validate_args for the derived sizes and dtype."""
    model_parallel = values["tensor_model_parallel_size"] * values["pipeline_model_parallel_size"]
    values["data_parallel_size"] = max(1, values["world_size"] // model_parallel)
    if values["global_batch_size"] is None and values["micro_batch_size"] is not None:
        values["global_batch_size"] = values["micro_batch_size"] * values["data_parallel_size"]
    hidden, heads = values["hidden_size"], values["num_attention_heads"]
    if values["ffn_hidden_size"] is None and hidden is not None:
        # swiglu keeps the parameter count of a 4h MLP: 2/3 × 4h, down to a multiple of 64
        values["ffn_hidden_size"] = (
            int(4 * hidden * 2 / 3 / 64) * 64 if values["swiglu"] else 4 * hidden
        )
    if values["kv_channels"] is None and hidden is not None and heads:
        values["kv_channels"] = hidden // heads
    if not values["group_query_attention"] and heads:
        values["num_query_groups"] = heads
    if values["max_position_embeddings"] is None:
        values["max_position_embeddings"] = values["seq_length"]
    if values["seq_length"] is None:
        values["seq_length"] = values["max_position_embeddings"]
    values["params_dtype"] = (
        torch.bfloat16 if values["bf16"] else torch.float16 if values["fp16"] else torch.float32
    )
    if values["vocab_size"] is not None:
        values["padded_vocab_size"] = padded_vocab_size(
            int(values["vocab_size"]),
            int(values["make_vocab_size_divisible_by"]),
            values["tensor_model_parallel_size"],
        )


def _transformer_config_defaults() -> dict[str, Any]:
    """megatron-core's TransformerConfig fields with their defaults ({} without megatron-core)."""
    try:
        from megatron.core.transformer.transformer_config import TransformerConfig
    except ImportError:
        return {}
    defaults: dict[str, Any] = {}
    for field in dataclasses.fields(TransformerConfig):
        if field.default is not dataclasses.MISSING:
            defaults[field.name] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            defaults[field.name] = field.default_factory()
    return defaults
