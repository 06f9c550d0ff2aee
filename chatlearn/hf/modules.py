"""Ready-made DPO modules for Hugging Face causal LMs: use them as they are, or subclass.

    models:
      reference:      {num_cpu: 1, model_config_file: model.yaml}
      policy_trainer: {num_cpu: 1, trainable: true, model_config_file: model.yaml}

``model_args`` (the model's ``model_config_file`` and/or inline ``model_args:``):

| key | default | meaning |
|---|---|---|
| model_path | None | local checkpoint directory (``from_pretrained``, never a download) |
| model_config | SMALL_LLAMA | config of a freshly built Llama-style model (no model_path) |
| seed | 0 | seed of the random init (both models must agree to start equal) |
| dtype | None | "float32", "bfloat16", ... (None: the checkpoint's) |
| max_length, max_prompt_length, prompt_template | 512, None, "{prompt}" | chatlearn.hf.data |
| beta, loss_type, label_smoothing, rpo_alpha | 0.1, "sigmoid", 0.0, None | the DPO objective |
| learning_rate, weight_decay, adam_betas, adam_eps | 1e-6, 0.0, [0.9, 0.999], 1e-8 | AdamW |
| warmup_steps, warmup_ratio, min_lr_ratio | 0, 0.0, 0.0 | linear warm-up then cosine decay |
| max_grad_norm | 1.0 | gradient clipping (None or 0: off) |
| gradient_checkpointing | False | recompute activations in backward |

The reference returns what the trainer needs — the pair tensors and its summed log-probs
(``chatlearn.algorithms.dpo.reference_outputs``) — since ChatLearn does not merge a module's
output with its input. The trainer accumulates gradients over the micro-batches of a step (the
gradient of the mean loss over every sample of the step, on all data-parallel ranks), steps the
optimizer once, and returns the standard DPO metrics, exact over micro-batches and ranks.
Several trainer ranks train data-parallel with torch's DDP (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch

from chatlearn.actors.module import TorchModule
from chatlearn.algorithms import DPOMetrics, accumulation_loss, compute_dpo, concatenated_logps
from chatlearn.algorithms.dpo import REF_CHOSEN_KEY, REF_REJECTED_KEY, reference_outputs
from chatlearn.hf.data import PreferenceDataset
from chatlearn.hf.model import causal_lm_from_args
from chatlearn.hf.tokenizer import load_tokenizer

_DATA_KEYS = ("max_length", "max_prompt_length", "min_prompt_length", "prompt_template")


class _HFModule(TorchModule):
    """Tokenizer, model and dataset shared by the reference and the trainer."""

    tokenizer: Any
    model: Any

    def arg(self, key: str, default: Any = None) -> Any:
        value = self.model_args.get(key, default)
        return default if value is None else value

    def build_tokenizer(self) -> Any:
        return load_tokenizer(self.model_args.get("model_path"))

    def build_model(self) -> Any:
        model = causal_lm_from_args(self.model_args, self.tokenizer)
        if torch.cuda.is_available():
            model = model.to(torch.device("cuda", torch.cuda.current_device()))
        return model

    def setup(self) -> None:
        self.tokenizer = self.build_tokenizer()
        self.model = self.build_model()

    def build_dataset(self, samples: list[Any], is_eval: bool = False) -> PreferenceDataset:
        options = {key: self.model_args[key] for key in _DATA_KEYS if key in self.model_args}
        return PreferenceDataset(samples, self.tokenizer, **options)

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id or 0)


class HFReference(_HFModule):
    """The frozen reference: per-pair summed response log-probs."""

    def setup(self) -> None:
        super().setup()
        self.model.eval()
        self.model.requires_grad_(False)

    def forward_step(self, data: dict[str, Any], iteration: int = 0) -> dict[str, torch.Tensor]:
        return reference_outputs(self.model, data, pad_token_id=self.pad_token_id)


class HFDPOTrainer(_HFModule):
    """The policy: one AdamW step per ``train_step`` on the DPO objective."""

    def setup(self) -> None:
        super().setup()
        if self.arg("gradient_checkpointing", False):
            self.model.gradient_checkpointing_enable()
            self.model.config.use_cache = False
        self.model.train()
        self.network = self._wrap_data_parallel(self.model)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=float(self.arg("learning_rate", 1e-6)),
            weight_decay=float(self.arg("weight_decay", 0.0)),
            betas=tuple(self.arg("adam_betas", (0.9, 0.999))),
            eps=float(self.arg("adam_eps", 1e-8)),
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)

    def _wrap_data_parallel(self, model: Any) -> Any:
        if self.data_parallel_size <= 1 or not torch.distributed.is_initialized():
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [torch.cuda.current_device()] if torch.cuda.is_available() else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def total_steps(self) -> int:
        """Optimizer steps of the whole run (ChatLearn's trainer iteration formula)."""
        runtime = self.runtime_args
        per_pass = math.ceil(runtime.sample_per_episode / runtime.train_global_batch_size)
        return max(1, runtime.num_episode * runtime.num_training_epoch * per_pass)

    def _lr_factor(self, step: int) -> float:
        total = self.total_steps()
        warmup = int(self.arg("warmup_steps", 0))
        warmup = warmup or int(float(self.arg("warmup_ratio", 0.0)) * total)
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        floor = float(self.arg("min_lr_ratio", 0.0))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def _objective(self, micro_batch: dict[str, Any]) -> Any:
        policy = concatenated_logps(self.network, micro_batch, pad_token_id=self.pad_token_id)
        rpo_alpha = self.model_args.get("rpo_alpha")
        return compute_dpo(
            policy,
            micro_batch[REF_CHOSEN_KEY],
            micro_batch[REF_REJECTED_KEY],
            beta=float(self.arg("beta", 0.1)),
            loss_type=str(self.arg("loss_type", "sigmoid")),
            label_smoothing=float(self.arg("label_smoothing", 0.0)),
            rpo_alpha=None if rpo_alpha is None else float(rpo_alpha),
        )

    def train_step(self, data: list[dict[str, Any]], iteration: int = 0) -> dict[str, float]:
        dp = self.data_parallel_size
        num_local = sum(int(mb[REF_CHOSEN_KEY].shape[0]) for mb in data)
        metrics = DPOMetrics(with_nll=self.model_args.get("rpo_alpha") is not None)
        self.optimizer.zero_grad(set_to_none=True)
        for index, micro_batch in enumerate(data):
            last = index == len(data) - 1
            # DDP all-reduces gradients once per step, on the last micro-batch's backward
            sync = contextlib.nullcontext() if last or dp == 1 else self.network.no_sync()
            with sync:
                out = self._objective(micro_batch)
                accumulation_loss(
                    out.losses, num_samples_global=num_local * dp, world_size=dp
                ).backward()
            metrics.update(out)
        result = metrics.all_reduce().compute()
        max_norm = self.arg("max_grad_norm", 1.0)
        if max_norm:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(max_norm))
            result["grad_norm"] = float(norm)
        result["learning_rate"] = float(self.scheduler.get_last_lr()[0])
        self.optimizer.step()
        self.scheduler.step()
        return result

    def eval_step(self, data: dict[str, Any]) -> dict[str, float]:
        """DPO metrics of the current policy on one held-out batch (no collectives)."""
        self.model.eval()
        try:
            with torch.no_grad():
                out = self._objective_eval(data)
        finally:
            self.model.train()
        metrics = DPOMetrics(with_nll=out.nll is not None)
        metrics.update(out)
        return metrics.compute()

    def _objective_eval(self, data: dict[str, Any]) -> Any:
        network, self.network = self.network, self.model  # no DDP hooks outside a train step
        try:
            return self._objective(data)
        finally:
            self.network = network

    def save_checkpoint(self, iteration: int) -> None:
        """TorchModule's exact-resume state, plus (rank 0) an HF-loadable ``hf_model`` directory
        with the tokenizer: ``AutoModelForCausalLM.from_pretrained(<dir>/hf_model)``."""
        super().save_checkpoint(iteration)
        if self.arg("save_hf_model", True) and self.data_parallel_rank == 0:
            target = self.checkpoint_dir(iteration) / "hf_model"
            with _quiet_progress_bars():  # a bar per save would clutter the run's log
                self.model.save_pretrained(target, safe_serialization=True)
            save_tokenizer = getattr(self.tokenizer, "save_pretrained", None)
            if callable(save_tokenizer):
                save_tokenizer(str(target))


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
