"""megatron-core support: `MegatronModule`, parallel state, a GPTModel builder and DPO under TP/DP.

- `MegatronModule`: ChatLearn's module kind for megatron models (module.py).
- Parallel state on the runtime's process group, seeding, `is_last_rank` (parallel.py).
- The CPU compatibility layer for megatron-core, a no-op with CUDA (compat.py).
- `GPTConfig` / `build_gpt_model` / `gpt_logits`: a GPTModel on the local layer spec (gpt.py).
- Vocab-parallel log-probs and the DPO train step (dpo.py).
- HF Llama/Qwen2 checkpoints ↔ GPTModel with tensor- and pipeline-parallel splitting (convert.py).
- Megatron torch_dist checkpoints through megatron.core.dist_checkpointing (dist_ckpt.py).
- `megatron_args`: Megatron-LM's argument namespace from the model config (args.py).
- `MegatronNotInstalledError`, `require_megatron` (requirement.py): megatron-core is the optional
  extra `chatlearn[megatron]`.

Names are imported lazily, so importing this package needs neither torch nor megatron-core.

Layer 3 (docs/architecture.md, "Layers"): may import `transport`, `config`, `algorithms` and
`actors`, never `engine`, `launch` or `hf`.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "MegatronModule": "chatlearn.megatron.module",
    "MegatronNotInstalledError": "chatlearn.megatron.requirement",
    "megatron_available": "chatlearn.megatron.requirement",
    "megatron_version": "chatlearn.megatron.requirement",
    "require_megatron": "chatlearn.megatron.requirement",
    "CompatPatch": "chatlearn.megatron.compat",
    "apply_cpu_compat": "chatlearn.megatron.compat",
    "applied_patches": "chatlearn.megatron.compat",
    "cpu_config_overrides": "chatlearn.megatron.compat",
    "ParallelLayout": "chatlearn.megatron.parallel",
    "ParallelState": "chatlearn.megatron.parallel",
    "initialize_parallel_state": "chatlearn.megatron.parallel",
    "destroy_parallel_state": "chatlearn.megatron.parallel",
    "ensure_single_process_group": "chatlearn.megatron.parallel",
    "seed_parallel_rngs": "chatlearn.megatron.parallel",
    "is_last_rank": "chatlearn.megatron.parallel",
    "GPTConfig": "chatlearn.megatron.gpt",
    "build_gpt_model": "chatlearn.megatron.gpt",
    "gpt_logits": "chatlearn.megatron.gpt",
    "pipeline_logits": "chatlearn.megatron.gpt",
    "causal_attention_mask": "chatlearn.megatron.gpt",
    "vocab_parallel_sequence_logps": "chatlearn.megatron.dpo",
    "concatenated_logps": "chatlearn.megatron.dpo",
    "reference_logps": "chatlearn.megatron.dpo",
    "dpo_train_step": "chatlearn.megatron.dpo",
    "HFConversionError": "chatlearn.megatron.convert",
    "load_hf_checkpoint": "chatlearn.megatron.convert",
    "save_hf_checkpoint": "chatlearn.megatron.convert",
    "gather_hf_state_dict": "chatlearn.megatron.convert",
    "build_gpt_model_from_hf": "chatlearn.megatron.convert",
    "build_megatron_args": "chatlearn.megatron.args",
    "DistCheckpointError": "chatlearn.megatron.dist_ckpt",
    "find_dist_checkpoint": "chatlearn.megatron.dist_ckpt",
    "is_dist_checkpoint": "chatlearn.megatron.dist_ckpt",
    "load_dist_checkpoint": "chatlearn.megatron.dist_ckpt",
    "save_dist_checkpoint": "chatlearn.megatron.dist_ckpt",
    "wrap_data_parallel": "chatlearn.megatron.dpo",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'chatlearn.megatron' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
