"""Training algorithms on top of the engine: DPO losses, log-probs and metrics."""

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
    sequence_logps,
    split_pairs,
)
from chatlearn.algorithms.logps import DEFAULT_CHUNK_SIZE, SequenceLogps, chunked_sequence_logps
from chatlearn.algorithms.metrics import DPOMetrics

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "LOSS_TYPES",
    "METRIC_NAMES",
    "NLL_METRIC",
    "REF_CHOSEN_KEY",
    "REF_REJECTED_KEY",
    "DPOMetrics",
    "DPOOutput",
    "PairLogps",
    "SequenceLogps",
    "accumulation_loss",
    "chunked_sequence_logps",
    "compute_dpo",
    "concatenate_pairs",
    "concatenated_logps",
    "dpo_loss",
    "nll_loss",
    "reference_outputs",
    "sequence_logps",
    "split_pairs",
]
