"""`export_dtype`: the trainer's Hugging Face export in the dtype inference uses (bf16, say),
where the weights train in another (mixed precision's fp32 masters): written at the run's end and
on request, its config naming that dtype, while the checkpoints keep the exact weights for the
resume (`model.pt`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from layout_worker import make_args, reference_batches, start, step_data  # noqa: E402

from chatlearn.config import ConfigError  # noqa: E402
from chatlearn.hf.modules import HFDPOTrainer  # noqa: E402


def _save(trainer: HFDPOTrainer, directory: Path, reason: str) -> int:
    """A save as the engine makes it; what the trainer says its last save would add."""
    trainer._checkpoint_dir, trainer.checkpoint_reason = directory, reason
    try:
        trainer.save_checkpoint(2)
        return trainer.final_checkpoint_extra_bytes()
    finally:
        trainer._checkpoint_dir = trainer.checkpoint_reason = None


def _header(path: Path) -> dict:
    with path.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header


def test_the_export_is_written_in_export_dtype_and_the_resume_has_the_masters(
    tmp_path: Path,
) -> None:
    from transformers import AutoModelForCausalLM

    args = make_args(1, parallel="none", export_dtype="bfloat16")
    batches = reference_batches(args, 0, 1, steps=3)
    trainer = start(HFDPOTrainer("policy", args=args), 0, 1)
    for step in range(2):
        trainer.train_step(step_data(batches, step, 0, 1), iteration=step)
    # a periodic save: the exact weights (model.pt), no export (it is not the resume's state)
    periodic = tmp_path / "periodic" / "policy" / "rank_0"
    extra = _save(trainer, periodic, "interval")
    assert sorted(p.name for p in periodic.iterdir()) == [
        "model.pt", "optimizer.pt", "rng.pt", "scheduler.pt"
    ]  # fmt: skip
    # the run's end: the export in bf16, its config saying so, beside the exact weights
    end = tmp_path / "end" / "policy" / "rank_0"
    assert _save(trainer, end, "end") == 0
    exported = end / "hf_model"
    assert (end / "model.pt").is_file()
    header = _header(exported / "model.safetensors")
    assert {entry["dtype"] for entry in header.values()} == {"BF16"}
    data = sum(entry["data_offsets"][1] - entry["data_offsets"][0] for entry in header.values())
    assert extra == data  # what the disk-room check counted at the periodic save
    assert json.loads((exported / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = AutoModelForCausalLM.from_pretrained(exported, dtype="auto")
    ours = dict(trainer.model.named_parameters())
    for name, param in loaded.named_parameters():
        assert param.dtype == torch.bfloat16
        assert torch.equal(param, ours[name].detach().to(torch.bfloat16)), name
    # both checkpoints resume with the fp32 weights as they were
    for directory in (periodic, end):
        resumed = start(HFDPOTrainer("policy", args=args), 0, 1)
        resumed._checkpoint_dir = directory
        resumed.load_checkpoint(2)
        for name, param in resumed.model.named_parameters():
            assert param.dtype == torch.float32 and torch.equal(param, ours[name]), name


def test_an_unknown_export_dtype_is_one_config_line() -> None:
    args = make_args(1, parallel="none", export_dtype="fp8")
    with pytest.raises(ConfigError, match=r"export_dtype: unknown dtype 'fp8'"):
        start(HFDPOTrainer("policy", args=args), 0, 1)
