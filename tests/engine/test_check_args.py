"""A module's `check_args()` runs in the coordinator before any process starts: a setting the
module cannot run is one config line at once, with no process started and no run lock taken."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import chatlearn
from chatlearn import DPOEngine
from chatlearn.config import ConfigError, reset_args
from chatlearn.engine import engine as engine_module
from chatlearn.engine.run_lock import LOCK_NAME
from chatlearn.hf.model import validate_model_args
from chatlearn.hf.modules import HFDPOTrainer, HFReference

sys.path.insert(0, str(Path(__file__).parent))
from echo_modules import EchoReference, EchoTrainer  # noqa: E402
from test_dpo_engine import _config, _runtime  # noqa: E402

pytestmark = pytest.mark.timeout(60)


class PickyTrainer(EchoTrainer):
    """Refuses a `width` its model cannot have, as a module's own check."""

    def check_args(self) -> None:
        if self.model_args.get("width", 1) % 2:
            raise self.global_args.error(
                f"models.{self.name}.model_args.width", "must be even", "set an even width"
            )


@pytest.fixture
def no_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Starting any process fails the test."""

    def launch(*args: object, **kwargs: object) -> None:
        raise AssertionError("processes were started")

    monkeypatch.setattr(engine_module.ActorSystem, "launch", launch)


def _trainer(model_args: dict) -> dict:
    return {"num_cpu": 1, "trainable": True, "model_args": model_args}


def _start(tmp_path: Path, reference: object, trainer: object) -> None:
    engine = DPOEngine(reference, trainer)
    engine.set_dataset(list(range(8)))
    try:
        engine.learn()
    finally:
        engine.stop()


def test_a_modules_own_check_refuses_before_any_process_starts(
    tmp_path: Path, no_launch: None
) -> None:
    chatlearn.init(_config(tmp_path, _runtime(1, 8, 4, 2, 4), trainer=_trainer({"width": 3})))
    try:
        with pytest.raises(ConfigError) as info:
            _start(tmp_path, EchoReference("reference"), PickyTrainer("policy_trainer"))
    finally:
        reset_args()
    assert "models.policy_trainer.model_args.width: must be even" in str(info.value)
    assert not (tmp_path / LOCK_NAME).exists()  # the output directory was not taken


def test_hf_settings_are_refused_before_any_process_starts(tmp_path: Path, no_launch: None):
    chatlearn.init(
        _config(
            tmp_path,
            _runtime(1, 8, 4, 2, 4),
            trainer=_trainer({"dtype": "float17", "model_config": {"hidden_size": 32}}),
        )
    )
    try:
        with pytest.raises(ConfigError) as info:
            _start(tmp_path, HFReference("reference"), HFDPOTrainer("policy_trainer"))
    finally:
        reset_args()
    assert "model_args.dtype: unknown dtype 'float17'" in str(info.value)


def test_a_model_path_is_checked_where_its_files_are(tmp_path: Path) -> None:
    """The coordinator's check leaves model_path alone (the model's hosts may be other
    machines); setup's check, on the model's host, names it."""
    args = {"model_path": str(tmp_path / "missing")}
    validate_model_args(args, files=False)
    with pytest.raises(ConfigError, match="is not a directory"):
        validate_model_args(args)
