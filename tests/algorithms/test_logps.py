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
