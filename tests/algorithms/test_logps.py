"""Chunked log-probs equal the direct computation (values and gradients), and do not hold the
whole batch's logits."""

from __future__ import annotations

import copy

import pytest
import torch

from chatlearn.algorithms import (
    SequenceLogps,
    chunked_sequence_logps,
    concatenated_logps,
    sequence_logps,
)
from chatlearn.hf import build_causal_lm

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}


def _batch(rows: int, length: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, length), generator=gen)
    lengths = torch.randint(length // 2, length + 1, (rows,), generator=gen)
    prompt = torch.randint(1, length // 2, (rows,), generator=gen)
    positions = torch.arange(length)
    attention = (positions < lengths[:, None]).long()
    loss = attention * (positions >= prompt[:, None]).long()
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss}


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 10_000])
def test_chunked_logps_and_gradients_equal_the_direct_computation(chunk_size: int) -> None:
    torch.manual_seed(0)
    rows, length, width, vocab = 5, 23, 16, 97
    head = torch.nn.Linear(width, vocab)
    hidden = torch.randn(rows, length, width, requires_grad=True)
    batch = _batch(rows, length, vocab)

    direct, direct_n = sequence_logps(head(hidden), batch["input_ids"], batch["loss_mask"])
    weights = torch.randn(rows)  # a non-uniform upstream gradient per row
    (direct * weights).sum().backward()
    expected = (hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone())
    hidden.grad = head.weight.grad = head.bias.grad = None

    chunked, chunked_n = chunked_sequence_logps(
        hidden, head, batch["input_ids"], batch["loss_mask"], chunk_size=chunk_size
    )
    (chunked * weights).sum().backward()
    torch.testing.assert_close(chunked, direct, rtol=1e-6, atol=1e-6)
    assert torch.equal(chunked_n, direct_n)
    for got, want in zip((hidden.grad, head.weight.grad, head.bias.grad), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_sequence_logps_module_on_a_causal_lm_matches_its_logits() -> None:
    model = build_causal_lm(TINY, seed=0)
    chunked = SequenceLogps.from_causal_lm(copy.deepcopy(model), chunk_size=8)
    pairs = _batch(4, 12, 50, seed=1)
    batch = {
        f"{side}_{key}": value for side in ("chosen", "rejected") for key, value in pairs.items()
    }

    want = concatenated_logps(model, batch)
    got = concatenated_logps(chunked, batch)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    (want.chosen - want.rejected).sum().backward()
    (got.chosen - got.rejected).sum().backward()
    grads = dict(chunked.named_parameters())
    for name, param in model.named_parameters():
        mine = name.replace("model.", "body.", 1) if name.startswith("model.") else "head.weight"
        torch.testing.assert_close(grads[mine].grad, param.grad, rtol=1e-5, atol=1e-5)


def test_chunk_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="logps_chunk_size must be >= 0"):
        SequenceLogps(torch.nn.Identity(), torch.nn.Identity(), chunk_size=-1)


def test_left_padded_rows_give_the_log_probs_of_right_padded_ones() -> None:
    # Positions count from each row's first token: GPT-2's learned positions were shifted by a
    # row's left padding, its log-probs off by 0.5-0.6 nats without a word.
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64, n_positions=16)
    network = SequenceLogps.from_causal_lm(transformers.GPT2LMHeadModel(config).eval())
    right = _batch(4, 12, 64, seed=1)
    padding = (right["attention_mask"] == 0).sum(-1).tolist()
    assert any(padding)
    left = {
        key: torch.stack([row.roll(pad) for row, pad in zip(rows, padding, strict=True)])
        for key, rows in right.items()
    }
    with torch.no_grad():
        want = network(right["input_ids"], right["attention_mask"], right["loss_mask"])
        got = network(left["input_ids"], left["attention_mask"], left["loss_mask"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _tiny_causal_lm(model_type: str) -> torch.nn.Module:
    """A 1-layer model of a family whose forward changes the head's output: soft-capping
    (a cap of 2 bends logits of ±1..3 a lot), a logit scale, a logit divisor."""
    import transformers

    sizes = {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 8,
        "vocab_size": 64,
    }
    config, model_class = {
        "gemma2": (
            lambda: transformers.Gemma2Config(**sizes, final_logit_softcapping=2.0),
            transformers.Gemma2ForCausalLM,
        ),
        "cohere": (
            lambda: transformers.CohereConfig(**sizes, logit_scale=0.25),
            transformers.CohereForCausalLM,
        ),
        "granite": (
            lambda: transformers.GraniteConfig(**sizes, logits_scaling=4.0),
            transformers.GraniteForCausalLM,
        ),
    }[model_type]
    torch.manual_seed(0)
    model = model_class(config())
    with torch.no_grad():  # logits of a few units: the post-processing matters
        model.get_output_embeddings().weight.mul_(20.0)
    return model


def _pairs(vocab: int) -> dict[str, torch.Tensor]:
    pairs = _batch(4, 12, vocab, seed=1)
    return {
        f"{side}_{key}": value for side in ("chosen", "rejected") for key, value in pairs.items()
    }


def _assert_same_logps_and_gradients(model: torch.nn.Module, network: torch.nn.Module) -> None:
    """`network` (a SequenceLogps built on a copy of `model`) gives the log-probs of `model`'s
    own logits, and the same gradients for every parameter."""
    batch = _pairs(64)
    want = concatenated_logps(model, batch)
    got = concatenated_logps(network, batch)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    (want.chosen - 2 * want.rejected).sum().backward()
    (got.chosen - 2 * got.rejected).sum().backward()
    grads = dict(network.named_parameters())
    for name, param in model.named_parameters():
        mine = name.replace("model.", "body.", 1) if name.startswith("model.") else "head.weight"
        torch.testing.assert_close(grads[mine].grad, param.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [3, 0])
@pytest.mark.parametrize("model_type", ["gemma2", "cohere", "granite"])
def test_logit_post_processing_of_known_families_is_applied(
    model_type: str, chunk_size: int
) -> None:
    """Gemma2's soft-capping, Cohere's logit_scale, Granite's logits_scaling happen in the
    model's forward after the head: the chunks apply them too (they were skipped: Gemma2's
    logps/chosen -81.6 against its true -25.2), without falling back to full logits."""
    model = _tiny_causal_lm(model_type)
    network = SequenceLogps.from_causal_lm(copy.deepcopy(model), chunk_size=chunk_size)
    _assert_same_logps_and_gradients(model, network)
    assert network.full_logits is None  # the setup check agrees


def _scaled_llama(plain: torch.nn.Module) -> torch.nn.Module:
    """`plain` (a Llama) with a forward that changes its logits in a way the chunks do not
    know: times 3."""
    from transformers import LlamaForCausalLM

    class ScaledLlama(LlamaForCausalLM):
        def forward(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            output = super().forward(*args, **kwargs)
            output.logits = output.logits * 3.0
            return output

    model = ScaledLlama(plain.config)
    model.load_state_dict(plain.state_dict())
    return model


def test_an_unknown_change_of_the_logits_falls_back_to_the_models_forward() -> None:
    """The setup check finds it; the log-probs then come from the model's own forward, in the
    padded and the packed layout, with the parameters' names and modes unchanged."""
    plain = build_causal_lm({**TINY, "num_hidden_layers": 1}, vocab_size=64, seed=0)
    model = _scaled_llama(plain).train()
    network = SequenceLogps.from_causal_lm(copy.deepcopy(model), chunk_size=4)
    _assert_same_logps_and_gradients(model, network)
    assert "model_type 'llama'" in str(network.full_logits)
    assert network.training and all(m.training for m in network.modules())
    assert {name.split(".")[0] for name, _ in network.named_parameters()} == {"body", "head"}
    batch = _pairs(64)
    with torch.no_grad():
        want = concatenated_logps(model, batch)
        got = concatenated_logps(network, batch, packing=True, prefix_sharing=True)
    torch.testing.assert_close(got.chosen, want.chosen, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.rejected, want.rejected, rtol=1e-5, atol=1e-5)
    assert SequenceLogps.from_causal_lm(plain).full_logits is None  # the unscaled Llama


def test_the_modules_warn_once_of_the_fallback_and_its_memory(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from chatlearn.config import Config
    from chatlearn.hf.modules import HFReference

    class Reference(HFReference):
        def build_model(self) -> torch.nn.Module:
            return _scaled_llama(super().build_model())

    model_args = {"model_config": {**TINY, "num_hidden_layers": 1}, "seed": 0}
    config = Config(
        {
            "models": {
                "reference": {"num_cpu": 1, "model_args": model_args},
                "policy": {"num_cpu": 1, "trainable": True, "model_args": model_args},
            },
            "runtime": {"num_episode": 1, "sample_per_episode": 16},
        }
    )
    module = Reference("reference", args=config)
    with caplog.at_level("WARNING"):
        module.setup()
    warned = [r.getMessage() for r in caplog.records if "own forward" in r.getMessage()]
    assert len(warned) == 1 and "model_type 'llama'" in warned[0], warned
    assert "bytes per token" in warned[0]
    assert module.reference_store_key()["logits"] == "model forward"


def test_a_trainer_whose_fallback_would_leave_parameters_untrained_is_refused() -> None:
    # The network's parameters are its body's and head's; a parameter the model's own forward
    # uses besides them would not be trained, kept in step by DDP, sharded or saved.
    from chatlearn.config import Config, ConfigError
    from chatlearn.hf.modules import HFDPOTrainer

    class Trainer(HFDPOTrainer):
        def build_model(self) -> torch.nn.Module:
            model = _scaled_llama(super().build_model())
            model.register_parameter("logit_gain", torch.nn.Parameter(torch.ones(())))
            return model

    model_args = {"model_config": {**TINY, "num_hidden_layers": 1}, "seed": 0}
    config = Config(
        {
            "models": {"policy": {"num_cpu": 1, "trainable": True, "model_args": model_args}},
            "runtime": {"num_episode": 1, "sample_per_episode": 16},
        }
    )
    with pytest.raises(ConfigError, match="logit_gain.*untrained"):
        Trainer("policy", args=config).setup()


@pytest.mark.parametrize("packed", [False, True])
def test_a_forward_with_no_token_to_score_still_backpropagates(packed: bool) -> None:
    # pairs whose responses have no token (a chat template rendering nothing for empty
    # content), alone in a micro-batch or in a token budget's forward: the chunked head
    # returned detached zeros and the train step's backward failed with "element 0 of tensors
    # does not require grad"; now every parameter gets a (zero) gradient, as DDP needs
    model = build_causal_lm(TINY, seed=0)
    chunked = SequenceLogps.from_causal_lm(model, chunk_size=8)
    pairs = _batch(3, 12, 50, seed=2)
    pairs["loss_mask"] = torch.zeros_like(pairs["loss_mask"])
    batch = {
        f"{side}_{key}": value for side in ("chosen", "rejected") for key, value in pairs.items()
    }
    options = {"packing": packed, "prefix_sharing": packed}
    got = concatenated_logps(chunked, batch, **options)
    assert torch.equal(got.chosen, torch.zeros(3)) and got.chosen.requires_grad
    (got.chosen - got.rejected).sum().backward()
    for name, param in chunked.named_parameters():
        assert param.grad is not None and not param.grad.any(), name
