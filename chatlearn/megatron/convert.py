"""Hugging Face Llama / Qwen2 checkpoints ↔ megatron-core GPTModel, with tensor-parallel splitting.

DPO starts from a trained checkpoint. This module builds the GPTModel that matches an HF config
(RMSNorm, SwiGLU, rotary embeddings with the HF theta, grouped-query attention, Qwen2's q/k/v
bias, tied or untied embeddings), copies this rank's shards of the HF weights into it, and goes
back: gathers the shards into HF-named tensors (bit-identical to what was loaded) and saves an HF
directory with `save_pretrained`.

    model, hf_config = load_hf_checkpoint("/ckpt/qwen2-7b")   # after initialize_parallel_state
    ...train...
    save_hf_checkpoint(model, hf_config, "/out/hf")           # every TP rank calls; rank 0 writes

Layouts (megatron-core, local layer spec):

| megatron                         | HF                                  | split over TP          |
|----------------------------------|-------------------------------------|------------------------|
| embedding.word_embeddings        | model.embed_tokens                  | rows (vocab)           |
| layers.i.self_attention.linear_qkv | q/k/v_proj, per query group       | rows, whole groups     |
|                                  | [q heads of the group, k, v]        |                        |
| layers.i.self_attention.linear_proj | o_proj                           | columns                |
| layers.i.mlp.linear_fc1          | [gate shard r; up shard r] per rank | rows of gate and of up |
| layers.i.mlp.linear_fc2          | down_proj                           | columns                |
| output_layer                     | lm_head (absent when tied)          | rows (vocab)           |

Norm weights are copied whole. The vocabulary is padded with zero rows to a multiple of
`make_vocab_size_divisible_by × tp` (default 1: an HF vocabulary that tp divides stays unpadded,
so the softmax is exactly HF's); padded rows are dropped on the way back.

Pipeline parallelism: each stage builds and loads only what it holds (the first stage the
embedding, the last the final norm and the output layer, each its own layers by their global
layer number). With tied embeddings the last stage's output layer is loaded from
`embed_tokens` too (megatron keeps the two copies equal). Going back, every stage gathers its part
over TP and the stages exchange their parts over the pipeline group, so every rank ends with the
whole HF state dict; the embedding is taken from the first stage.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from chatlearn.megatron.compat import cpu_config_overrides
from chatlearn.megatron.gpt import model_device, padded_vocab_size
from chatlearn.megatron.requirement import require_megatron

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "HFConversionError",
    "build_gpt_model_from_hf",
    "gather_hf_state_dict",
    "is_hf_checkpoint",
    "load_hf_checkpoint",
    "load_hf_config",
    "load_hf_state_dict",
    "load_hf_weights",
    "save_hf_checkpoint",
    "transformer_config_from_hf",
]

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Files of an HF directory that are not weights and are copied along on save.
_SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
)


class HFConversionError(ValueError):
    """The HF checkpoint cannot be mapped onto a GPTModel (unsupported feature or bad shape)."""


# ---------------------------------------------------------------------------------------------
# Reading an HF directory


def load_hf_config(path: str | Path) -> Any:
    """The transformers config of an HF checkpoint directory, checked for what we can convert."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path))
    _check_supported(config, str(path))
    return config


def load_hf_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the directory's safetensors files (single file or sharded with an index)."""
    from safetensors.torch import load_file

    directory = Path(path)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise HFConversionError(
            f"{directory} has no *.safetensors file; save the model with "
            "save_pretrained(..., safe_serialization=True)"
        )
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    return state


def _check_supported(config: Any, where: str) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise HFConversionError(
            f"{where}: model_type {model_type!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    rope_type = (_rope_parameters(config) or {}).get("rope_type", "default")
    if rope_type != "default":
        raise HFConversionError(f"{where}: rope scaling {rope_type!r} is not supported")
    if getattr(config, "mlp_bias", False) or (
        model_type == "llama" and getattr(config, "attention_bias", False)
    ):
        raise HFConversionError(f"{where}: attention_bias / mlp_bias are not supported for llama")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise HFConversionError(f"{where}: hidden_act {config.hidden_act!r} (only silu)")


def _rope_parameters(config: Any) -> dict[str, Any] | None:
    # transformers ≥ 5 keeps rope_theta in rope_parameters; older versions as an attribute.
    params = getattr(config, "rope_parameters", None)
    return dict(params) if params else None


def _rope_theta(config: Any) -> float:
    params = _rope_parameters(config)
    if params and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(config, "rope_theta", 10000.0))


# ---------------------------------------------------------------------------------------------
# The matching GPTModel


@dataclass(frozen=True, slots=True)
class _Shape:
    """The sizes of an HF config that the weight mapping needs."""

    hidden: int
    num_heads: int
    num_groups: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool

    @classmethod
    def of(cls, config: Any) -> _Shape:
        heads = int(config.num_attention_heads)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            hidden=int(config.hidden_size),
            num_heads=heads,
            num_groups=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=int(head_dim),
            vocab=int(config.vocab_size),
            tied=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False)),
        )


def transformer_config_from_hf(config: Any, params_dtype: str = "float32") -> Any:
    """megatron-core's TransformerConfig for an HF Llama/Qwen2 config at the current TP/PP."""
    require_megatron("chatlearn.megatron.convert")
    from megatron.core import parallel_state as mpu
    from megatron.core.transformer.transformer_config import TransformerConfig

    _check_supported(config, "the HF config")
    shape = _Shape.of(config)
    tp = mpu.get_tensor_model_parallel_world_size()
    if shape.num_groups % tp:
        raise HFConversionError(
            f"tensor_model_parallel_size {tp} must divide num_key_value_heads {shape.num_groups}"
        )
    dtype = _DTYPES[params_dtype]
    return TransformerConfig(
        num_layers=int(config.num_hidden_layers),
        hidden_size=shape.hidden,
        num_attention_heads=shape.num_heads,
        num_query_groups=shape.num_groups,
        kv_channels=shape.head_dim,
        ffn_hidden_size=int(config.intermediate_size),
        normalization="RMSNorm",
        layernorm_epsilon=float(config.rms_norm_eps),
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=shape.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=float(getattr(config, "attention_dropout", 0.0)),
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=mpu.get_pipeline_model_parallel_world_size(),
        params_dtype=dtype,
        bf16=dtype is torch.bfloat16,
        fp16=dtype is torch.float16,
        pipeline_dtype=dtype,
        **cpu_config_overrides(),
    )


def build_gpt_model_from_hf(
    config: Any, params_dtype: str = "float32", make_vocab_size_divisible_by: int = 1
) -> Any:
    """An (uninitialized-weights) GPTModel with the architecture of the HF config."""
    from megatron.core import parallel_state as mpu
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    transformer_config = transformer_config_from_hf(config, params_dtype)
    tp = mpu.get_tensor_model_parallel_world_size()
    return GPTModel(
        config=transformer_config,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=padded_vocab_size(int(config.vocab_size), make_vocab_size_divisible_by, tp),
        max_sequence_length=int(config.max_position_embeddings),
        pre_process=mpu.is_pipeline_first_stage(),
        post_process=mpu.is_pipeline_last_stage(),
        parallel_output=True,  # logits stay split over the vocabulary (chatlearn.megatron.dpo)
        share_embeddings_and_output_weights=_Shape.of(config).tied,
        position_embedding_type="rope",
        rotary_base=_rope_theta(config),  # type: ignore[arg-type]  # annotated int, used as float
    )


def load_hf_checkpoint(
    path: str | Path, params_dtype: str = "float32", make_vocab_size_divisible_by: int = 1
) -> tuple[Any, Any]:
    """(GPTModel holding this rank's shards of the HF checkpoint at `path`, the HF config)."""
    config = load_hf_config(path)
    model = build_gpt_model_from_hf(config, params_dtype, make_vocab_size_divisible_by)
    load_hf_weights(model, load_hf_state_dict(path), config)
    return model, config


# ---------------------------------------------------------------------------------------------
# HF → megatron: this rank's shard of every parameter


def _tp() -> tuple[int, int]:
    from megatron.core import parallel_state as mpu

    return mpu.get_tensor_model_parallel_world_size(), mpu.get_tensor_model_parallel_rank()


def _fused_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: _Shape) -> torch.Tensor:
    """megatron's linear_qkv rows: for each query group, its q heads, then its k and v heads."""
    tail = q.shape[1:]
    groups = shape.num_groups
    return torch.cat(
        [
            q.reshape(groups, -1, *tail),
            k.reshape(groups, shape.head_dim, *tail),
            v.reshape(groups, shape.head_dim, *tail),
        ],
        dim=1,
    ).reshape(-1, *tail)


def _split_qkv(
    fused: torch.Tensor, shape: _Shape
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tail = fused.shape[1:]
    q_rows = shape.num_heads // shape.num_groups * shape.head_dim
    grouped = fused.reshape(shape.num_groups, q_rows + 2 * shape.head_dim, *tail)
    q, k, v = grouped.split([q_rows, shape.head_dim, shape.head_dim], dim=1)
    return q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)


def _pad_vocab(weight: torch.Tensor, rows: int) -> torch.Tensor:
    if weight.shape[0] == rows:
        return weight
    return torch.cat([weight, weight.new_zeros(rows - weight.shape[0], *weight.shape[1:])])


def _copy(target: torch.Tensor, value: torch.Tensor, name: str) -> None:
    if tuple(target.shape) != tuple(value.shape):
        raise HFConversionError(
            f"{name}: the HF weight gives shape {tuple(value.shape)}, the GPTModel parameter "
            f"has {tuple(target.shape)} (does the model config match the checkpoint?)"
        )
    with torch.no_grad():
        target.copy_(value.to(target.dtype))


def _take(state: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in state:
        raise HFConversionError(f"the HF checkpoint has no tensor {name!r}")
    return state[name]


def load_hf_weights(model: Any, state: Mapping[str, torch.Tensor], config: Any) -> None:
    """Copy this rank's shards of the HF `state` into `model` (built for the same config)."""
    shape = _Shape.of(config)
    tp, rank = _tp()

    def shard(tensor: torch.Tensor, dim: int) -> torch.Tensor:
        return tensor.chunk(tp, dim=dim)[rank]

    if model.pre_process:
        embedding = model.embedding.word_embeddings.weight
        vocab_rows = embedding.shape[0] * tp
        full = _pad_vocab(_take(state, "model.embed_tokens.weight"), vocab_rows)
        _copy(embedding, shard(full, 0), "embedding")
    for layer in model.decoder.layers:
        prefix = f"model.layers.{layer.layer_number - 1}."
        for target, value in _layer_shards(layer, state, prefix, shape, shard):
            _copy(target, value, f"{prefix}*")
    if model.post_process:
        _copy(model.decoder.final_layernorm.weight, _take(state, "model.norm.weight"), "final norm")
        output = model.output_layer.weight
        if output is not None:  # None when tied on a single stage: the embedding is the output
            head = "model.embed_tokens.weight" if shape.tied else "lm_head.weight"
            full = _pad_vocab(_take(state, head), output.shape[0] * tp)
            _copy(output, shard(full, 0), "output layer")


def _layer_shards(
    layer: Any,
    state: Mapping[str, torch.Tensor],
    prefix: str,
    shape: _Shape,
    shard: Callable[[torch.Tensor, int], torch.Tensor],
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    attention, mlp = layer.self_attention, layer.mlp

    def hf(name: str) -> torch.Tensor:
        return _take(state, prefix + name)

    qkv = _fused_qkv(hf("self_attn.q_proj.weight"), hf("self_attn.k_proj.weight"),
                     hf("self_attn.v_proj.weight"), shape)  # fmt: skip
    pairs = [
        (layer.input_layernorm.weight, hf("input_layernorm.weight")),
        (attention.linear_qkv.weight, shard(qkv, 0)),
        (attention.linear_proj.weight, shard(hf("self_attn.o_proj.weight"), 1)),
        (layer.pre_mlp_layernorm.weight, hf("post_attention_layernorm.weight")),
        (
            mlp.linear_fc1.weight,
            torch.cat([shard(hf("mlp.gate_proj.weight"), 0), shard(hf("mlp.up_proj.weight"), 0)]),
        ),
        (mlp.linear_fc2.weight, shard(hf("mlp.down_proj.weight"), 1)),
    ]
    if shape.qkv_bias:
        bias = _fused_qkv(hf("self_attn.q_proj.bias"), hf("self_attn.k_proj.bias"),
                          hf("self_attn.v_proj.bias"), shape)  # fmt: skip
        pairs.append((attention.linear_qkv.bias, shard(bias, 0)))
    return pairs


# ---------------------------------------------------------------------------------------------
# megatron → HF: gather the shards


def _gather(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """All-gather a tensor-parallel shard and concatenate along `dim` (any backend, CPU too)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    tp = mpu.get_tensor_model_parallel_world_size()
    local = tensor.detach().contiguous()
    if tp == 1:
        return local.clone()
    parts = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(parts, local, group=mpu.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=dim)


def gather_hf_state_dict(model: Any, config: Any) -> dict[str, torch.Tensor]:
    """The model's weights under HF names, gathered over TP and PP; every rank gets all of them.

    Collective over the tensor- and pipeline-parallel groups: every rank of the model replica
    must call.
    """
    shape = _Shape.of(config)
    tp, _ = _tp()
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    state: dict[str, torch.Tensor] = {}
    if model.pre_process:
        embedding = _gather(model.embedding.word_embeddings.weight, 0)
        state["model.embed_tokens.weight"] = embedding[: shape.vocab].contiguous()
    for layer in model.decoder.layers:
        state.update(_layer_to_hf(layer, f"model.layers.{layer.layer_number - 1}.", shape, tp))
    if model.post_process:
        state["model.norm.weight"] = model.decoder.final_layernorm.weight.detach().clone()
        if not shape.tied:
            head = _gather(model.output_layer.weight, 0)
            state["lm_head.weight"] = head[: shape.vocab].contiguous()
    return _exchange_pipeline_stages(state, model_device(model))


def _exchange_pipeline_stages(
    state: dict[str, torch.Tensor], device: torch.device
) -> dict[str, torch.Tensor]:
    """Every stage's part of the HF state dict, on every stage (broadcast stage by stage)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    if mpu.get_pipeline_model_parallel_world_size() == 1:
        return state
    group = mpu.get_pipeline_model_parallel_group()
    ranks = dist.get_process_group_ranks(group)
    me = mpu.get_pipeline_model_parallel_rank()
    # names, shapes and dtypes first (small objects), then the tensors themselves
    described = [
        (name, list(tensor.shape), str(tensor.dtype).removeprefix("torch."))
        for name, tensor in state.items()
    ]
    parts: list[Any] = [None] * len(ranks)
    dist.all_gather_object(parts, described, group=group)
    full: dict[str, torch.Tensor] = {}
    for stage, part in enumerate(parts):
        for name, size, dtype in part:
            if stage == me:
                tensor = state[name].to(device)
            else:
                tensor = torch.empty(size, dtype=getattr(torch, dtype), device=device)
            dist.broadcast(tensor, src=ranks[stage], group=group)
            full.setdefault(name, tensor)  # a name two stages hold: the first stage's
    return full


def _layer_to_hf(layer: Any, prefix: str, shape: _Shape, tp: int) -> dict[str, torch.Tensor]:
    attention, mlp = layer.self_attention, layer.mlp
    q, k, v = _split_qkv(_gather(attention.linear_qkv.weight, 0), shape)
    # fc1 shards are [gate_r; up_r]: split each rank's half before concatenating over ranks
    fc1 = _gather(mlp.linear_fc1.weight, 0).reshape(tp, 2, -1, shape.hidden)
    out = {
        "input_layernorm.weight": layer.input_layernorm.weight.detach().clone(),
        "self_attn.q_proj.weight": q,
        "self_attn.k_proj.weight": k,
        "self_attn.v_proj.weight": v,
        "self_attn.o_proj.weight": _gather(attention.linear_proj.weight, 1),
        "post_attention_layernorm.weight": layer.pre_mlp_layernorm.weight.detach().clone(),
        "mlp.gate_proj.weight": fc1[:, 0].reshape(-1, shape.hidden),
        "mlp.up_proj.weight": fc1[:, 1].reshape(-1, shape.hidden),
        "mlp.down_proj.weight": _gather(mlp.linear_fc2.weight, 1),
    }
    if shape.qkv_bias:
        qb, kb, vb = _split_qkv(_gather(attention.linear_qkv.bias, 0), shape)
        out.update({"self_attn.q_proj.bias": qb, "self_attn.k_proj.bias": kb,
                    "self_attn.v_proj.bias": vb})  # fmt: skip
    return {prefix + name: tensor.contiguous() for name, tensor in out.items()}


def save_hf_checkpoint(
    model: Any, config: Any, path: str | Path, source: str | Path | None = None
) -> Path | None:
    """Gather the model to HF weights and `save_pretrained` them with `config` into `path`.

    Every tensor- and pipeline-parallel rank calls (the gather is collective); only the first
    rank of the model (tensor, pipeline and data rank 0) writes. Tokenizer and generation files of
    `source` (the directory the model was loaded from) are copied along. Returns the path on the
    writer.
    """
    from megatron.core import parallel_state as mpu

    state = gather_hf_state_dict(model, config)
    if (
        mpu.get_tensor_model_parallel_rank() != 0
        or mpu.get_pipeline_model_parallel_rank() != 0
        or mpu.get_data_parallel_rank() != 0
    ):
        return None
    from transformers import AutoModelForCausalLM

    out = Path(path)
    with torch.device("meta"):
        hf_model = AutoModelForCausalLM.from_config(config)
    hf_model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        hf_model.tie_weights()
    missing = [name for name, p in hf_model.state_dict().items() if p.is_meta]
    if missing:
        raise HFConversionError(f"no converted weight for {missing[:5]}")
    hf_model.save_pretrained(str(out))
    if source is not None:
        for name in _SIDE_FILES:
            if (Path(source) / name).is_file():
                shutil.copy2(Path(source) / name, out / name)
    return out


def is_hf_checkpoint(path: str | Path) -> bool:
    """A directory with an HF `config.json` (as opposed to a Megatron checkpoint directory)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return "model_type" in json.loads(config.read_text())
    except (OSError, ValueError):
        return False
