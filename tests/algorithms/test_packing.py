"""Packed and prefix-shared forwards: the layout (positions, masks, segments, scoring) and,
through real Llama- and Qwen2-style models (masked and segment attention), log-probs and
gradients equal to the padded, separate forwards."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from chatlearn.algorithms import SequenceLogps, concatenated_logps
from chatlearn.algorithms.packing import (
    pack_pairs,
    pack_sequences,
    real_tokens,
    segment_attention,
)
from chatlearn.hf import build_causal_lm
from chatlearn.hf.data import PreferenceCollator
from chatlearn.hf.packing import use_segment_attention

VOCAB = 120
TINY = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}


def _pairs(num_pairs: int, seed: int) -> dict[str, torch.Tensor]:
    """Pairs of mixed lengths (prompts 1-24, responses 1-40 tokens), collated with padding."""
    gen = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(num_pairs):
        prompt = torch.randint(3, VOCAB, (int(torch.randint(1, 25, (1,), generator=gen)),))
        item = {}
        for side in ("chosen", "rejected"):
            length = int(torch.randint(1, 41, (1,), generator=gen))
            response = torch.randint(3, VOCAB, (length,), generator=gen)
            loss = torch.zeros(len(prompt) + length, dtype=torch.long)
            loss[len(prompt) :] = 1
            item[f"{side}_input_ids"] = torch.cat([prompt, response])
            item[f"{side}_loss_mask"] = loss
        items.append(item)
    return PreferenceCollator(0)(items)


def _llama() -> Any:
    return build_causal_lm(TINY, vocab_size=VOCAB, seed=0, dtype="float32").eval()


def _qwen2() -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, **TINY))
    return model.float().eval()


def _build(kind: str, attn: str) -> Any:
    model = _llama() if kind == "llama" else _qwen2()
    model.config._attn_implementation = "sdpa" if attn == "segments" else attn
    if attn == "segments":  # SDPA for the padded forward, segments for the packed ones
        assert use_segment_attention(model)
    assert model.config.model_type == kind
    return model


LAYOUTS = [
    {"packing": True, "prefix_sharing": False},
    {"packing": True, "prefix_sharing": True},
    {"packing": False, "prefix_sharing": True},
    {"packing": True, "prefix_sharing": True, "max_tokens_per_row": 120},
]


def _logps_and_grads(network: Any, batch: dict, **options: Any) -> tuple[torch.Tensor, list]:
    network.zero_grad(set_to_none=True)
    logps = concatenated_logps(network, batch, **options)
    out = torch.cat([logps.chosen, logps.rejected])
    weights = torch.linspace(-1.0, 2.0, out.shape[0])  # a different upstream gradient per row
    (out * weights).sum().backward()
    grads = [p.grad.clone() for p in network.parameters() if p.grad is not None]
    counts = torch.cat([logps.chosen_num_tokens, logps.rejected_num_tokens])
    return torch.cat([out.detach(), counts]), grads


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager", "segments"])
def test_packed_logps_and_gradients_equal_the_padded_forward(kind: str, attn: str) -> None:
    model = _build(kind, attn)
    batch = _pairs(6, seed=3)
    networks = {
        "hf": model,  # logits path (a plain TorchModule user's model)
        "chunked": SequenceLogps.from_causal_lm(copy.deepcopy(model), chunk_size=16),
    }
    for name, network in networks.items():
        want, want_grads = _logps_and_grads(network, batch)
        for options in LAYOUTS:
            got, got_grads = _logps_and_grads(network, batch, **options)
            # sums over ~60 tokens of about -5 each: 1e-5 relative (per token well below 1e-6)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"{name} {options}")
            assert len(got_grads) == len(want_grads) > 0
            for g, w in zip(got_grads, want_grads, strict=True):
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=f"{name} {options}")


def test_the_mask_confines_attention_to_each_sequence_and_its_prompt() -> None:
    # pair 0: prompt [5, 6], chosen [7, 8], rejected [9]; pair 1: prompt [4], chosen [3], rejected
    # [2, 1]; sequence 4 alone (no group), scored from its second token
    ids = [[5, 6, 7, 8], [4, 3], [5, 6, 9], [4, 2, 1], [10, 11]]
    loss = [[0, 0, 1, 1], [0, 1], [0, 0, 1], [0, 1, 1], [1, 1]]
    packed = pack_sequences(
        ids, loss, groups=[[0, 2], [1, 3]], prefix_lengths=[2, 1], max_tokens_per_row=9
    )
    # row 0: unit 0 = 5 6 | 7 8 | 9, unit 1 = 4 | 3 | 2 1 (5 + 4 tokens); row 1: 10 11
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9, 4, 3, 2, 1], [10, 11] + [0] * 7]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 2, 0, 1, 1, 2], [0, 1] + [0] * 7]
    unit = [0, 0, 0, 0, 0, 1, 1, 1, 1]
    branch = [0, 0, 1, 1, 2, 0, 1, 2, 2]
    expected = torch.zeros(9, 9, dtype=torch.bool)
    for q in range(9):
        for k in range(q + 1):
            expected[q, k] = unit[q] == unit[k] and branch[k] in (0, branch[q])
    assert torch.equal(packed.attention_mask[0, 0], expected)
    # the second row: its sequence causally, each padding token only itself
    assert torch.equal(packed.attention_mask[1, 0, :2, :2], torch.tensor([[1, 0], [1, 1]]).bool())
    assert torch.equal(packed.attention_mask[1, 0, 2:], torch.eye(9, dtype=torch.bool)[2:])
    # scored: (state index, target, owner): chosen 7 from 6, 8 from 7; rejected 9 from 6 (the
    # prompt's end, not the chosen 8); 3 from 4; 2 from 4, 1 from 2; 11 from 10 (row 1)
    assert packed.scoring.T.tolist() == [
        [1, 7, 0],
        [2, 8, 0],
        [1, 9, 2],
        [5, 3, 1],
        [5, 2, 3],
        [7, 1, 3],
        [9, 11, 4],
    ]
    assert packed.num_computed_tokens == 18


def test_segment_attention_is_the_block_masks_attention() -> None:
    # the layout of the test above, one row: unit 0 = 5 6 | 7 8 | 9, unit 1 = 4 | 3 | 2 1, 10 11
    ids = [[5, 6, 7, 8], [4, 3], [5, 6, 9], [4, 2, 1], [10, 11]]
    loss = [[0, 0, 1, 1], [0, 1], [0, 0, 1], [0, 1, 1], [1, 1]]
    layout = {"groups": [[0, 2], [1, 3]], "prefix_lengths": [2, 1]}
    segments = pack_sequences(ids, loss, **layout, mask_format="segments")
    assert segments.segments == ((0, 0, 2, (2, 1)), (0, 5, 1, (1, 2)), (0, 9, 0, (2,)))
    assert segments.attention_mask.tolist() == [[1] * 11]  # no mask: nothing to build
    masked = pack_sequences(ids, loss, **layout)
    assert torch.equal(segments.input_ids, masked.input_ids)
    assert torch.equal(segments.position_ids, masked.position_ids)
    assert torch.equal(segments.scoring, masked.scoring)
    q, k, v = (torch.randn(1, 3, 11, 8, requires_grad=True) for _ in range(3))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, masked.attention_mask)
    got = segment_attention(q, k, v, segments.segments)
    torch.testing.assert_close(got, want)
    grads = torch.autograd.grad((got * want.detach()).sum(), (q, k, v))
    want_grads = torch.autograd.grad((want * want.detach()).sum(), (q, k, v))
    for g, w in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g, w)
    # rows of a budget: the padding after each row's units attends to nothing (zeros)
    budget = pack_sequences(ids, loss, **layout, max_tokens_per_row=9, mask_format="segments")
    assert budget.segments == ((0, 0, 2, (2, 1)), (0, 5, 1, (1, 2)), (1, 0, 0, (2,)))
    q, k, v = (torch.randn(2, 3, 9, 8) for _ in range(3))
    out = segment_attention(q, k, v, budget.segments)
    assert torch.equal(out[1, :, 2:], torch.zeros(3, 7, 8))


@pytest.mark.parametrize("attn", ["sdpa", "segments"])
def test_no_token_sees_another_sequence_through_the_model(attn: str) -> None:
    """Changing one pair's tokens leaves every other pair's log-probs bit-for-bit unchanged, and
    changing a chosen response leaves its own rejected response's log-prob unchanged."""
    model = _build("llama", attn)
    batch = _pairs(4, seed=5)
    before = concatenated_logps(model, batch, packing=True, prefix_sharing=True)
    changed = {key: value.clone() for key, value in batch.items()}
    # pair 1: a new chosen response (its prompt, and so its rejected side, untouched)
    response = changed["chosen_loss_mask"][1].bool()
    changed["chosen_input_ids"][1][response] = (
        changed["chosen_input_ids"][1][response] + 7
    ) % VOCAB
    # pair 2: a new prompt, shared by both sides
    for side in ("chosen", "rejected"):
        prompt = (changed[f"{side}_loss_mask"][2] == 0) & changed[f"{side}_attention_mask"][
            2
        ].bool()
        changed[f"{side}_input_ids"][2][prompt] = 3
    after = concatenated_logps(model, changed, packing=True, prefix_sharing=True)
    untouched = [0, 3]
    assert torch.equal(after.chosen[untouched], before.chosen[untouched])
    assert torch.equal(after.rejected[[0, 1, 3]], before.rejected[[0, 1, 3]])
    assert not torch.equal(after.chosen[1], before.chosen[1])
    assert not torch.equal(after.rejected[2], before.rejected[2])


def test_token_counts_real_and_computed() -> None:
    batch = _pairs(5, seed=7)
    lengths = batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum()
    prompts = sum(
        int(
            (batch["chosen_loss_mask"][i] == 0)[
                : int(batch["chosen_attention_mask"][i].sum())
            ].sum()
        )
        for i in range(5)
    )
    assert real_tokens(batch) == int(lengths) - prompts
    assert pack_pairs(batch, prefix_sharing=True).num_computed_tokens == real_tokens(batch)
    assert pack_pairs(batch, prefix_sharing=False).num_computed_tokens == int(lengths)
    padded = concatenated_logps(_build("llama", "sdpa"), batch)
    width = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
    assert (padded.num_real_tokens, padded.num_computed_tokens) == (real_tokens(batch), 10 * width)


def test_invalid_groups_are_errors() -> None:
    with pytest.raises(ValueError, match="does not share group 0"):
        pack_sequences([[1, 2], [1, 3]], [[0, 0], [0, 1]], groups=[[0, 1]], prefix_lengths=[2])
    with pytest.raises(ValueError, match="does not share group 0"):  # a scored prefix token
        pack_sequences([[1, 2], [1, 2]], [[1, 1], [0, 1]], groups=[[0, 1]], prefix_lengths=[1])
    with pytest.raises(ValueError, match="in groups 0 and 1"):
        pack_sequences([[1], [1]], [[0], [0]], groups=[[0, 1], [1]], prefix_lengths=[1, 1])
    with pytest.raises(ValueError, match="max_tokens_per_row"):
        pack_sequences([[1]], [[0]], max_tokens_per_row=0)


def test_a_row_padded_on_the_left_is_refused_not_read_as_zero_tokens() -> None:
    """Packing trims each row to its mask's count of 1s from the left: a left-padded row would
    lose its tokens (log-prob 0 and a wrong loss), so it is an error naming the row."""
    batch = _pairs(3, seed=1)
    pack_pairs(batch, prefix_sharing=True)  # right-padded, as the collator makes them
    mask = batch["rejected_attention_mask"]
    row = int(mask.sum(-1).argmin())  # the shortest row has padding to move
    length = int(mask[row].sum())
    assert length < mask.shape[1]
    for name in ("rejected_input_ids", "rejected_attention_mask", "rejected_loss_mask"):
        batch[name][row] = torch.roll(batch[name][row], mask.shape[1] - length)
    with pytest.raises(ValueError, match=f"rejected row {row} is padded otherwise"):
        pack_pairs(batch, prefix_sharing=True)
