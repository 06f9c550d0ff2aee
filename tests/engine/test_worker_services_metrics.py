"""What a module's train_step/eval_step returns becomes metrics: numbers and one-element tensors
are kept; anything else is left out with a warning, once per key (worker_services.py)."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from chatlearn.engine import worker_services
from chatlearn.engine.worker_services import _numeric_metrics


def test_numbers_are_kept_and_the_rest_is_said_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker_services, "_LEFT_OUT", set())
    result = {
        "loss": torch.tensor(0.5),
        "acc": np.float32(0.25),
        "n": 3,
        "bad": float("nan"),  # kept: a diverging loss must show
        "vec": torch.tensor([1.0, 2.0]),
        "note": "text",
    }
    with caplog.at_level(logging.WARNING, logger="chatlearn.engine"):
        metrics = _numeric_metrics(result)
        again = _numeric_metrics(result)
    assert metrics == again
    assert {k: v for k, v in metrics.items() if k != "bad"} == {"loss": 0.5, "acc": 0.25, "n": 3.0}
    assert math.isnan(metrics["bad"])
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2  # once per key, not once per step
    assert "'vec' is a Tensor of shape (2,), not a number: left out of the metrics" in warnings[0]
    assert "'note' is a str, not a number" in warnings[1]
