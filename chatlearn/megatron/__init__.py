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

from chatlearn._lazy import lazy_exports

# module -> the public names it defines
_EXPORTS: dict[str, tuple[str, ...]] = {
    "chatlearn.megatron.module": ("MegatronModule",),
    "chatlearn.megatron.requirement": (
        "MegatronNotInstalledError",
        "megatron_available",
        "megatron_version",
        "require_megatron",
    ),
    "chatlearn.megatron.compat": (
        "CompatPatch",
        "apply_cpu_compat",
        "applied_patches",
        "cpu_config_overrides",
    ),
    "chatlearn.megatron.parallel": (
        "ParallelLayout",
        "ParallelState",
        "initialize_parallel_state",
        "destroy_parallel_state",
        "ensure_single_process_group",
        "seed_parallel_rngs",
        "is_last_rank",
    ),
    "chatlearn.megatron.gpt": (
        "GPTConfig",
        "build_gpt_model",
        "gpt_logits",
        "pipeline_logits",
        "causal_attention_mask",
    ),
    "chatlearn.megatron.dpo": (
        "vocab_parallel_sequence_logps",
        "concatenated_logps",
        "reference_logps",
        "dpo_train_step",
        "wrap_data_parallel",
    ),
    "chatlearn.megatron.convert": (
        "HFConversionError",
        "load_hf_checkpoint",
        "save_hf_checkpoint",
        "gather_hf_state_dict",
        "build_gpt_model_from_hf",
    ),
    "chatlearn.megatron.args": ("build_megatron_args",),
    "chatlearn.megatron.dist_ckpt": (
        "DistCheckpointError",
        "find_dist_checkpoint",
        "is_dist_checkpoint",
        "load_dist_checkpoint",
        "save_dist_checkpoint",
    ),
}

__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
