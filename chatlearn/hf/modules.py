"""Ready-made DPO modules for Hugging Face causal LMs: use them as they are, or subclass.

`HFReference` (reference.py) and `HFDPOTrainer` (trainer.py), on their shared base `HFModule`
(base.py), are imported from here.

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
| disable_dropout | True | the model's dropout off, as in TRL's DPO (a lora.dropout set applies) |
| parallel | "ddp" | "none", "ddp" or "fsdp" (FSDP2: shard per decoder layer, then the root) |
| hsdp | True | with fsdp across hosts: shard within a host, replicate across hosts |
| mixed_precision | "no" | "bf16" or "fp16" (CUDA only): low-precision compute, fp32 master state |
| lora, enable_lora | None, False | peft LoRA {r, alpha, dropout, target_modules}, defaults below |
| logps_chunk_size | 512 | response tokens per chunk of the log-prob computation (0: whole logits) |
| packing | on where exact | a micro-batch's sequences in one row, no padding (below) |
| prefix_sharing | on where exact | each pair as ``[prompt, chosen, rejected]``: the prompt once |
| max_tokens_per_row | None | with packing: start a new row past this many tokens (None: one) |
| max_tokens_per_micro_batch | None | at most this many tokens per forward (below; None: off) |
| save_hf_model, merge_lora | True, True | checkpoints hold an HF dir (LoRA: adapter + merged) [1] |
| export_dtype | None | the HF export's dtype, e.g. "bfloat16" (None: the weights' own) [2] |
| malloc_mmap_threshold | 0 | glibc: freed blocks above this size leave the process (0: off) |
| load_once | True | rank 0 loads model_path (or builds the model), the other ranks receive it |
| load_in_turns | None | with load_once false: a host's ranks load in turns (None: if needed) |

[1] Under FSDP2 only the checkpoint of the run's end (not of a graceful stop) and those asked for
(``engine.save_checkpoint()``): the periodic ones hold the sharded state; with LoRA the merged
weights likewise, the others the adapter alone (the trainer's ``save_checkpoint``;
``chatlearn export`` writes them afterwards).

[2] Mixed precision trains fp32 master weights, which the export holds by default (twice the
bytes of a bf16 checkpoint, and a config that loads as fp32). In another dtype the export is not
the resume's state: as under FSDP2 it is written at the run's end and on request, the weights in
``model.pt``; ``chatlearn export`` writes in it too unless given ``--dtype``.

LoRA's defaults (``chatlearn.hf.lora``): r 16, alpha 32, dropout 0, target_modules "all-linear".

A subclass's ``setup`` with ``load_once`` (several ranks): from ``build_model`` until
``build_network`` the model of ranks 1 and up is on the meta device, without weights; what setup
does to the weights meanwhile (new tokens' rows) is done on rank 0 and sent with the rest, and
what reads a weight's value there fails on those ranks with the error of ``load_once``
(``resize_token_embeddings`` does with its default mean resizing: pass ``mean_resizing=False``).
A setup that ends without ``build_network`` (or with a second model from ``build_model``) stops
with that error too; ``load_once: false`` has every rank load.

The reference returns what the trainer needs — the pair tensors and its summed log-probs
(``chatlearn.algorithms.dpo.reference_outputs``) — since ChatLearn does not merge a module's
output with its input. The trainer accumulates gradients over the micro-batches of a step (the
gradient of the mean loss over every sample of the step, on all data-parallel ranks), steps the
optimizer once, and returns the standard DPO metrics, exact over micro-batches and ranks.
Several trainer ranks train data-parallel with torch's DDP (gloo on CPU, NCCL on GPU), or, with
``parallel: fsdp``, sharded with FSDP2 (``chatlearn.hf.parallel``). A sharded reference splits each
batch's rows over its ranks and gathers the log-probs. The reference ignores ``lora``: it is the
frozen base model. The trainer logs its ``memory_report()`` at setup.

Memory beyond the training state (``chatlearn bench memory`` measures it): with
``malloc_mmap_threshold: N`` (e.g. 131072) a module fixes glibc's mmap threshold at setup
(``chatlearn.hf.memory.return_freed_memory``), so the memory of freed tensors leaves the process
instead of piling up in its heaps (GiBs for a 0.5B model on CPU), at a cost in page faults (35-45%
of the CPU step of ``chatlearn bench dpo``'s small model; off by default); a trainer with tied
embeddings sums the head's and the embedding's gradients of that weight in place
(``chatlearn.hf.model.tied_gradient_in_place``); under FSDP2 the root's gathered parameters are
freed once the backward reaches the last decoder layer (``chatlearn.hf.parallel``).

Packing and prefix sharing (``chatlearn.algorithms.packing``) compute neither padding nor a pair's
prompt twice; the log-probs are those of the padded forward (to float rounding). They are on by
default where that is exact — ``sdpa``/``eager`` attention of Llama/Qwen2-style models without
sliding windows (``chatlearn.hf.packing``) — and otherwise off with one log line. On an ``sdpa``
model the packed forward attends by segments (``packed_attention: segments``, the default): one
unpadded row, no mask, each pair's branches through SDPA's causal kernel; every model the module
builds (``build_model``) attends the same way. ``packed_attention: mask`` gives each row a
``T × T`` mask whose attention costs ``T²``: then set ``max_tokens_per_row`` to about
``max_length`` for long sequences. The trainer adds ``tokens/real``
(neither padding nor a repeated prompt) and ``tokens/computed`` (what the forwards ran over) of the
step, summed over ranks, to its metrics.

A token budget: ChatLearn's micro-batches count samples, so ``train_micro_batch_size`` has to be
set for the longest pairs, and micro-batches of short ones use a fraction of what the device
could hold. ``max_tokens_per_micro_batch: N`` keeps the engine's batches (steps, loss
normalisation and counters stay ChatLearn's) and runs each step's pairs (trainer: every
micro-batch of the step pooled; reference: each order; evaluation: each batch) in forwards of
at most N tokens (``chatlearn.algorithms.token_budget``): with packing, a pair costs its real
tokens; padded, its group's rows times the longest (groups hold pairs of similar length); a
pair above N runs alone (setup warns when N is below 2 × max_length, where the longest do).
The gradient is the same whatever the grouping (to float rounding), so with the budget set, a
large ``train_micro_batch_size`` (up to the global batch) lets the budget alone decide how much
each forward holds: memory is bounded by N, and short pairs share forwards.
"""

from chatlearn.hf.base import CHECKPOINT_READ_RATE, DROPOUT_WARNING, FULL_LOGITS_WARNING, HFModule
from chatlearn.hf.reference import HFReference
from chatlearn.hf.trainer import HFDPOTrainer

__all__ = [
    "CHECKPOINT_READ_RATE",
    "DROPOUT_WARNING",
    "FULL_LOGITS_WARNING",
    "HFDPOTrainer",
    "HFModule",
    "HFReference",
]
