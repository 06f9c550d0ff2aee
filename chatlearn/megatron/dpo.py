"""DPO on a megatron-core GPTModel under tensor and data parallelism.

The loss itself is `chatlearn.algorithms.dpo` (the same `compute_dpo` the Hugging Face example
uses); what changes with megatron is where the log-probs come from. A GPTModel built with
`parallel_output=True` leaves the logits split over the vocabulary: tensor-parallel rank r holds
columns [r·V/tp, (r+1)·V/tp). log p(token) = logit[token] - logsumexp(all logits) then needs the
max, the target logit and the sum of exponentials reduced across the tensor-parallel group, which
is exactly megatron's `vocab_parallel_cross_entropy` (forward and backward); the full [B, S, V]
logits are never gathered. Every tensor-parallel rank ends up with the same per-sequence log-probs.

Data parallelism: `wrap_data_parallel` puts torch's DistributedDataParallel on megatron's
data-parallel group, and `dpo_train_step` scales each micro-batch's loss with
`accumulation_loss` so that one step's gradient is that of the mean loss over every sample of the
step on every data-parallel rank; metrics are reduced over the same group.

    model = wrap_data_parallel(build_gpt_model(config))
    out = reference_logps(reference_model, batch)                 # in the reference
    metrics = dpo_train_step(model, optimizer, micro_batches, beta=0.1)   # in the trainer
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from chatlearn.algorithms.collectives import collective_device
from chatlearn.algorithms.dpo import (
    PairLogps,
    accumulation_loss,
    compute_dpo,
    concatenate_pairs,
    split_pairs,
)
from chatlearn.algorithms.metrics import DPOMetrics
from chatlearn.megatron.gpt import gpt_logits
from chatlearn.megatron.requirement import require_megatron

__all__ = [
    "concatenated_logps",
    "dpo_train_step",
    "reference_logps",
    "vocab_parallel_sequence_logps",
    "wrap_data_parallel",
]


def vocab_parallel_sequence_logps(
    logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`chatlearn.algorithms.logps.sequence_logps` for vocab-parallel logits [N, L, V / tp].

    Returns (sum of log p(token t | tokens < t) where loss_mask[t] == 1, number of such tokens),
    each [N], identical on every tensor-parallel rank. Computed in float32 at least.
    """
    require_megatron("chatlearn.megatron.dpo")
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    if logits.shape[:2] != input_ids.shape or loss_mask.shape != input_ids.shape:
        raise ValueError(
            f"shape mismatch: logits {tuple(logits.shape)}, input_ids {tuple(input_ids.shape)}, "
            f"loss_mask {tuple(loss_mask.shape)}"
        )
    dtype = torch.promote_types(logits.dtype, torch.float32)
    # The logit at position t - 1 predicts token t. megatron's cross entropy works in place on
    # its input, so it gets its own contiguous copy, never a view of the model's output.
    shifted = logits[:, :-1].to(dtype).clone(memory_format=torch.contiguous_format)
    targets = input_ids[:, 1:].to(shifted.device)
    token_logps = -vocab_parallel_cross_entropy(shifted, targets)
    mask = loss_mask[:, 1:].to(token_logps.device, token_logps.dtype)
    return (token_logps * mask).sum(-1), mask.sum(-1)


def concatenated_logps(
    model: Any, batch: Mapping[str, torch.Tensor], *, pad_token_id: int = 0
) -> PairLogps:
    """One forward over chosen + rejected rows; per-pair response log-probs (vocab-parallel)."""
    cat = concatenate_pairs(batch, pad_token_id=pad_token_id)
    logits = gpt_logits(model, cat["input_ids"], cat["attention_mask"])
    logps, num_tokens = vocab_parallel_sequence_logps(
        logits, cat["input_ids"].to(logits.device), cat["loss_mask"]
    )
    chosen, rejected = split_pairs(logps)
    chosen_num, rejected_num = split_pairs(num_tokens)
    return PairLogps(chosen, rejected, chosen_num, rejected_num)


@torch.no_grad()
def reference_logps(
    model: Any, batch: Mapping[str, torch.Tensor], *, pad_token_id: int = 0
) -> dict[str, torch.Tensor]:
    """What a reference's forward_step returns: the batch's pairs plus their reference log-probs.

    The reference output is not merged with its input, so the tokens the trainer needs travel
    with the log-probs (on the CPU).
    """
    logps = concatenated_logps(model, batch, pad_token_id=pad_token_id)
    out = {
        key: value.cpu() for key, value in batch.items() if key.startswith(("chosen_", "rejected_"))
    }
    out["ref_chosen_logps"] = logps.chosen.float().cpu()
    out["ref_rejected_logps"] = logps.rejected.float().cpu()
    return out


def wrap_data_parallel(model: torch.nn.Module) -> torch.nn.Module:
    """torch DDP over megatron's data-parallel group; the model itself with one DP rank.

    megatron-core's own DistributedDataParallel allocates its gradient buffers on CUDA, so the
    portable choice is torch's, which averages gradients over the group on every backward.
    """
    require_megatron("chatlearn.megatron.dpo")
    from megatron.core import parallel_state as mpu

    if mpu.get_data_parallel_world_size() == 1:
        return model
    device_ids = [torch.cuda.current_device()] if torch.cuda.is_available() else None
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=device_ids, process_group=mpu.get_data_parallel_group()
    )


def dpo_train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[Mapping[str, torch.Tensor]],
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    rpo_alpha: float | None = None,
    pad_token_id: int = 0,
) -> dict[str, float]:
    """One optimizer step over this data-parallel rank's micro-batches; DPO metrics of the step.

    Each micro-batch holds the pair tensors and `ref_chosen_logps` / `ref_rejected_logps`.
    Every rank of the model must call it (it reduces over the data-parallel group).
    """
    require_megatron("chatlearn.megatron.dpo")
    from megatron.core import parallel_state as mpu

    dp_group = mpu.get_data_parallel_group()
    dp_size = mpu.get_data_parallel_world_size()
    num_local = sum(int(mb["chosen_input_ids"].shape[0]) for mb in micro_batches)
    num_global = torch.tensor([num_local], dtype=torch.int64, device=collective_device())
    if dp_size > 1:
        torch.distributed.all_reduce(num_global, group=dp_group)

    model.train()
    optimizer.zero_grad(set_to_none=True)
    metrics = DPOMetrics(with_nll=rpo_alpha is not None)
    no_sync = getattr(model, "no_sync", None)  # DDP's; absent with one data-parallel rank
    for index, micro_batch in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        # DDP all-reduces on every backward unless told not to: once per step is enough.
        with contextlib.nullcontext() if last or no_sync is None else no_sync():
            policy = concatenated_logps(model, micro_batch, pad_token_id=pad_token_id)
            out = compute_dpo(
                policy,
                micro_batch["ref_chosen_logps"],
                micro_batch["ref_rejected_logps"],
                beta=beta,
                loss_type=loss_type,
                label_smoothing=label_smoothing,
                rpo_alpha=rpo_alpha,
            )
            loss = accumulation_loss(
                out.losses, num_samples_global=int(num_global.item()), world_size=dp_size
            )
            loss.backward()
        metrics.update(out)
    optimizer.step()
    return metrics.all_reduce(group=dp_group).compute()
