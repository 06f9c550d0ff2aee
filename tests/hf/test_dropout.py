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


def test_dropout_kept_as_numbers_is_off_too() -> None:
    # OPT calls F.dropout(p=self.dropout) with rates kept as floats (and its layerdrop skips
    # whole layers at random): disable_dropout found none of them, two train-mode forwards
    # differed by up to 0.56 and the first DPO loss was 0.6958, not ln 2
    from transformers import OPTConfig, OPTForCausalLM

    from chatlearn.hf.model import disable_dropout

    rates = {"dropout": 0.1, "attention_dropout": 0.1, "activation_dropout": 0.1}
    opt = OPTConfig(vocab_size=64, hidden_size=16, ffn_dim=32, num_hidden_layers=2,
                    num_attention_heads=2, word_embed_proj_dim=16, max_position_embeddings=32,
                    layerdrop=0.5, **rates)  # fmt: skip
    torch.manual_seed(0)
    model = OPTForCausalLM(opt).train()
    assert disable_dropout(model) > 0
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        first, second = model(ids).logits, model(ids).logits
    assert torch.equal(first, second)
    # the config too, so that nothing built from it later has them
    assert all(getattr(model.config, key) == 0 for key in (*rates, "layerdrop"))


def test_dropout_no_name_gives_away_is_found_and_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from chatlearn.config import Config
    from chatlearn.hf import build_causal_lm
    from chatlearn.hf.model import forwards_differ
    from chatlearn.hf.modules import HFDPOTrainer

    tiny = {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 32,
    }

    def hard_coded_dropout(module: torch.nn.Module, args: object, out: torch.Tensor) -> object:
        return torch.nn.functional.dropout(out, p=0.1, training=module.training)

    plain = build_causal_lm(tiny).eval()
    assert not forwards_differ(plain)
    rng = torch.get_rng_state()
    plain.model.norm.register_forward_hook(hard_coded_dropout)
    assert forwards_differ(plain)
    assert torch.equal(torch.get_rng_state(), rng)  # a run draws what it drew without the check
    assert not plain.training  # its mode restored

    class Trainer(HFDPOTrainer):
        def build_model(self) -> object:
            model = super().build_model()
            model.model.norm.register_forward_hook(hard_coded_dropout)
            return model

    model_args = {"model_config": tiny, "max_length": 32}
    config = Config(
        {
            "models": {
                "reference": {"num_cpu": 1, "model_args": model_args},
                "policy": {"num_cpu": 1, "trainable": True, "model_args": dict(model_args)},
            },
            "runtime": {"num_episode": 1, "sample_per_episode": 16},
        }
    )
    with caplog.at_level("WARNING"):
        Trainer("policy", args=config).setup()
    warned = [r.getMessage() for r in caplog.records if "disable_dropout" in r.getMessage()]
    assert len(warned) == 1 and "llama" in warned[0] and "ln 2" in warned[0], warned
