"""DPO losses and rewards of every loss type against hand-computed numbers, and log-probs against
a direct per-token loop."""

from __future__ import annotations

import pytest
import torch

from chatlearn.algorithms import (
    REF_CHOSEN_KEY,
    REF_REJECTED_KEY,
    PairLogps,
    accumulation_loss,
    compute_dpo,
    concatenate_pairs,
    concatenated_logps,
    dpo_loss,
    reference_outputs,
    sequence_logps,
    split_pairs,
)

# Three pairs with beta = 0.5. Margins h = (pc - pr) - (rc - rr) = [1, -1, 3].
PC = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64)
PR = torch.tensor([-2.0, -1.0, -3.5], dtype=torch.float64)
RC = torch.tensor([-1.5, -1.5, -1.0], dtype=torch.float64)
RR = torch.tensor([-1.5, -1.5, -1.0], dtype=torch.float64)
BETA = 0.5
# -log σ(x) = log(1 + e^-x): x = 0.5 → 0.4740769842, x = -0.5 → 0.9740769842, x = 1.5 → 0.2014132779
NEG_LOGSIG = {0.5: 0.4740769842, -0.5: 0.9740769842, 1.5: 0.2014132779, -1.5: 1.7014132779}
CHOSEN_REWARDS = [0.25, -0.25, 0.25]  # 0.5 * (pc - rc)
REJECTED_REWARDS = [-0.25, 0.25, -1.25]  # 0.5 * (pr - rr)


def _check(loss_type: str, expected: list[float], label_smoothing: float = 0.0) -> None:
    losses, chosen, rejected = dpo_loss(
        PC, PR, RC, RR, beta=BETA, loss_type=loss_type, label_smoothing=label_smoothing
    )
    torch.testing.assert_close(
        losses, torch.tensor(expected, dtype=torch.float64), atol=1e-9, rtol=0
    )
    torch.testing.assert_close(chosen, torch.tensor(CHOSEN_REWARDS, dtype=torch.float64))
    torch.testing.assert_close(rejected, torch.tensor(REJECTED_REWARDS, dtype=torch.float64))


def test_sigmoid() -> None:
    _check("sigmoid", [NEG_LOGSIG[0.5], NEG_LOGSIG[-0.5], NEG_LOGSIG[1.5]])


def test_sigmoid_label_smoothing_is_cdpo() -> None:
    eps = 0.1
    expected = [
        (1 - eps) * NEG_LOGSIG[0.5] + eps * NEG_LOGSIG[-0.5],  # 0.5240769842
        (1 - eps) * NEG_LOGSIG[-0.5] + eps * NEG_LOGSIG[0.5],  # 0.9240769842
        (1 - eps) * NEG_LOGSIG[1.5] + eps * NEG_LOGSIG[-1.5],  # 0.3514132779
    ]
    assert expected[0] == pytest.approx(0.5240769842)
    _check("sigmoid", expected, label_smoothing=eps)


def test_ipo() -> None:
    # (h - 1/(2·0.5))² = (h - 1)²
    _check("ipo", [0.0, 4.0, 4.0])


def test_hinge() -> None:
    # max(0, 1 - 0.5·h)
    _check("hinge", [0.5, 1.5, 0.0])


def test_rewards_are_detached_and_losses_carry_gradient() -> None:
    pc = PC.clone().requires_grad_(True)
    losses, chosen, rejected = dpo_loss(pc, PR, RC, RR, beta=BETA)
    assert losses.requires_grad and not chosen.requires_grad and not rejected.requires_grad
    losses.sum().backward()
    # d/dpc of -log σ(β h) = -β (1 - σ(β h))
    expected = -BETA * (
        1 - torch.sigmoid(BETA * torch.tensor([1.0, -1.0, 3.0], dtype=torch.float64))
    )
    torch.testing.assert_close(pc.grad, expected)


def test_compute_dpo_ipo_averages_over_tokens_and_rpo_adds_nll() -> None:
    policy = PairLogps(PC * 2, PR * 4, torch.tensor([2.0, 2, 2]), torch.tensor([4.0, 4, 4]))
    out = compute_dpo(policy, RC * 2, RR * 4, beta=BETA, loss_type="ipo", rpo_alpha=0.5)
    # after dividing by the lengths the inputs are PC, PR, RC, RR again: ipo losses [0, 4, 4];
    # nll = -sum(chosen logps) / tokens = -PC
    torch.testing.assert_close(out.nll, -PC)
    torch.testing.assert_close(
        out.losses, torch.tensor([0.0, 4, 4], dtype=torch.float64) - 0.5 * PC
    )
    torch.testing.assert_close(out.chosen_logps, PC)
    torch.testing.assert_close(
        out.chosen_rewards, torch.tensor(CHOSEN_REWARDS, dtype=torch.float64)
    )


def test_compute_dpo_sigmoid_uses_sums_and_no_nll_by_default() -> None:
    policy = PairLogps(PC, PR, torch.tensor([3.0, 3, 3]), torch.tensor([5.0, 5, 5]))
    out = compute_dpo(policy, RC, RR, beta=BETA)
    assert out.nll is None
    expected = torch.tensor(
        [NEG_LOGSIG[0.5], NEG_LOGSIG[-0.5], NEG_LOGSIG[1.5]], dtype=torch.float64
    )
    torch.testing.assert_close(out.losses, expected, atol=1e-9, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"loss_type": "kto"}, "loss_type"),
        ({"beta": 0.0}, "beta"),
        ({"label_smoothing": 0.5}, "label_smoothing"),
        ({"loss_type": "hinge", "label_smoothing": 0.1}, "sigmoid"),
    ],
)
def test_invalid_arguments(kwargs: dict, match: str) -> None:
    args = {"beta": BETA, **kwargs}
    with pytest.raises(ValueError, match=match):
        dpo_loss(PC, PR, RC, RR, **args)


def test_sequence_logps_matches_per_token_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    n, length, vocab = 4, 9, 11
    logits = torch.randn(n, length, vocab, generator=gen, dtype=torch.float64)
    input_ids = torch.randint(0, vocab, (n, length), generator=gen)
    loss_mask = torch.zeros(n, length, dtype=torch.long)
    # prompt lengths 1..4, responses of different lengths, right padding after
    for i, (start, stop) in enumerate([(1, 9), (2, 5), (3, 4), (4, 8)]):
        loss_mask[i, start:stop] = 1
    logps, num_tokens = sequence_logps(logits, input_ids, loss_mask)
    for i in range(n):
        total, count = 0.0, 0
        for t in range(1, length):
            if loss_mask[i, t]:
                total += torch.log_softmax(logits[i, t - 1], dim=-1)[input_ids[i, t]].item()
                count += 1
        assert logps[i].item() == pytest.approx(total, abs=1e-9)
        assert num_tokens[i].item() == count


def test_sequence_logps_ignores_first_position_and_padding_values() -> None:
    logits = torch.randn(1, 5, 7)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    mask = torch.tensor([[1, 0, 1, 0, 0]])  # position 0 cannot be scored, even if marked
    a, n = sequence_logps(logits, ids, mask)
    b, _ = sequence_logps(logits, torch.tensor([[6, 2, 3, 0, 0]]), mask)
    assert n.item() == 1
    torch.testing.assert_close(a, b)


def _pair_batch() -> dict[str, torch.Tensor]:
    return {
        "chosen_input_ids": torch.tensor([[1, 2, 3, 0], [1, 4, 5, 6]]),
        "chosen_attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]),
        "chosen_loss_mask": torch.tensor([[0, 0, 1, 0], [0, 1, 1, 1]]),
        "rejected_input_ids": torch.tensor([[1, 2, 7, 7, 7, 7], [1, 4, 8, 0, 0, 0]]),
        "rejected_attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]),
        "rejected_loss_mask": torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0]]),
    }


def test_concatenate_and_split_pairs() -> None:
    batch = _pair_batch()
    cat = concatenate_pairs(batch, pad_token_id=9)
    assert cat["input_ids"].shape == (4, 6)
    assert cat["input_ids"][0].tolist() == [1, 2, 3, 0, 9, 9]
    assert cat["attention_mask"][1].tolist() == [1, 1, 1, 1, 0, 0]
    assert cat["loss_mask"][2].tolist() == [0, 0, 1, 1, 1, 1]
    chosen, rejected = split_pairs(cat["loss_mask"])
    assert chosen[:, :4].tolist() == batch["chosen_loss_mask"].tolist()
    assert rejected.tolist() == batch["rejected_loss_mask"].tolist()
    with pytest.raises(ValueError):
        split_pairs(torch.zeros(3))


class _TinyLM(torch.nn.Module):
    """A causal-enough stand-in: logits depend on the current token only."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(10, 8)
        self.head = torch.nn.Linear(8, 10)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(input_ids))


def test_concatenated_logps_equals_separate_forwards() -> None:
    model, batch = _TinyLM(), _pair_batch()
    pair = concatenated_logps(model, batch)
    for side, got, got_n in (
        ("chosen", pair.chosen, pair.chosen_num_tokens),
        ("rejected", pair.rejected, pair.rejected_num_tokens),
    ):
        ids, mask = batch[f"{side}_input_ids"], batch[f"{side}_loss_mask"]
        want, want_n = sequence_logps(model(ids, batch[f"{side}_attention_mask"]), ids, mask)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(got_n, want_n)


def test_accumulation_loss_gives_the_whole_batch_gradient() -> None:
    weights = torch.tensor([0.3, -0.2], requires_grad=True)
    x = torch.randn(7, 2, generator=torch.Generator().manual_seed(1))

    def per_sample(rows: torch.Tensor) -> torch.Tensor:
        return (rows @ weights) ** 2

    per_sample(x).mean().backward()
    whole = weights.grad.clone()
    weights.grad = None
    # rank 0: micro-batches of 3 and 1, rank 1: 2 and 1; DDP averages the two ranks' gradients
    grads = []
    for micro_batches in ([x[0:3], x[3:4]], [x[4:6], x[6:7]]):
        for rows in micro_batches:
            accumulation_loss(per_sample(rows), num_samples_global=7, world_size=2).backward()
        grads.append(weights.grad.clone())
        weights.grad = None
    torch.testing.assert_close((grads[0] + grads[1]) / 2, whole)


def test_reference_outputs_pass_the_batch_on_with_logps() -> None:
    model, batch = _TinyLM(), _pair_batch()
    out = reference_outputs(model, batch)
    assert set(out) == set(batch) | {REF_CHOSEN_KEY, REF_REJECTED_KEY}
    for key, value in batch.items():
        assert torch.equal(out[key], value)
    pair = concatenated_logps(model, batch)
    torch.testing.assert_close(out[REF_CHOSEN_KEY], pair.chosen.detach())
    torch.testing.assert_close(out[REF_REJECTED_KEY], pair.rejected.detach())
    assert not out[REF_CHOSEN_KEY].requires_grad
