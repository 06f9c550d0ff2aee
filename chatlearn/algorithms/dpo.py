"""Direct Preference Optimization: response log-probs, the loss, and exact metrics.

How a trainer uses this module, one optimizer step over micro-batches:

    metrics = DPOMetrics(with_nll=rpo_alpha is not None)
    for micro_batch in data_list:
        policy = concatenated_logps(model, micro_batch)        # one forward: chosen + rejected
        out = compute_dpo(policy, micro_batch["ref_chosen_logps"],     # from reference_outputs
                          micro_batch["ref_rejected_logps"], beta=0.1, loss_type="sigmoid")
        accumulation_loss(out.losses, num_samples_global=n, world_size=dp).backward()
        metrics.update(out)
    optimizer.step()
    return metrics.all_reduce().compute()                    # {"loss": ..., "rewards/...": ...}

Batch convention (what the dataset's collate_fn produces and the reference passes on). One row is
one preference pair; chosen and rejected are separate right-padded tensors:
`chosen_input_ids`, `chosen_attention_mask`, `chosen_loss_mask` and the same three `rejected_*`.
`loss_mask[i, t] == 1` marks response tokens: token t's log-prob (predicted from position t - 1)
counts. Prompt and padding are 0. A mask instead of labels = -100 because the engine pads
re-batched tensors with 0 by default, and 0 is the right padding for a mask: the value of a padded
input id then never matters.

Formulas follow TRL's DPOTrainer (loss types sigmoid with label smoothing = cDPO, ipo, hinge; RPO
adds alpha times the chosen response's NLL). Differences, both chosen for exact aggregation:
- `nll_loss` is per sample (the mean over that sample's response tokens), then averaged over
  samples; TRL averages over all chosen tokens of a batch, weighting long responses more.
- All metrics are means over samples of the whole step, exact across micro-batches and ranks of
  unequal sizes (TRL averages per-batch means).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from chatlearn.algorithms.logps import scored_logps, sequence_logps
from chatlearn.algorithms.packing import (
    PAIR_KEYS,
    SEGMENT_ATTENTION,
    Packed,
    pack_pairs,
    real_tokens,
)
from chatlearn.algorithms.token_budget import split_batch

LOSS_TYPES = ("sigmoid", "ipo", "hinge")

# Metric names as TRL logs them; `nll_loss` only when the RPO term is used.
METRIC_NAMES = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)
NLL_METRIC = "nll_loss"

REF_CHOSEN_KEY = "ref_chosen_logps"
REF_REJECTED_KEY = "ref_rejected_logps"


class PairLogps(NamedTuple):
    """Per-pair summed response log-probs and response token counts of one forward."""

    chosen: torch.Tensor  # [B] sum of log-probs of the chosen response tokens
    rejected: torch.Tensor  # [B]
    chosen_num_tokens: torch.Tensor  # [B] number of chosen response tokens
    rejected_num_tokens: torch.Tensor  # [B]
    num_real_tokens: int = 0  # neither padding nor a repeated prompt (packing.real_tokens)
    num_computed_tokens: int = 0  # what the forward ran over: rows × row length


@dataclass(frozen=True, slots=True)
class DPOOutput:
    """Per-sample results of one micro-batch; `losses` is what to reduce and backpropagate."""

    losses: torch.Tensor  # DPO loss, plus rpo_alpha * nll when RPO is on
    chosen_rewards: torch.Tensor  # detached
    rejected_rewards: torch.Tensor  # detached
    chosen_logps: torch.Tensor  # the log-probs the loss used (length-averaged for ipo), detached
    rejected_logps: torch.Tensor
    nll: torch.Tensor | None = None  # detached per-sample NLL of the chosen response


# ---------------------------------------------------------------------------------------------
# Concatenated forward


def concatenate_pairs(batch: Mapping[str, torch.Tensor], *, pad_token_id: int = 0) -> dict:
    """Stack chosen rows over rejected rows ([2B, L], chosen first), right-padded to one length.

    One forward over both halves costs less than two (one kernel launch chain, better GEMM shapes).
    """
    chosen = [batch[f"chosen_{key}"] for key in PAIR_KEYS]
    rejected = [batch[f"rejected_{key}"] for key in PAIR_KEYS]
    if chosen[0].shape[0] != rejected[0].shape[0]:
        raise ValueError(
            f"chosen and rejected must have the same number of rows, got "
            f"{chosen[0].shape[0]} and {rejected[0].shape[0]}"
        )
    length = max(chosen[0].shape[1], rejected[0].shape[1])
    out: dict[str, torch.Tensor] = {}
    for key, c, r in zip(PAIR_KEYS, chosen, rejected, strict=True):
        pad = pad_token_id if key == "input_ids" else 0
        out[key] = torch.cat([_right_pad(c, length, pad), _right_pad(r, length, pad)], dim=0)
    return out


def split_pairs(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `concatenate_pairs` on dim 0: (chosen half, rejected half)."""
    if values.shape[0] % 2:
        raise ValueError(f"expected an even number of rows, got {values.shape[0]}")
    half = values.shape[0] // 2
    return values[:half], values[half:]


def _right_pad(x: torch.Tensor, length: int, value: int) -> torch.Tensor:
    if x.shape[1] == length:
        return x
    return F.pad(x, (0, length - x.shape[1]), value=value)


def concatenated_logps(
    model: Callable[..., Any],
    batch: Mapping[str, torch.Tensor],
    *,
    pad_token_id: int = 0,
    packing: bool = False,
    prefix_sharing: bool = False,
    max_tokens_per_row: int | None = None,
    mask_format: str | None = None,
) -> PairLogps:
    """Run `model` once over chosen + rejected and return per-pair response log-probs.

    `model` is called as `model(input_ids=..., attention_mask=...)` and may return a tensor of
    logits or an object with `.logits` (Hugging Face causal LMs); a
    `chatlearn.algorithms.logps.SequenceLogps` (bare or inside DDP) is called with the loss mask
    too and returns the summed log-probs itself, chunk by chunk. Tensors are moved to the device
    of the model's first parameter when it has one.

    `packing` / `prefix_sharing` (`chatlearn.algorithms.packing`): the sequences in one row (or
    rows of at most `max_tokens_per_row` tokens) without padding / each pair's prompt computed
    once; the model then also gets `position_ids` and a 4-D `attention_mask` (`mask_format`
    "bool" for SDPA, "additive" for eager attention; None: from the model's config), so it must
    honour both (see `chatlearn.hf.packing.packing_support` for Hugging Face models).
    """
    if packing or prefix_sharing:
        return _packed_logps(
            model,
            batch,
            packing=packing,
            prefix_sharing=prefix_sharing,
            max_tokens_per_row=max_tokens_per_row,
            pad_token_id=pad_token_id,
            mask_format=mask_format or _mask_format(model),
        )
    cat = concatenate_pairs(batch, pad_token_id=pad_token_id)
    device = _model_device(model)
    if device is not None:
        cat = {key: value.to(device, non_blocking=True) for key, value in cat.items()}
    if getattr(getattr(model, "module", model), "returns_sequence_logps", False):
        logps, num_tokens = model(
            input_ids=cat["input_ids"],
            attention_mask=cat["attention_mask"],
            loss_mask=cat["loss_mask"],
        )
    else:
        output = model(input_ids=cat["input_ids"], attention_mask=cat["attention_mask"])
        logits = output if isinstance(output, torch.Tensor) else output.logits
        logps, num_tokens = sequence_logps(logits, cat["input_ids"], cat["loss_mask"])
    chosen, rejected = split_pairs(logps)
    chosen_num, rejected_num = split_pairs(num_tokens)
    computed = int(cat["input_ids"].numel())
    return PairLogps(chosen, rejected, chosen_num, rejected_num, real_tokens(batch), computed)


def _packed_logps(
    model: Callable[..., Any],
    batch: Mapping[str, torch.Tensor],
    *,
    packing: bool,
    prefix_sharing: bool,
    max_tokens_per_row: int | None,
    pad_token_id: int,
    mask_format: str,
) -> PairLogps:
    packed = pack_pairs(
        batch,
        packing=packing,
        prefix_sharing=prefix_sharing,
        max_tokens_per_row=max_tokens_per_row,
        pad_token_id=pad_token_id,
        mask_format=mask_format,
    )
    device = _model_device(model)
    if device is not None:
        packed = packed.to(device)
    if mask_format == "additive":  # the model adds it to its scores: its dtype, its minimum
        packed = _additive_in(packed, _model_dtype(model))
    inputs: dict[str, Any] = {
        "input_ids": packed.input_ids,
        "attention_mask": packed.attention_mask,
        "position_ids": packed.position_ids,
    }
    if getattr(getattr(model, "module", model), "returns_sequence_logps", False):
        logps, num_tokens = model(**inputs, packed=packed)
    else:
        if packed.segments is not None:  # to the attention (chatlearn.hf.packing)
            inputs["packed_segments"] = packed.segments
        output = model(**inputs)
        logits = output if isinstance(output, torch.Tensor) else output.logits
        logps, num_tokens = scored_logps(None, logits, packed)
    chosen, rejected = split_pairs(logps)
    chosen_num, rejected_num = split_pairs(num_tokens)
    return PairLogps(
        chosen,
        rejected,
        chosen_num,
        rejected_num,
        real_tokens(batch),
        packed.num_computed_tokens,
    )


def _mask_format(model: Any) -> str:
    """ "additive" for a model whose attention adds the mask to its scores (HF eager),
    "segments" for one that attends by `Packed.segments` (chatlearn.hf.packing)."""
    inner = getattr(model, "module", model)  # DDP
    for candidate in (inner, getattr(inner, "body", None)):  # SequenceLogps: its decoder
        config = getattr(candidate, "config", None)
        if config is not None:
            implementation = config._attn_implementation
            if implementation == SEGMENT_ATTENTION:
                return "segments"
            return "additive" if implementation == "eager" else "bool"
    return "bool"


def _model_dtype(model: Any) -> torch.dtype:
    parameters = getattr(model, "parameters", None)
    first = None if parameters is None else next(iter(parameters()), None)
    if first is None or not first.is_floating_point():
        return torch.float32
    return first.dtype


def _additive_in(packed: Packed, dtype: torch.dtype) -> Packed:
    blocked = packed.attention_mask < 0
    mask = torch.zeros(blocked.shape, dtype=dtype, device=blocked.device)
    return dataclasses.replace(
        packed, attention_mask=mask.masked_fill_(blocked, torch.finfo(dtype).min)
    )


def reference_outputs(
    model: Callable[..., Any],
    batch: Mapping[str, torch.Tensor],
    *,
    pad_token_id: int = 0,
    packing: bool = False,
    prefix_sharing: bool = False,
    max_tokens_per_row: int | None = None,
    max_tokens_per_micro_batch: int | None = None,
    agree: Callable[[int], int] | None = None,
) -> dict[str, torch.Tensor]:
    """What a reference's `forward_step` returns: the pair tensors the trainer needs plus
    `ref_chosen_logps` / `ref_rejected_logps` (summed, [B]), all on CPU.

    The engine does not merge a forward output with its input, hence the batch is passed on here.
    The packing options are `concatenated_logps`'s. With `max_tokens_per_micro_batch` the pairs
    run in forwards of at most that many tokens (`chatlearn.algorithms.token_budget`; `agree`:
    the number of forwards every rank of a sharded model runs, from this rank's count).
    """
    options: dict[str, Any] = {
        "pad_token_id": pad_token_id,
        "packing": packing,
        "prefix_sharing": prefix_sharing,
        "max_tokens_per_row": max_tokens_per_row,
    }
    rows = int(batch["chosen_input_ids"].shape[0])
    chosen = torch.zeros(rows, dtype=torch.float32)
    rejected = torch.zeros(rows, dtype=torch.float32)
    parts: Sequence[tuple[list[int], Mapping[str, Any]]]
    if max_tokens_per_micro_batch is None:
        parts = [(list(range(rows)), batch)]
    else:
        parts = split_batch(
            batch,
            max_tokens_per_micro_batch,
            packing=packing,
            prefix_sharing=prefix_sharing,
            agree=agree,
        )
    with torch.no_grad():
        for indices, part in parts:
            logps = concatenated_logps(model, part, **options)
            index = torch.tensor(indices, dtype=torch.long)
            chosen[index] = logps.chosen.float().cpu()
            rejected[index] = logps.rejected.float().cpu()
    out = {
        f"{side}_{key}": batch[f"{side}_{key}"].cpu()
        for side in ("chosen", "rejected")
        for key in PAIR_KEYS
    }
    out[REF_CHOSEN_KEY] = chosen
    out[REF_REJECTED_KEY] = rejected
    return out


def _model_device(model: Any) -> torch.device | None:
    parameters = getattr(model, "parameters", None)
    if parameters is None:
        return None
    first = next(iter(parameters()), None)
    return None if first is None else first.device


# ---------------------------------------------------------------------------------------------
# Loss


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample `(losses, chosen_rewards, rejected_rewards)`; rewards are detached.

    With h = (pc - pr) - (rc - rr), the policy's log-ratio margin over the reference's:
    - sigmoid: -(1 - ε)·log σ(β·h) - ε·log σ(-β·h)   (ε = label_smoothing: cDPO; ε = 0: DPO)
    - ipo:     (h - 1/(2β))²                          (pass length-averaged log-probs, as TRL)
    - hinge:   max(0, 1 - β·h)
    Rewards: β·(pc - rc) and β·(pr - rr).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing applies to loss_type 'sigmoid' only, not {loss_type!r}")
    shape = policy_chosen_logps.shape
    for other in (policy_rejected_logps, ref_chosen_logps, ref_rejected_logps):
        if other.shape != shape:
            raise ValueError(f"log-prob shapes differ: {tuple(shape)} vs {tuple(other.shape)}")
    ref_chosen_logps = ref_chosen_logps.to(policy_chosen_logps)
    ref_rejected_logps = ref_rejected_logps.to(policy_chosen_logps)

    margin = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * margin) * (1.0 - label_smoothing)
        if label_smoothing:
            losses = losses - F.logsigmoid(-beta * margin) * label_smoothing
    elif loss_type == "ipo":
        losses = (margin - 1.0 / (2.0 * beta)) ** 2
    else:
        losses = torch.relu(1.0 - beta * margin)
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def nll_loss(chosen_logps: torch.Tensor, chosen_num_tokens: torch.Tensor) -> torch.Tensor:
    """Per-sample negative log-likelihood of the chosen response, averaged over its tokens."""
    return -chosen_logps / chosen_num_tokens.clamp(min=1)


def compute_dpo(
    policy: PairLogps,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    rpo_alpha: float | None = None,
) -> DPOOutput:
    """The full per-sample objective of one micro-batch from summed log-probs.

    The reference always provides summed log-probs; for ipo both sides are divided by the
    response length here (the same token counts: policy and reference score the same tokens).
    """
    pc, pr = policy.chosen, policy.rejected
    ref_c = ref_chosen_logps.to(pc)
    ref_r = ref_rejected_logps.to(pc)
    if loss_type == "ipo":
        chosen_len = policy.chosen_num_tokens.clamp(min=1)
        rejected_len = policy.rejected_num_tokens.clamp(min=1)
        pc, pr = pc / chosen_len, pr / rejected_len
        ref_c, ref_r = ref_c / chosen_len, ref_r / rejected_len
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        pc, pr, ref_c, ref_r, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing
    )
    nll = None
    if rpo_alpha is not None:
        nll_with_grad = nll_loss(policy.chosen, policy.chosen_num_tokens)
        losses = losses + rpo_alpha * nll_with_grad
        nll = nll_with_grad.detach()
    return DPOOutput(
        losses=losses,
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        chosen_logps=pc.detach(),
        rejected_logps=pr.detach(),
        nll=nll,
    )


def accumulation_loss(
    losses: torch.Tensor, *, num_samples_global: int, world_size: int = 1
) -> torch.Tensor:
    """The scalar to backpropagate for one micro-batch so that a whole step's gradient is the
    gradient of the mean loss over all `num_samples_global` samples of the step (every micro-batch
    on every data-parallel rank), whatever the micro-batch sizes.

    DDP averages gradients over ranks, hence the factor `world_size`.
    """
    if num_samples_global <= 0:
        raise ValueError(f"num_samples_global must be > 0, got {num_samples_global}")
    return losses.sum() * (world_size / num_samples_global)
