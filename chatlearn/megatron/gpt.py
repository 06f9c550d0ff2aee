"""A megatron-core GPTModel from a few config keys, and its forward to vocab-parallel logits.

The model uses megatron-core's *local* layer spec (`get_gpt_layer_local_spec`): plain PyTorch
modules plus megatron's tensor-parallel linears, no TransformerEngine, so it runs wherever
megatron-core imports — on CPU with the compatibility layer (`chatlearn.megatron.compat`).

    config = GPTConfig.from_model_args(module.model_args)    # vocab_size, hidden_size, ...
    model = build_gpt_model(config)                          # after initialize_parallel_state
    logits = gpt_logits(model, input_ids, attention_mask)    # [B, S, V / tp] on this rank

Call it after `chatlearn.megatron.parallel.initialize_parallel_state` (and its seeding): the
layer shapes come from the tensor-parallel size and, with `use_cpu_initialization`, the initial
weights from the CPU generator, identical on every tensor-parallel layout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from chatlearn.megatron.compat import cpu_config_overrides
from chatlearn.megatron.requirement import require_megatron

__all__ = [
    "GPTConfig",
    "build_gpt_model",
    "causal_attention_mask",
    "gpt_logits",
    "model_device",
    "padded_vocab_size",
    "pipeline_logits",
    "position_ids_for",
]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True, slots=True)
class GPTConfig:
    """The model-config keys (`models.<name>.model_config_file`) a GPTModel is built from."""

    vocab_size: int
    hidden_size: int = 64
    num_layers: int = 2
    num_attention_heads: int = 4
    ffn_hidden_size: int | None = None  # megatron's default: 4 × hidden_size
    max_position_embeddings: int = 512
    position_embedding_type: str = "rope"  # or "learned_absolute"
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    init_method_std: float = 0.02
    params_dtype: str = "float32"
    # Megatron-LM pads the vocabulary to a multiple of this × tensor_model_parallel_size. 1 keeps
    # a vocabulary that tp divides unpadded, so the softmax is the same at every tp.
    make_vocab_size_divisible_by: int = 1
    untie_embeddings_and_output_weights: bool = True

    def __post_init__(self) -> None:
        if self.params_dtype not in _DTYPES:
            raise ValueError(
                f"params_dtype must be one of {sorted(_DTYPES)}, got {self.params_dtype!r}"
            )
        if self.position_embedding_type not in ("rope", "learned_absolute"):
            raise ValueError(
                "position_embedding_type must be 'rope' or 'learned_absolute', "
                f"got {self.position_embedding_type!r}"
            )
        for key in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")

    @classmethod
    def from_model_args(cls, model_args: Mapping[str, Any]) -> GPTConfig:
        """From a model-config dict; keys that are not GPTConfig fields are ignored."""
        names = {field.name for field in dataclasses.fields(cls)}
        if "vocab_size" not in model_args:
            raise ValueError("the model config needs `vocab_size` to build a GPTModel")
        return cls(**{key: value for key, value in model_args.items() if key in names})


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_model_parallel_size: int) -> int:
    """Megatron-LM's `_vocab_size_with_padding`: the embedding rows tensor parallelism can split."""
    multiple = divisible_by * tensor_model_parallel_size
    return -(-vocab_size // multiple) * multiple


def build_gpt_model(config: GPTConfig) -> Any:
    """A megatron-core GPTModel for this rank's tensor/pipeline position (local layer spec)."""
    require_megatron("chatlearn.megatron.gpt")
    from megatron.core import parallel_state as mpu
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    tp = mpu.get_tensor_model_parallel_world_size()
    pp = mpu.get_pipeline_model_parallel_world_size()
    dtype = _DTYPES[config.params_dtype]
    transformer_config = TransformerConfig(
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        ffn_hidden_size=config.ffn_hidden_size,
        hidden_dropout=config.hidden_dropout,
        attention_dropout=config.attention_dropout,
        init_method_std=config.init_method_std,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=dtype,
        bf16=dtype is torch.bfloat16,
        fp16=dtype is torch.float16,
        pipeline_dtype=dtype,
        **cpu_config_overrides(),
    )
    vocab = padded_vocab_size(config.vocab_size, config.make_vocab_size_divisible_by, tp)
    return GPTModel(
        config=transformer_config,
        transformer_layer_spec=get_gpt_layer_local_spec(),
        vocab_size=vocab,
        max_sequence_length=config.max_position_embeddings,
        pre_process=mpu.is_pipeline_first_stage(),
        post_process=mpu.is_pipeline_last_stage(),
        parallel_output=True,  # keep logits split over the vocabulary: see chatlearn.megatron.dpo
        share_embeddings_and_output_weights=not config.untie_embeddings_and_output_weights,
        position_embedding_type=config.position_embedding_type,
    )


def causal_attention_mask(attention_mask: torch.Tensor | None, seq_len: int) -> torch.Tensor:
    """megatron's boolean attention mask (True = masked): causal, plus padded keys when given.

    Passed explicitly so attention never builds its default mask (a CUDA tensor in megatron-core
    0.16). Shape [B, 1, S, S], or [1, 1, S, S] without a padding mask.
    """
    device = None if attention_mask is None else attention_mask.device
    causal = torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device), diagonal=1)
    if attention_mask is None:
        return causal[None, None]
    return causal[None, None] | attention_mask[:, None, None, :].eq(0)


def position_ids_for(input_ids: torch.Tensor) -> torch.Tensor:
    """Positions 0..S-1 for right-padded rows, [B, S]."""
    batch, seq_len = input_ids.shape
    return torch.arange(seq_len, device=input_ids.device).unsqueeze(0).expand(batch, seq_len)


def gpt_logits(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Forward of a GPTModel built with `parallel_output=True`: logits [B, S, V / tp].

    Only meaningful on the last pipeline stage; this helper runs pipeline size 1
    (`pipeline_logits` runs a forward through several stages).
    """
    device = model_device(model)
    input_ids = input_ids.to(device)
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
    mask = causal_attention_mask(attention_mask, input_ids.shape[1])
    return model(input_ids, position_ids_for(input_ids), mask)


def pipeline_logits(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor | None:
    """A forward through every pipeline stage: `gpt_logits` on the last stage, None on the others.

    Every rank of the model calls with the same `input_ids` (each stage needs the positions and
    the mask). A stage after the first receives the hidden states [S, B, H] from the previous
    stage and sends its own to the next one, point to point on the pipeline group (gloo or
    NCCL), so it runs on CPU too. Forward only (inference, log-probs of a reference model, and
    checks): training at pipeline size > 1 needs megatron's forward-backward schedules. At pipeline
    size 1 it is `gpt_logits`.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    if mpu.get_pipeline_model_parallel_world_size() == 1:
        return gpt_logits(model, input_ids, attention_mask)
    inner = getattr(model, "module", model)  # unwrap DistributedDataParallel
    if not mpu.is_pipeline_first_stage():
        config = inner.config
        batch, seq_len = input_ids.shape
        hidden = torch.empty(
            seq_len,
            batch,
            config.hidden_size,
            dtype=config.pipeline_dtype or config.params_dtype,
            device=model_device(inner),
        )
        dist.recv(hidden, src=mpu.get_pipeline_model_parallel_prev_rank())
        inner.set_input_tensor(hidden)
    output = gpt_logits(model, input_ids, attention_mask)
    if mpu.is_pipeline_last_stage():
        return output
    dist.send(output.contiguous(), dst=mpu.get_pipeline_model_parallel_next_rank())
    return None


def model_device(model: Any) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without parameters)."""
    first = next(iter(model.parameters()), None)
    return torch.device("cpu") if first is None else first.device
