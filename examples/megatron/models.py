"""The modules of ChatLearn's Megatron DPO example: `PolicyReference` and `PolicyTrainer`.

Both are `MegatronModule`s over a megatron-core GPTModel (local layer spec, no TransformerEngine),
so they run on GPUs with NCCL or, through chatlearn's CPU compatibility layer, on CPU cores with
gloo — at any tensor-parallel size that divides the heads and the vocabulary, and with data
parallelism in the trainer. The main file (`train_dpo.py`) names them `reference` and
`ppo_policy`:

    reference_model = PolicyReference("reference")
    ppo_policy_model = PolicyTrainer("ppo_policy")
    engine = DPOEngine(reference_model, ppo_policy_model)

Model config file keys (`model_config_file`, read into `model_args`): the `GPTConfig` fields
(`vocab_size`, `hidden_size`, `num_layers`, `num_attention_heads`, ...), `max_length` (tokens per
sequence), and for the trainer `lr`, `weight_decay`, `beta`, `loss_type`, `label_smoothing`,
`rpo_alpha`. Both models build their initial weights from the same seed, so the reference is the
policy's starting point, as DPO wants. With `load: <HF Llama/Qwen2 directory>` both start from
that checkpoint instead (the architecture comes from its config.json); the trained policy goes
back to an HF directory with `self.save_hf_checkpoint(self.model)` (to `save:`, on every TP rank).
"""

from __future__ import annotations

from typing import Any

import torch

from chatlearn.megatron import MegatronModule
from chatlearn.megatron.dpo import dpo_train_step, reference_logps, wrap_data_parallel
from chatlearn.megatron.gpt import GPTConfig, build_gpt_model
from examples.megatron.data import CharTokenizer, PreferenceDataset


class _GPTModule(MegatronModule):
    """What both models share: the tokenizer, the GPTModel, the dataset."""

    def build_model(self) -> torch.nn.Module:
        self.tokenizer = CharTokenizer()
        if self.megatron_args.load:
            # start from a Hugging Face Llama/Qwen2 directory: its config.json is the model
            model = self.load_pretrained_model()
            vocab_size = int(self.hf_config.vocab_size)
        else:
            self.gpt_config = GPTConfig.from_model_args(self.model_args)
            model = build_gpt_model(self.gpt_config)
            vocab_size = self.gpt_config.vocab_size
        if vocab_size < self.tokenizer.vocab_size:
            raise ValueError(
                f"vocab_size {vocab_size} of the model is smaller than the tokenizer's "
                f"{self.tokenizer.vocab_size}; use a model with vocab_size >= "
                f"{self.tokenizer.vocab_size}"
            )
        return model

    def check_args(self) -> None:
        """What this example's DPO forward cannot run, as one config line each before any
        process starts (they failed deep inside megatron-core, mid-run, in some 200 lines)."""
        where = f"models.{self.name}"
        if int(self.pipeline_model_parallel_size()) > 1:
            raise self.global_args.error(
                f"{where}.pipeline_model_parallel_size",
                "this example runs one pipeline stage (its log-probs come from gpt_logits; "
                "training at pipeline size > 1 is not supported)",
                "set pipeline_model_parallel_size: 1; a reference at pipeline size > 1 can "
                "take its log-probs from chatlearn.megatron.pipeline_logits",
            )
        if self.megatron_args.load:
            return  # the checkpoint's config: checked where it is read
        heads = GPTConfig.from_model_args(self.model_args).num_attention_heads
        tensor = int(self.tensor_model_parallel_size())
        if heads % tensor:
            raise self.global_args.error(
                f"{where}.model_args.num_attention_heads",
                f"{heads} heads do not split over tensor_model_parallel_size {tensor}",
                f"use a multiple of {tensor} heads, or another tensor_model_parallel_size",
            )

    def build_dataset(self, train_prompts: list[Any], is_eval: bool = False) -> PreferenceDataset:
        max_length = int(self.model_args.get("max_length", 64))
        split = "eval" if is_eval else "training"  # the run names a refused record's file:line
        return PreferenceDataset(train_prompts, self.tokenizer, max_length=max_length, split=split)


class PolicyReference(_GPTModule):
    """The frozen reference: per-pair log-probs of the chosen and rejected responses."""

    def setup(self) -> None:
        self.model = self.build_model()
        self.model.eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)

    def forward_step(self, data: dict[str, Any], iteration: int = 0) -> dict[str, Any]:
        # Every tensor-parallel rank computes the same log-probs; the engine keeps the outputs
        # of the ranks whose is_last_rank() is true.
        return reference_logps(self.model, data, pad_token_id=self.tokenizer.pad_token_id)


class PolicyTrainer(_GPTModule):
    """The policy: one DPO optimizer step per train_step over its data-parallel share."""

    def setup(self) -> None:
        self.model = wrap_data_parallel(self.build_model())
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=float(self.model_args.get("lr", 1e-3)),
            weight_decay=float(self.model_args.get("weight_decay", 0.0)),
        )
        rpo_alpha = self.model_args.get("rpo_alpha")
        self.dpo_options = {
            "beta": float(self.model_args.get("beta", 0.1)),
            "loss_type": str(self.model_args.get("loss_type", "sigmoid")),
            "label_smoothing": float(self.model_args.get("label_smoothing", 0.0)),
            "rpo_alpha": None if rpo_alpha is None else float(rpo_alpha),
        }

    def train_step(self, data: list[dict[str, Any]], iteration: int = 0) -> dict[str, float]:
        return dpo_train_step(
            self.model,
            self.optimizer,
            data,
            pad_token_id=self.tokenizer.pad_token_id,
            **self.dpo_options,
        )
