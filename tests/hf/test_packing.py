"""When the HF modules pack (exact models only), what they report, and that a packed train step
is the padded one."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from chatlearn.config import Config, ConfigError
from chatlearn.hf import build_causal_lm
from chatlearn.hf.modules import HFDPOTrainer, HFReference
from chatlearn.hf.packing import PackingOptions, packing_options, packing_support
from examples.dpo.make_data import make_pairs

TINY = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


def _qwen2(**config: Any) -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(vocab_size=50, **TINY, **config))


def test_packing_is_exact_for_masked_attention_of_verified_models_only() -> None:
    llama = build_causal_lm(TINY, seed=0)
    assert packing_support(llama).exact
    assert packing_support(_qwen2()).exact
    llama.config._attn_implementation = "flash_attention_2"
    assert "does not take a 4-D mask" in packing_support(llama).reason
    window = _qwen2(use_sliding_window=True, sliding_window=16, max_window_layers=0)
    assert packing_support(window).reason == "the model has sliding-window attention layers"
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50))
    assert "'gpt2' is not verified" in packing_support(gpt2).reason


def test_packing_options_default_on_where_exact_and_explain_when_not() -> None:
    logged: list[str] = []
    llama = build_causal_lm(TINY, seed=0)
    masked = {"packed_attention": "mask"}
    assert packing_options(masked, llama, log=logged.append) == PackingOptions(True, True, None)
    assert llama.config._attn_implementation == "sdpa"
    assert packing_options(
        {**masked, "prefix_sharing": False, "max_tokens_per_row": 512}, llama, log=logged.append
    ) == PackingOptions(True, False, 512)
    # by default an sdpa model attends by segments (no mask) when packed
    options = packing_options({}, llama, log=logged.append)
    assert options == PackingOptions(True, True, None, True)
    assert options.describe() == "packing + prefix_sharing + segment attention"
    assert PackingOptions(True, False, 512).describe() == (
        "packing + max_tokens_per_row=512 + masked attention"
    )
    assert PackingOptions().describe() == "padded rows"
    assert llama.config._attn_implementation == "chatlearn_segments"
    assert logged == []
    off = {"packing": False, "prefix_sharing": False, "packed_attention": "segments"}
    assert packing_options(off, _qwen2(), log=logged.append) == PackingOptions()
    llama.config._attn_implementation = "flash_attention_2"
    assert packing_options({}, llama, log=logged.append) == PackingOptions(False, False, None)
    assert logged == [
        "packing and prefix sharing off (padded rows): attn_implementation "
        "'flash_attention_2' does not take a 4-D mask"
    ]
    with pytest.raises(ValueError, match="packing: true is not exact for this model"):
        packing_options({"packing": True}, llama, log=logged.append)
    # the keys' specs check types and ranges, naming the key (as at start-up)
    with pytest.raises(ConfigError, match="packing: expected true or false"):
        packing_options({"packing": "yes"}, llama, log=logged.append)
    with pytest.raises(ConfigError, match="max_tokens_per_row: must be ≥ 1"):
        packing_options({"max_tokens_per_row": 0}, llama, log=logged.append)
    with pytest.raises(ConfigError, match="max_tokens_per_row: expected a whole number"):
        packing_options({"max_tokens_per_row": True}, llama, log=logged.append)
    eager = _qwen2()
    eager.config._attn_implementation = "eager"
    with pytest.raises(ValueError, match="packed_attention: segments needs an sdpa model"):
        packing_options({"packed_attention": "segments"}, eager, log=logged.append)
    with pytest.raises(ConfigError, match="packed_attention: must be one of segments, mask"):
        packing_options({"packed_attention": "flex"}, eager, log=logged.append)


def _args(**model_args: Any) -> Config:
    args = {"model_config": TINY, "seed": 0, "max_length": 48, "learning_rate": 3e-3}
    model = {"num_cpu": 1, "model_args": {**args, **model_args}}
    return Config(
        {
            "models": {"reference": model, "policy": dict(model, trainable=True)},
            "runtime": {
                "num_episode": 1,
                "sample_per_episode": 16,
                "train_micro_batch_size": 4,
                "train_global_batch_size": 8,
            },
        }
    )


def _start(module: Any) -> Any:
    module._rank, module._world_size = 0, 1  # as the runtime sets them
    module.setup()
    return module


def _two_steps(**model_args: Any) -> tuple[list[dict[str, float]], list[torch.Tensor]]:
    args = _args(**model_args)
    reference = _start(HFReference("reference", args=args))
    trainer = _start(HFDPOTrainer("policy", args=args))
    train, _ = make_pairs(num_train=16, num_eval=4, max_value=99)
    dataset = reference.build_dataset(train)
    batches = [
        reference.forward_step(dataset.collate_fn([dataset[j] for j in range(i, i + 4)]))
        for i in range(0, 16, 4)
    ]
    results = [trainer.train_step(batches[i : i + 2]) for i in (0, 2)]
    return results, [batch["ref_chosen_logps"] for batch in batches]


@pytest.mark.parametrize("attention", ["segments", "mask"])
def test_packed_train_steps_equal_padded_ones_and_count_tokens(attention: str) -> None:
    packed, packed_ref = _two_steps(packed_attention=attention)
    padded, padded_ref = _two_steps(packing=False, prefix_sharing=False)
    for got, want in zip(packed_ref, padded_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for got, want in zip(packed, padded, strict=True):
        for key in ("loss", "rewards/margins", "grad_norm", "logps/chosen"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), key
        assert got["tokens/real"] == want["tokens/real"] > 0
        # a packed step computes only the real tokens; padded rows compute more
        assert got["tokens/computed"] == got["tokens/real"] < want["tokens/computed"]


def test_a_pad_id_beyond_the_models_embeddings_pads_with_one_it_has(tmp_path) -> None:
    # a [PAD] added to the tokenizer without resize_token_embeddings: the padded forward failed
    # with an IndexError; padding is masked, so eos pads instead and no log-prob changes
    from chatlearn.hf import byte_tokenizer

    tokenizer = byte_tokenizer()
    vocab = len(tokenizer)
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    assert tokenizer.pad_token_id == vocab
    model = build_causal_lm(TINY, vocab_size=vocab)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    train = [  # of several lengths: rows are padded
        {"prompt": f"max({i},{10**i})=", "chosen": str(10**i), "rejected": f"{i}?"}
        for i in range(8)
    ]

    def reference_logps(**model_args: Any) -> torch.Tensor:
        args = _args(model_path=str(tmp_path), **model_args)
        reference = _start(HFReference("reference", args=args))
        dataset = reference.build_dataset(train)
        batch = dataset.collate_fn([dataset[j] for j in range(8)])
        return reference.forward_step(batch)["ref_chosen_logps"]

    padded = reference_logps(packing=False, prefix_sharing=False)
    torch.testing.assert_close(padded, reference_logps(), rtol=1e-5, atol=1e-5)
