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
        metrics = _numeric_metrics(result, "train_step")
        again = _numeric_metrics(result, "train_step")
    assert metrics == again
    assert {k: v for k, v in metrics.items() if k != "bad"} == {"loss": 0.5, "acc": 0.25, "n": 3.0}
    assert math.isnan(metrics["bad"])
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2  # once per key, not once per step
    assert "'vec' is a Tensor of shape (2,), not a number: left out of the metrics" in warnings[0]
    assert "'note' is a str, not a number" in warnings[1]


def test_a_result_that_is_not_a_dict_is_said_once_and_none_only_from_eval_step(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A train_step returning a list, or a trainer without eval_step under an eval set, recorded
    nothing (empty eval records) without a word."""
    monkeypatch.setattr(worker_services, "_LEFT_OUT", set())
    with caplog.at_level(logging.WARNING, logger="chatlearn.engine"):
        for _ in range(3):
            assert _numeric_metrics(None, "train_step") == {}  # no metrics: nothing to say
            assert _numeric_metrics([0.5, 0.25], "train_step") == {}
            assert _numeric_metrics(None, "eval_step") == {}
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [
        "train_step returned a list, not a dict: nothing of it is recorded (return a dict of "
        "numbers, e.g. {'loss': ...})",
        "eval_step returned None, not a dict: the evaluation records nothing (return a dict of "
        "numbers, e.g. {'loss': ...})",
    ]


@pytest.mark.parametrize(
    ("returned", "named"), [(None, "None"), (iter([1, 2]), "list_iterator"), (2, "int")]
)
def test_a_build_dataset_that_returns_no_dataset_is_named(returned: object, named: str) -> None:
    """A generator or a count from build_dataset failed later in len() ("object of type
    'generator' has no len()"), naming neither build_dataset nor what it returned."""

    class Module:
        def build_dataset(self, samples: list[int], is_eval: bool = False) -> object:
            return returned

    service = type("Service", (), {"module": Module(), "datasets": {}})()
    with pytest.raises(TypeError) as info:
        worker_services.ReferenceService._build_datasets(service, [[1, 2]], "train")
    assert str(info.value).startswith(f"Module.build_dataset returned {named}; it must return")
