"""The example's modules: chatlearn's ready-made Hugging Face DPO modules, subclassed.

Subclassing is how a user adapts them (a different model class, extra metrics, another data
format); here they are used as they are. Everything the modules read comes from `model.yaml`.
"""

from __future__ import annotations

from chatlearn.hf.modules import HFDPOTrainer, HFReference


class PolicyReference(HFReference):
    """The frozen reference model (runs `forward_step`)."""


class PolicyTrainer(HFDPOTrainer):
    """The policy being trained (runs `train_step` and `eval_step`)."""
