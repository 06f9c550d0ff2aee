"""Memory-bounded response log-probs: never the whole batch's ``[N, L, vocab]`` logits.

A causal LM's log-prob of its response tokens only needs the logits of those tokens, and only one
chunk of them at a time: the decoder body runs to hidden states, then for each chunk of
``chunk_size`` response tokens the lm head, log-softmax and the gather of the target token run
under ``torch.utils.checkpoint``, so the chunk's logits are freed at once and recomputed in
backward. Peak memory of the loss is then about ``chunk_size × vocab`` floats (a few of them in
backward) instead of ``N × L × vocab``: with a 152k vocabulary and 8 pairs of 2,048 tokens,
about 0.3 GB per 512-token chunk instead of 20 GB.

    network = SequenceLogps(body, head, chunk_size=512)   # body: decoder → hidden states
    logps, num_tokens = network(input_ids, attention_mask, loss_mask)   # [N], [N]

``SequenceLogps`` is an ``nn.Module`` on purpose: it is what gets wrapped by DDP or sharded as
FSDP2's root, so that calling it runs the wrappers' hooks (an FSDP2 root's parameters — the
embeddings, the final norm, the lm head — are only gathered in the root's pre-forward hook; a
direct ``model.model(...)`` call would see their shards).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from chatlearn.algorithms.dpo import sequence_logps
from chatlearn.algorithms.packing import Packed

# Response tokens per chunk: 512 × 152k (Qwen2.5's vocabulary) × 4 bytes ≈ 0.3 GB of logits.
DEFAULT_CHUNK_SIZE = 512


def chunked_sequence_logps(
    hidden: torch.Tensor,
    head: nn.Module,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`sequence_logps(head(hidden), input_ids, loss_mask)` without the full logits.

    hidden: [N, L, H] from the decoder body. Only the positions that predict a response token
    (loss_mask[:, t] == 1 scores the hidden state at t - 1) go through the head, `chunk_size` of
    them at a time, each chunk checkpointed (recomputed in backward).
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size} (0 means: use the direct path)")
    if hidden.shape[:2] != input_ids.shape or loss_mask.shape != input_ids.shape:
        raise ValueError(
            f"shape mismatch: hidden {tuple(hidden.shape)}, input_ids {tuple(input_ids.shape)}, "
            f"loss_mask {tuple(loss_mask.shape)}"
        )
    selected = loss_mask[:, 1:].bool()
    rows = torch.nonzero(selected, as_tuple=True)[0]
    states = hidden[:, :-1][selected]  # [T, H]: the states that predict a response token
    targets = input_ids[:, 1:][selected]  # [T]
    out_dtype = torch.promote_types(hidden.dtype, torch.float32)
    token_logps = token_logps_chunked(head, states, targets, chunk_size=chunk_size)
    sums = hidden.new_zeros(hidden.shape[0], dtype=out_dtype).index_add(0, rows, token_logps)
    num_tokens = loss_mask[:, 1:].to(out_dtype).sum(-1)
    return sums, num_tokens


def token_logps_chunked(
    head: nn.Module | None, states: torch.Tensor, targets: torch.Tensor, *, chunk_size: int
) -> torch.Tensor:
    """log p(target) for each of the [K, H] `states` ([K] in float32 or wider): `chunk_size` of
    them at a time through `head`, each chunk checkpointed; chunk_size 0: all at once, no
    checkpoint. head None: `states` are logits already."""
    if head is None or chunk_size == 0:
        return _token_logps(head, states, targets)
    pieces = [
        checkpoint(
            _token_logps,
            head,
            states[start : start + chunk_size],
            targets[start : start + chunk_size],
            use_reentrant=False,
        )
        for start in range(0, targets.shape[0], chunk_size)
    ]
    if not pieces:
        dtype = torch.promote_types(states.dtype, torch.float32)
        return states.new_zeros(0, dtype=dtype)
    return torch.cat(pieces)


def _token_logps(
    head: nn.Module | None, states: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    logits = states if head is None else head(states)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    picked = torch.gather(logits, 1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def scored_logps(
    head: torch.nn.Module | None,
    hidden: torch.Tensor,
    packed: Packed,
    *,
    chunk_size: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence summed log-probs and scored-token counts ([num_sequences] each).

    hidden: [R, T, H] states for `head` (None: `hidden` already holds the logits [R, T, V]).
    chunk_size > 0 runs the head chunk by chunk under checkpointing, as
    `chatlearn.algorithms.logps.chunked_sequence_logps`.
    """
    sources, targets, owners = packed.scoring.to(hidden.device)
    states = hidden.reshape(-1, hidden.shape[-1])[sources]
    out_dtype = torch.promote_types(hidden.dtype, torch.float32)
    token_logps = token_logps_chunked(head, states, targets, chunk_size=chunk_size)
    sums = hidden.new_zeros(packed.num_sequences, dtype=out_dtype).index_add(
        0, owners, token_logps.to(out_dtype)
    )
    counts = torch.bincount(owners, minlength=packed.num_sequences).to(out_dtype)
    return sums, counts


class SequenceLogps(nn.Module):
    """Per-row summed response log-probs of a causal LM split as body (→ hidden states) + head.

    `chunk_size` > 0: `chunked_sequence_logps`; 0: the direct computation (full logits), kept to
    compare against and for models whose head is not a per-position map.
    """

    returns_sequence_logps = True  # concatenated_logps calls it with the loss mask

    def __init__(self, body: nn.Module, head: nn.Module, *, chunk_size: int = DEFAULT_CHUNK_SIZE):
        super().__init__()
        if chunk_size < 0:
            raise ValueError(f"logps_chunk_size must be >= 0 (0: no chunking), got {chunk_size}")
        self.body = body
        self.head = head
        self.chunk_size = int(chunk_size)

    @classmethod
    def from_causal_lm(cls, model: Any, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> SequenceLogps:
        """A Hugging Face causal LM (or a peft model around one): its decoder and output head."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        body, head = base.get_decoder(), base.get_output_embeddings()
        if body is None or head is None:
            raise ValueError(f"{type(base).__name__} has no decoder/output head to split")
        return cls(body, head, chunk_size=chunk_size)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        loss_mask: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        packed: Packed | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded rows (`loss_mask` [N, L]: per-row sums) or a packed layout (`packed`, from
        `chatlearn.algorithms.packing`: per-sequence sums; its tensors are the other arguments,
        passed separately so that DDP/FSDP2 see them as the forward's inputs)."""
        extra = {}
        if packed is not None and packed.segments is not None:  # to the attention
            extra["packed_segments"] = packed.segments
        output = self.body(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            **extra,
        )
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        if packed is not None:
            return scored_logps(self.head, hidden, packed, chunk_size=self.chunk_size)
        if loss_mask is None:
            raise ValueError("SequenceLogps needs a loss_mask (padded rows) or packed")
        if self.chunk_size == 0:
            return sequence_logps(self.head(hidden), input_ids, loss_mask)
        return chunked_sequence_logps(
            hidden, self.head, input_ids, loss_mask, chunk_size=self.chunk_size
        )
