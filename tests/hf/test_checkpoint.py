"""Sharded checkpoints (``chatlearn.hf.checkpoint``): what a failed save or load raises."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def _model_and_optimizer(*names: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({name: torch.nn.Linear(4, 4) for name in names})
    optimizer = torch.optim.AdamW(model.parameters())
    for layer in model.values():
        layer(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_a_sharded_checkpoint_that_does_not_fit_fails_as_an_exception(tmp_path: Path) -> None:
    # torch's CheckpointException is a BaseException: the actor took it for a fatal error of its
    # own (a LoRA trainer resumed with other target_modules under parallel: fsdp was restarted
    # max_restarts times, then stopped with an 800-line log instead of one line naming the key)
    from chatlearn.hf.checkpoint import load_sharded, save_sharded

    save_sharded(tmp_path / "sharded", *_model_and_optimizer("a"))
    loaded, optimizer = _model_and_optimizer("a")
    load_sharded(tmp_path / "sharded", loaded, optimizer)  # the same layout loads

    with pytest.raises(Exception, match=r"Missing key in checkpoint state_dict: .*b\.weight"):
        load_sharded(tmp_path / "sharded", *_model_and_optimizer("a", "b"))

    (tmp_path / "a_file").write_text("")
    with pytest.raises(OSError):  # a storage failure as the OS said it (a full disk, ...)
        save_sharded(tmp_path / "a_file" / "sharded", *_model_and_optimizer("a"))
