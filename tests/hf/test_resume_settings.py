"""The ready-made trainer resumed with changed optimizer settings: the configured learning rate,
weight decay and betas apply from the resumed step on (the checkpoint's param groups and the
scheduler's base rates held the old ones), said in one warning; unchanged settings give back
the checkpoint's values exactly. And fp16's loss scaler resumes where it was."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from layout_worker import make_args, reference_batches, start, step_data  # noqa: E402

from chatlearn.hf.modules import HFDPOTrainer  # noqa: E402

SAVED_AT = 3


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list, float]:
    """A checkpoint after 3 steps at learning rate 3e-3; the micro-batches; its step-4 rate."""
    directory = tmp_path_factory.mktemp("resume") / "policy" / "rank_0"
    args = make_args(1, parallel="none")
    batches = reference_batches(args, 0, 1, steps=6)
    trainer = start(HFDPOTrainer("policy", args=args), 0, 1)
    for step in range(SAVED_AT):
        trainer.train_step(step_data(batches, step, 0, 1), iteration=step)
    trainer._checkpoint_dir = directory
    trainer.save_checkpoint(SAVED_AT)
    return directory, batches, trainer.optimizer.param_groups[0]["lr"]


def _resumed(directory: Path, caplog: pytest.LogCaptureFixture, **changes) -> HFDPOTrainer:
    args = make_args(1, parallel="none", save_hf_model=False, **changes)
    trainer = start(HFDPOTrainer("policy", args=args), 0, 1)
    trainer._checkpoint_dir = directory
    with caplog.at_level(logging.WARNING):
        trainer.load_checkpoint(SAVED_AT)
    return trainer


def test_a_changed_learning_rate_applies_from_the_resumed_step(saved, caplog) -> None:
    directory, batches, _ = saved
    trainer = _resumed(directory, caplog, learning_rate=1e-4, weight_decay=0.05)
    (group,) = trainer.optimizer.param_groups
    factor = trainer._lr_factor(SAVED_AT)  # the schedule's position is the checkpoint's
    assert trainer.scheduler.last_epoch == SAVED_AT
    assert group["lr"] == pytest.approx(1e-4 * factor) and group["initial_lr"] == 1e-4
    assert group["weight_decay"] == 0.05 and trainer.scheduler.base_lrs == [1e-4]
    metrics = trainer.train_step(step_data(batches, SAVED_AT, 0, 1), iteration=SAVED_AT)
    assert metrics["learning_rate"] == pytest.approx(1e-4 * factor)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(
        1e-4 * trainer._lr_factor(SAVED_AT + 1)
    )
    (warning,) = [r.getMessage() for r in caplog.records if "optimizer settings" in r.message]
    assert "learning_rate 0.003 -> 0.0001" in warning and "weight_decay 0.0 -> 0.05" in warning
    assert "rate of step 4" in warning


def test_unchanged_settings_resume_with_the_checkpoints_values(saved, caplog) -> None:
    directory, _, rate = saved
    trainer = _resumed(directory, caplog)
    assert trainer.optimizer.param_groups[0]["lr"] == rate  # bit for bit
    assert not [r for r in caplog.records if "optimizer settings" in r.message]
    assert math.isfinite(rate) and rate > 0


class _TwoGroupTrainer(HFDPOTrainer):
    """A subclass with its own param groups (no decay on biases and norms), as users write."""

    def setup(self) -> None:
        import torch

        super().setup()
        params = [p for p in self.network.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        rest = [p for p in params if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
            lr=3e-3,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)


def test_a_subclass_s_own_param_groups_resume_as_they_were(tmp_path: Path, caplog) -> None:
    args = make_args(1, parallel="none", save_hf_model=False)
    batches = reference_batches(args, 0, 1, steps=3)
    trainer = start(_TwoGroupTrainer("policy", args=args), 0, 1)
    for step in range(2):
        trainer.train_step(step_data(batches, step, 0, 1), iteration=step)
    trainer._checkpoint_dir = tmp_path
    trainer.save_checkpoint(2)
    saved = [dict(g, params=None) for g in trainer.optimizer.param_groups]
    resumed = start(_TwoGroupTrainer("policy", args=args), 0, 1)
    resumed._checkpoint_dir = tmp_path
    with caplog.at_level(logging.WARNING):
        resumed.load_checkpoint(2)
    assert [dict(g, params=None) for g in resumed.optimizer.param_groups] == saved
    assert not [r for r in caplog.records if "optimizer settings" in r.message]


def test_an_fp16_loss_scalers_state_resumes_as_it_was(tmp_path: Path) -> None:
    # fp16 runs on CUDA only; its scaler's state is the same on CPU
    import torch

    args = make_args(1, parallel="none", save_hf_model=False)
    trainer = start(HFDPOTrainer("policy", args=args), 0, 1)
    trainer.grad_scaler = torch.amp.GradScaler("cpu")
    trainer.grad_scaler.scale(torch.ones(1))  # its state exists from its first use
    trainer.grad_scaler._scale.fill_(256.0)  # backed off 8 times
    trainer.grad_scaler._growth_tracker.fill_(7)  # 7 steps without an inf since
    trainer._checkpoint_dir = tmp_path
    trainer.save_checkpoint(SAVED_AT)
    resumed = start(HFDPOTrainer("policy", args=args), 0, 1)
    resumed.grad_scaler = torch.amp.GradScaler("cpu")
    resumed._checkpoint_dir = tmp_path
    resumed.load_checkpoint(SAVED_AT)
    assert resumed.grad_scaler.state_dict() == trainer.grad_scaler.state_dict()
    assert resumed.grad_scaler.get_scale() == 256.0


def test_lora_adapters_resumed_on_another_base_are_one_config_error(tmp_path: Path) -> None:
    # the base is not in a LoRA checkpoint (setup builds it again): another one, here the
    # random initialisation of another seed, would have trained the adapters on weights they
    # never saw, without a word
    from chatlearn.config import ConfigError

    lora = {"r": 2, "target_modules": ["q_proj", "v_proj"]}
    trainer = start(HFDPOTrainer("policy", args=make_args(1, parallel="none", lora=lora)), 0, 1)
    trainer._checkpoint_dir = tmp_path
    trainer.save_checkpoint(SAVED_AT)
    other = make_args(1, parallel="none", lora=lora, seed=1)
    resumed = start(HFDPOTrainer("policy", args=other), 0, 1)
    resumed._checkpoint_dir = tmp_path
    with pytest.raises(ConfigError, match="trained on other base weights") as raised:
        resumed.load_checkpoint(SAVED_AT)
    assert raised.value.key.endswith("model_args.seed"), raised.value
