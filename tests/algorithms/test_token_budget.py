"""A token budget per forward (`chatlearn.algorithms.token_budget`): groups within the budget,
the same number of groups on every rank when asked, and a step's DPO gradient equal to the
gradient of the engine's micro-batches (fp32, 1e-6) however the pairs are regrouped."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from chatlearn.algorithms import (
    accumulation_loss,
    compute_dpo,
    concatenated_logps,
    reference_outputs,
)
from chatlearn.algorithms.dpo import REF_CHOSEN_KEY, REF_REJECTED_KEY
from chatlearn.algorithms.token_budget import (
    concat_batches,
    group_rows,
    max_over_ranks,
    pair_costs,
    regroup_step,
    select_rows,
    split_batch,
    split_evenly,
)
from chatlearn.hf import build_causal_lm

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # test_packing's model and pairs (tests import by file path)
    sys.path.insert(0, str(HERE))
from test_packing import TINY, VOCAB  # noqa: E402
from test_packing import _pairs as _mixed_pairs  # noqa: E402


def _pairs(num_pairs: int, seed: int) -> dict[str, torch.Tensor]:
    """test_packing's pairs of mixed lengths, with reference log-probs as the trainer gets them."""
    batch = _mixed_pairs(num_pairs, seed)
    gen = torch.Generator().manual_seed(seed)
    batch[REF_CHOSEN_KEY] = -torch.rand(num_pairs, generator=gen) * 50
    batch[REF_REJECTED_KEY] = -torch.rand(num_pairs, generator=gen) * 50
    return batch


def _forward_cost(batch: dict[str, Any], packing: bool, prefix_sharing: bool) -> int:
    costs = pair_costs(batch, packing=packing, prefix_sharing=prefix_sharing)
    if packing:
        return sum(c for c, _ in costs)
    return 2 * len(costs) * max(length for _, length in costs)


@pytest.mark.parametrize(
    ("packing", "prefix_sharing"), [(True, True), (True, False), (False, False)]
)
def test_groups_stay_within_the_budget_and_keep_every_pair_once(
    packing: bool, prefix_sharing: bool
) -> None:
    batch = _pairs(24, seed=1)
    budget = 400
    parts = split_batch(batch, budget, packing=packing, prefix_sharing=prefix_sharing)
    rows = sorted(i for group, _ in parts for i in group)
    assert rows == list(range(24))
    assert 1 < len(parts) < 24
    for group, sub in parts:
        assert group == sorted(group)
        cost = _forward_cost(sub, packing, prefix_sharing)
        assert cost <= budget or len(group) == 1
        for key, value in sub.items():  # the rows are the batch's, padding columns cut
            width = value.shape[1] if value.dim() == 2 else None
            expected = batch[key][group]
            if width is not None:
                assert not expected[:, width:].any() or not key.endswith("_mask")
                expected = expected[:, :width]
            assert torch.equal(value, expected), key
    # first fit in decreasing cost: no two groups could have been one
    if packing:
        loads = sorted(_forward_cost(sub, True, prefix_sharing) for _, sub in parts)
        assert loads[0] + loads[1] > budget


def test_a_pair_above_the_budget_gets_a_forward_of_its_own() -> None:
    costs = [(50, 30), (500, 300), (60, 40)]
    assert group_rows(costs, 100, packing=True) == [[0], [1], [2]]
    assert group_rows(costs, 120, packing=True) == [[0, 2], [1]]
    # padded: 2 × rows × the group's longest row
    assert group_rows(costs, 160, packing=False) == [[0, 2], [1]]
    assert group_rows(costs, 159, packing=False) == [[0], [1], [2]]
    with pytest.raises(ValueError, match="max_tokens_per_micro_batch"):
        group_rows(costs, 0, packing=True)


def test_ranks_agree_on_the_number_of_forwards() -> None:
    batch = _pairs(8, seed=2)
    alone = split_batch(batch, 10_000, packing=True, prefix_sharing=True)
    assert len(alone) == 1
    agreed = split_batch(
        batch, 10_000, packing=True, prefix_sharing=True, agree=lambda count: max(count, 5)
    )
    assert len(agreed) == 5
    assert sorted(i for group, _ in agreed for i in group) == list(range(8))
    groups = [[0, 1]]
    with pytest.raises(ValueError, match="cannot make 3 groups of 2 pairs"):
        split_evenly(groups, 3, [(1, 1), (1, 1)])


def test_micro_batches_of_different_widths_pool_into_one() -> None:
    a, b = _pairs(3, seed=3), _pairs(2, seed=4)
    pooled = concat_batches([a, b])
    assert pooled["chosen_input_ids"].shape[0] == 5
    back = select_rows(pooled, [3, 4])
    for key in ("chosen_input_ids", "rejected_loss_mask", REF_CHOSEN_KEY):
        assert torch.equal(back[key], b[key]), key
    with pytest.raises(ValueError, match="differ in their keys"):
        concat_batches([a, {k: v for k, v in b.items() if k != REF_CHOSEN_KEY}])


@pytest.mark.parametrize(("packing", "prefix_sharing"), [(True, True), (False, False)])
def test_the_step_gradient_does_not_depend_on_the_grouping(
    packing: bool, prefix_sharing: bool
) -> None:
    model = build_causal_lm(TINY, vocab_size=VOCAB, seed=0, dtype="float32")
    model.config._attn_implementation = "sdpa"
    micro_batches = [_pairs(6, seed=5), _pairs(6, seed=6)]
    options = {"packing": packing, "prefix_sharing": prefix_sharing}

    def step_gradient(batches: list[dict[str, Any]]) -> tuple[list[torch.Tensor], float]:
        model.zero_grad(set_to_none=True)
        total = 0.0
        for mb in batches:
            policy = concatenated_logps(model, mb, **options)
            out = compute_dpo(policy, mb[REF_CHOSEN_KEY], mb[REF_REJECTED_KEY], beta=0.1)
            loss = accumulation_loss(out.losses, num_samples_global=12)
            loss.backward()
            total += float(loss.detach())
        return [p.grad.clone() for p in model.parameters()], total

    expected, loss = step_gradient(micro_batches)
    regrouped = regroup_step(micro_batches, 200, **options)
    assert len(regrouped) > 2
    got, regrouped_loss = step_gradient(regrouped)
    assert regrouped_loss == pytest.approx(loss, rel=1e-6, abs=1e-7)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_reference_outputs_within_a_budget_equal_one_forward() -> None:
    model = build_causal_lm(TINY, vocab_size=VOCAB, seed=0, dtype="float32").eval()
    model.config._attn_implementation = "sdpa"
    batch = _pairs(10, seed=7)
    options = {"packing": True, "prefix_sharing": True}
    whole = reference_outputs(model, batch, **options)
    calls = []
    budgeted = reference_outputs(
        model,
        batch,
        max_tokens_per_micro_batch=250,
        agree=lambda count: calls.append(count) or count + 1,
        **options,
    )
    assert calls and calls[0] > 1  # several forwards, and one more than needed when asked
    assert set(budgeted) == set(whole)
    for key, value in whole.items():
        torch.testing.assert_close(budgeted[key], value, rtol=1e-5, atol=1e-5)
    assert max_over_ranks(3) == 3  # no process group: this rank's count
