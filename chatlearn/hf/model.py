"""Causal LMs: a small Llama-style model built from a config (random init, seeded) or a local
checkpoint directory loaded with `from_pretrained` (never a download).

    model = build_causal_lm({"hidden_size": 192, "num_hidden_layers": 3}, seed=0)
    model = load_causal_lm("/path/to/checkpoint", dtype="bfloat16")
    model = causal_lm_from_args(model_args, tokenizer)   # either, from a model's config

transformers is imported only when a model is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from chatlearn.hf.tokenizer import BYTE_VOCAB_SIZE

# The default small model: about 1.4M parameters with the byte-level vocabulary; a DPO step on
# 32 short pairs takes a few tens of milliseconds on two CPU cores.
SMALL_LLAMA: dict[str, Any] = {
    "hidden_size": 192,
    "intermediate_size": 512,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """`"bfloat16"`, `"bf16"`, `torch.bfloat16`, ... → a torch dtype; None/"auto" → None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    if name == "auto":
        return None
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {sorted(_DTYPES)} or 'auto'")
    return _DTYPES[name]


def build_causal_lm(
    config: Mapping[str, Any] | None = None,
    *,
    vocab_size: int = BYTE_VOCAB_SIZE,
    pad_token_id: int | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    seed: int = 0,
    dtype: str | torch.dtype | None = None,
) -> Any:
    """A randomly initialised `LlamaForCausalLM`; `config` overrides `SMALL_LLAMA` keys.

    Initialisation is seeded from `seed` without touching the global RNG state, so the reference
    and the trainer build identical weights in different processes.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    values = {**SMALL_LLAMA, **dict(config or {})}
    values.setdefault("vocab_size", vocab_size)
    for key, value in (
        ("pad_token_id", pad_token_id),
        ("bos_token_id", bos_token_id),
        ("eos_token_id", eos_token_id),
    ):
        if value is not None:
            values.setdefault(key, value)
    llama_config = LlamaConfig(**values)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model: Any = LlamaForCausalLM(llama_config)
    resolved = resolve_dtype(dtype)
    if resolved is not None:
        model = model.to(resolved)
    return model


def load_causal_lm(model_path: str | Path, *, dtype: str | torch.dtype | None = None) -> Any:
    """`AutoModelForCausalLM.from_pretrained` on a local directory, offline."""
    from transformers import AutoModelForCausalLM

    path = Path(model_path)
    if not path.is_dir():
        raise ValueError(f"model_path {str(model_path)!r} is not a directory (no downloads here)")
    kwargs: dict[str, Any] = {"local_files_only": True}
    resolved = resolve_dtype(dtype)
    if resolved is not None:
        kwargs["dtype"] = resolved
    return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)


def causal_lm_from_args(model_args: Mapping[str, Any], tokenizer: Any) -> Any:
    """The model a module's config asks for.

    Keys read: `model_path` (a local checkpoint; when set the other keys but `dtype` are ignored),
    `model_config` (overrides of `SMALL_LLAMA`), `seed` (default 0), `dtype` (default float32).
    """
    dtype = model_args.get("dtype")
    model_path = model_args.get("model_path")
    if model_path:
        return load_causal_lm(model_path, dtype=dtype)
    return build_causal_lm(
        model_args.get("model_config") or {},
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        seed=int(model_args.get("seed", 0) or 0),
        dtype=dtype,
    )


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
