"""The ready-made modules train without the checkpoint's dropout (``disable_dropout``, on by
default, as TRL's DPO): the policy in train mode computes what the reference (eval mode) does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.mark.parametrize("disable", [True, False])
def test_a_checkpoints_dropout_is_off_unless_asked_for(tmp_path: Path, disable: bool) -> None:
    # GPT-2's config has dropout 0.1: the first step's loss was 0.6965 for equal weights, not ln 2
    from transformers import GPT2Config, GPT2LMHeadModel

    from chatlearn.config import Config
    from chatlearn.hf import byte_tokenizer
    from chatlearn.hf.modules import HFReference

    gpt2 = GPT2Config(n_positions=64, n_embd=16, n_layer=1, n_head=2, vocab_size=260)
    GPT2LMHeadModel(gpt2).save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    model_args = {"model_path": str(tmp_path), "max_length": 32, "disable_dropout": disable}
    config = Config(
        {
            "models": {
                "reference": {"num_cpu": 1, "model_args": model_args},
                "policy": {"num_cpu": 1, "trainable": True, "model_args": dict(model_args)},
            },
            "runtime": {"num_episode": 1, "sample_per_episode": 16},
        }
    )
    module = HFReference("reference", args=config)
    module.setup()
    model = module.model
    ids = torch.randint(0, 256, (2, 16))
    model.eval()
    with torch.no_grad():
        expected = model(ids).logits
        model.train()
        torch.manual_seed(0)
        trained = model(ids).logits
    if disable:
        assert torch.equal(trained, expected)
        assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    else:
        assert not torch.equal(trained, expected)  # the checkpoint's dropout, as asked
