"""The merged weights of a LoRA checkpoint equal peft's own merge, for every layer kind peft
adapts in causal LMs: Linear, GPT-2's Conv1D (weights stored in × out) and embeddings."""

from __future__ import annotations

import copy

import pytest
import torch

from chatlearn.hf import build_causal_lm
from chatlearn.hf.lora import apply_lora, merged_state_dict, unmergeable


def _gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_positions=32, n_embd=16, n_layer=1, n_head=2, vocab_size=64)
    return GPT2LMHeadModel(config)


def _llama() -> torch.nn.Module:
    shape = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
    heads = {"num_attention_heads": 2, "num_key_value_heads": 1}
    return build_causal_lm({**shape, **heads}, vocab_size=64)


@pytest.mark.parametrize(
    ("build", "targets"),
    [
        # c_attn is 16 -> 48: the unmerged change had the wrong shape (a crash at every save);
        # c_proj is square: the change was silently transposed (log-probs off by 0.2)
        (_gpt2, ["c_attn", "attn.c_proj"]),
        # an embedding's adapter is lora_embedding_A/B: a KeyError at every save
        (_llama, ["embed_tokens", "q_proj", "down_proj"]),
    ],
)
def test_merged_weights_equal_peft_merge_and_unload(build, targets) -> None:
    torch.manual_seed(0)
    model = apply_lora(build(), {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": targets})
    with torch.no_grad():  # B starts at zero (no change): give every adapter one
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.normal_(0, 0.5)
    assert unmergeable(model) == []
    merged = merged_state_dict(model, model.state_dict())
    expected = copy.deepcopy(model).merge_and_unload().state_dict()
    assert merged.keys() == expected.keys()
    base = {  # the base weights, under their Hugging Face names
        key.removeprefix("base_model.model.").replace(".base_layer.", "."): value
        for key, value in model.state_dict().items()
        if ".lora_" not in key
    }
    changed = 0
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, rtol=0, atol=1e-5, msg=key)
        changed += not torch.equal(value, base[key])
    assert changed >= len(targets)  # the adapters were folded in, not dropped
