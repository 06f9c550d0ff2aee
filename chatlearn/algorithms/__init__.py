"""Training algorithms the model modules build on: DPO losses, log-probs (chunked, packed), metrics.

Layer 1 (docs/architecture.md, "Layers"): may import `transport` only; plain torch
functions and modules that `hf` and `megatron` build on.
"""

from __future__ import annotations

from chatlearn.algorithms.dpo import (
    LOSS_TYPES,
    METRIC_NAMES,
    NLL_METRIC,
    REF_CHOSEN_KEY,
    REF_REJECTED_KEY,
    DPOOutput,
    PairLogps,
    accumulation_loss,
    compute_dpo,
    concatenate_pairs,
    concatenated_logps,
    dpo_loss,
    nll_loss,
    reference_outputs,
    split_pairs,
)
from chatlearn.algorithms.logps import (
    DEFAULT_CHUNK_SIZE,
    SequenceLogps,
    chunked_sequence_logps,
    scored_logps,
    sequence_logps,
)
from chatlearn.algorithms.metrics import DPOMetrics
from chatlearn.algorithms.packing import Packed, pack_pairs, pack_sequences, real_tokens

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "LOSS_TYPES",
    "METRIC_NAMES",
    "NLL_METRIC",
    "REF_CHOSEN_KEY",
    "REF_REJECTED_KEY",
    "DPOMetrics",
    "DPOOutput",
    "Packed",
    "PairLogps",
    "SequenceLogps",
    "accumulation_loss",
    "chunked_sequence_logps",
    "compute_dpo",
    "concatenate_pairs",
    "concatenated_logps",
    "dpo_loss",
    "nll_loss",
    "pack_pairs",
    "pack_sequences",
    "real_tokens",
    "reference_outputs",
    "scored_logps",
    "sequence_logps",
    "split_pairs",
]
