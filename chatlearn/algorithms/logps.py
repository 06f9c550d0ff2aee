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

What a model's forward does to the head's output before returning its logits is applied to each
chunk too (``LogitMap``, read from the config by `logit_map`): Gemma2/Gemma3's final logit
soft-capping, Cohere's ``logit_scale``, Granite's ``logits_scaling``. A model whose forward does
something else there would be trained on log-probs that are not its own, so
`SequenceLogps.from_causal_lm` compares both on a few tokens once (`logps_gap`) and, where they
disagree, takes the log-probs from the model's own forward: its whole ``[rows, length, vocab]``
logits, the memory the chunks save (``full_logits`` says why, for the caller to warn once).

``SequenceLogps`` is an ``nn.Module`` on purpose: it is what gets wrapped by DDP or sharded as
FSDP2's root, so that calling it runs the wrappers' hooks (an FSDP2 root's parameters — the
embeddings, the final norm, the lm head — are only gathered in the root's pre-forward hook; a
direct ``model.model(...)`` call would see their shards).
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from chatlearn.algorithms.packing import Packed

# Response tokens per chunk: 512 × 152k (Qwen2.5's vocabulary) × 4 bytes ≈ 0.3 GB of logits.
DEFAULT_CHUNK_SIZE = 512
# The setup check (`logps_gap`): this many tokens, and the largest per-token gap tolerated, in
# nats, by the dtype the weights compute in. Both sides run the same batch through the same
# body; what differs is rounding in the head and after it (TF32 matmuls in fp32; bf16
# soft-capping of logits near ±30 moves them by up to 0.06), while a missed scale or cap of a
# trained model moves log-probs by nats.
CHECK_TOKENS = 8
CHECK_TOLERANCE = {torch.bfloat16: 0.25, torch.float16: 0.25}  # others: 0.01


@dataclass(frozen=True, slots=True)
class LogitMap:
    """What a causal LM's forward does to its head's output: ``logits * scale``, then
    ``softcap * tanh(logits / softcap)`` (None: no cap). Applied in float32 or wider."""

    scale: float = 1.0
    softcap: float | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def logit_map(model: Any) -> LogitMap | None:
    """The known post-processing of a Hugging Face causal LM's head output (None: none), as its
    ``forward`` in transformers does it:

    - ``config.final_logit_softcapping`` (Gemma2, Gemma3, Gemma3n, VaultGemma; None: off);
    - the model's ``logit_scale`` (Cohere, Cohere2: ``config.logit_scale``, multiplies);
    - ``config.logits_scaling`` (Granite, GraniteMoe*: divides).

    Read by attribute, so that their relatives are covered too; the setup check
    (`SequenceLogps.from_causal_lm`) catches a model that has one and does something else.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    multiplier = getattr(base, "logit_scale", None)
    divisor = getattr(config, "logits_scaling", None)
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = float(multiplier) if isinstance(multiplier, numbers.Real) else 1.0
    if isinstance(divisor, numbers.Real):
        scale /= float(divisor)
    softcap = float(softcap) if isinstance(softcap, numbers.Real) else None
    return None if scale == 1.0 and softcap is None else LogitMap(scale, softcap)


def sequence_logps(
    logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log p(token t | tokens < t) over positions where loss_mask is 1, and their count.

    logits: [N, L, V] from a causal LM over input_ids [N, L]. Computed in float32 whatever the
    model dtype (float64 stays float64), as gather minus logsumexp, so no [N, L, V] log-softmax
    tensor is kept.
    """
    if logits.shape[:2] != input_ids.shape or loss_mask.shape != input_ids.shape:
        raise ValueError(
            f"shape mismatch: logits {tuple(logits.shape)}, input_ids {tuple(input_ids.shape)}, "
            f"loss_mask {tuple(loss_mask.shape)}"
        )
    # the logit at position t - 1 predicts token t: the first token is never scored
    logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    targets = input_ids[:, 1:]
    mask = loss_mask[:, 1:].to(logits.dtype)
    token_logps = torch.gather(logits, 2, targets.unsqueeze(-1)).squeeze(-1)
    token_logps = token_logps - torch.logsumexp(logits, dim=-1)
    return (token_logps * mask).sum(-1), mask.sum(-1)


def chunked_sequence_logps(
    hidden: torch.Tensor,
    head: nn.Module,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    post: LogitMap | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`sequence_logps(post(head(hidden)), input_ids, loss_mask)` without the full logits.

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
    token_logps = token_logps_chunked(head, states, targets, chunk_size=chunk_size, post=post)
    sums = hidden.new_zeros(hidden.shape[0], dtype=out_dtype).index_add(0, rows, token_logps)
    num_tokens = loss_mask[:, 1:].to(out_dtype).sum(-1)
    return sums, num_tokens


def token_logps_chunked(
    head: nn.Module | None,
    states: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_size: int,
    post: LogitMap | None = None,
) -> torch.Tensor:
    """log p(target) for each of the [K, H] `states` ([K] in float32 or wider): `chunk_size` of
    them at a time through `head` then `post`, each chunk checkpointed; chunk_size 0: all at
    once, no checkpoint. head None: `states` are logits already."""
    if head is None or chunk_size == 0 or targets.shape[0] == 0:
        # no token to score (every response of the forward has none): through the head all the
        # same (zero rows: no cost), so the sums stay in the graph: detached zeros failed the
        # train step's backward with "element 0 of tensors does not require grad", and under
        # DDP every parameter must take part in each backward
        return _token_logps(head, states, targets, post)
    pieces = [
        checkpoint(
            _token_logps,
            head,
            states[start : start + chunk_size],
            targets[start : start + chunk_size],
            post,
            use_reentrant=False,
        )
        for start in range(0, targets.shape[0], chunk_size)
    ]
    return torch.cat(pieces)


def _token_logps(
    head: nn.Module | None,
    states: torch.Tensor,
    targets: torch.Tensor,
    post: LogitMap | None = None,
) -> torch.Tensor:
    logits = _mapped(states if head is None else head(states), post)
    picked = torch.gather(logits, 1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def _mapped(logits: torch.Tensor, post: LogitMap | None) -> torch.Tensor:
    """``logits`` in float32 or wider, then mapped by ``post`` (the model's own post-processing
    of its head's output, `logit_map`)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return logits if post is None else post(logits)


def scored_logps(
    head: torch.nn.Module | None,
    hidden: torch.Tensor,
    packed: Packed,
    *,
    chunk_size: int = 0,
    post: LogitMap | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence summed log-probs and scored-token counts ([num_sequences] each).

    hidden: [R, T, H] states for `head` then `post` (head None: `hidden` already holds the
    logits [R, T, V]).
    chunk_size > 0 runs the head chunk by chunk under checkpointing, as
    `chatlearn.algorithms.logps.chunked_sequence_logps`.
    """
    sources, targets, owners = packed.scoring.to(hidden.device)
    states = hidden.reshape(-1, hidden.shape[-1])[sources]
    out_dtype = torch.promote_types(hidden.dtype, torch.float32)
    token_logps = token_logps_chunked(head, states, targets, chunk_size=chunk_size, post=post)
    sums = hidden.new_zeros(packed.num_sequences, dtype=out_dtype).index_add(
        0, owners, token_logps.to(out_dtype)
    )
    counts = torch.bincount(owners, minlength=packed.num_sequences).to(out_dtype)
    return sums, counts


class SequenceLogps(nn.Module):
    """Per-row summed response log-probs of a causal LM split as body (→ hidden states) + head.

    `chunk_size` > 0: `chunked_sequence_logps`; 0: the direct computation (full logits), kept to
    compare against and for models whose head is not a per-position map. `post`: what the
    model's forward does to the head's output (`logit_map`). `full_logits` (a reason, set by
    `from_causal_lm`): the log-probs come from the model's own forward instead.
    """

    returns_sequence_logps = True  # concatenated_logps calls it with the loss mask

    def __init__(
        self,
        body: nn.Module,
        head: nn.Module,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        post: LogitMap | None = None,
    ):
        super().__init__()
        if chunk_size < 0:
            raise ValueError(f"logps_chunk_size must be >= 0 (0: no chunking), got {chunk_size}")
        self.body = body
        self.head = head
        self.chunk_size = int(chunk_size)
        self.post = post
        self.full_logits: str | None = None
        # the whole model, for `full_logits` only; not a submodule, so that parameter names
        # (checkpoints, FSDP2's root) stay body.* and head.*
        self.__dict__["causal_lm"] = None

    @classmethod
    def from_causal_lm(
        cls, model: Any, *, chunk_size: int = DEFAULT_CHUNK_SIZE, check: bool = True
    ) -> SequenceLogps:
        """A Hugging Face causal LM (or a peft model around one): its decoder and output head,
        with the known post-processing of its logits (`logit_map`).

        `check`: compare with the model's own log-probs on a few tokens (`logps_gap`); beyond
        the tolerance of the logits' dtype, the model's forward changes its logits in a way not
        known here, and the network computes from that forward (`full_logits` says why). Call it
        before the layout wraps or shards the model: the check is then a local forward on every
        rank (no collective), on the same weights and tokens, so every rank decides alike.
        """
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        body, head = base.get_decoder(), base.get_output_embeddings()
        if body is None or head is None:
            raise ValueError(f"{type(base).__name__} has no decoder/output head to split")
        network = cls(body, head, chunk_size=chunk_size, post=logit_map(base))
        if check:
            gap, dtype = logps_gap(network, base)
            if gap > CHECK_TOLERANCE.get(dtype, 0.01):
                network.use_model_forward(
                    base, f"log-probs {gap:.3g} nats apart on {CHECK_TOKENS} tokens"
                )
        return network

    def use_model_forward(self, base: Any, evidence: str) -> None:
        """Log-probs from `base`'s own forward (the whole logits), whose logits differ from the
        head's output in a way not known here (`evidence`: how that was found)."""
        kind = getattr(getattr(base, "config", None), "model_type", type(base).__name__)
        self.full_logits = (
            f"model_type {kind!r}: its forward changes the logits after the output head in a "
            f"way not known here ({evidence})"
        )
        self.__dict__["causal_lm"] = base
        self.post = None  # the forward does it

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
        passed separately so that DDP/FSDP2 see them as the forward's inputs). Padded rows
        without `position_ids` count positions from each row's first token, not from the row's
        start: a left-padded row otherwise shifted a learned position embedding (GPT-2's) by its
        padding, and its log-probs were off by tenths of a nat without a word."""
        extra = {}
        if packed is not None and packed.segments is not None:  # to the attention
            extra["packed_segments"] = packed.segments
        if position_ids is None and packed is None and attention_mask.dim() == 2:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)
        causal_lm = self.__dict__["causal_lm"]
        model = self.body if causal_lm is None else causal_lm
        output = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            **extra,
        )
        if model is not self.body:  # `full_logits`: the model's own logits, no head to run
            head, hidden, chunk_size = None, output.logits, 0
        else:
            head, chunk_size = self.head, self.chunk_size
            hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        if packed is not None:
            return scored_logps(head, hidden, packed, chunk_size=chunk_size, post=self.post)
        if loss_mask is None:
            raise ValueError("SequenceLogps needs a loss_mask (padded rows) or packed")
        if head is None or chunk_size == 0:
            logits = hidden if head is None else head(hidden)
            if self.post is not None:
                logits = _mapped(logits, self.post)
            return sequence_logps(logits, input_ids, loss_mask)
        return chunked_sequence_logps(
            hidden, head, input_ids, loss_mask, chunk_size=chunk_size, post=self.post
        )


@torch.no_grad()
def logps_gap(network: SequenceLogps, model: Any) -> tuple[float, torch.dtype]:
    """The largest gap, in nats, between `network`'s log-probs of `CHECK_TOKENS` fixed tokens and
    those of `model`'s own logits, and the dtype its embeddings compute in (the logits a model
    returns may have been cast to float32 after a bf16 head: the head's rounding is what is
    tolerated). Both run in eval mode (dropout off) on the same batch; every module's mode is
    restored (`modes_kept`); padded rows, the path the check is for (packing changes the
    attention, not the head)."""
    with modes_kept(model):
        model.eval()
        weight = model.get_input_embeddings().weight
        ids = (torch.arange(CHECK_TOKENS, device=weight.device) * 7919 + 1) % weight.shape[0]
        rows = ids.repeat(CHECK_TOKENS - 1, 1)  # row i scores token i + 1 only
        loss_mask = torch.eye(CHECK_TOKENS, dtype=torch.long, device=ids.device)[1:]
        attention = torch.ones_like(rows)
        ours, _ = network(rows, attention, loss_mask)
        logits = model(input_ids=rows, attention_mask=attention, use_cache=False).logits[0]
        theirs = logits[:-1].float().log_softmax(-1).gather(1, ids[1:, None]).squeeze(1)
        return float((ours.float() - theirs).abs().max()), weight.dtype


@contextlib.contextmanager
def modes_kept(model: nn.Module) -> Iterator[None]:
    """Every module's train/eval mode as it was, after whatever runs inside (a check that
    switches the model to one mode must not leave a submodule, a peft adapter's dropout say, in
    it)."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
