"""End to end without the runtime: a few DPO steps on the example's task with a tiny model,
built only from chatlearn.hf and chatlearn.algorithms, lower the loss and raise held-out reward
accuracy."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import torch

from chatlearn.algorithms import DPOMetrics, accumulation_loss, compute_dpo, concatenated_logps
from chatlearn.hf import PreferenceDataset, build_causal_lm, byte_tokenizer

MAKE_DATA = Path(__file__).resolve().parents[2] / "examples" / "dpo" / "make_data.py"
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
STEPS, BATCH, BETA = 60, 32, 0.1


def _make_pairs():
    spec = importlib.util.spec_from_file_location("dpo_make_data", MAKE_DATA)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_pairs


def _evaluate(policy, ref_logps, batch) -> dict[str, float]:
    metrics = DPOMetrics(prefix="eval_")
    with torch.no_grad():
        policy_logps = concatenated_logps(policy, batch)
    metrics.update(compute_dpo(policy_logps, ref_logps.chosen, ref_logps.rejected, beta=BETA))
    return metrics.compute()


def test_a_few_dpo_steps_learn_minmax() -> None:
    # one thread: on a loaded 2-core machine, two spinning OpenMP threads per process are many
    # times slower than one
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train_and_check()
    finally:
        torch.set_num_threads(threads)


def _train_and_check() -> None:
    torch.manual_seed(0)
    tokenizer = byte_tokenizer()
    train, held_out = _make_pairs()(num_train=STEPS * BATCH, num_eval=128, max_value=99)
    train_set = PreferenceDataset(train, tokenizer, max_length=32)
    eval_set = PreferenceDataset(held_out, tokenizer, max_length=32)
    eval_batch = eval_set.collate_fn(list(eval_set))
    policy = build_causal_lm(TINY, seed=0)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    with torch.no_grad():
        eval_ref = concatenated_logps(reference, eval_batch)
    before = _evaluate(policy, eval_ref, eval_batch)
    assert before["eval_rewards/accuracies"] == 0.0  # policy == reference: every reward ties
    assert abs(before["eval_loss"] - 0.6931) < 1e-3

    losses = []
    for step in range(STEPS):
        batch = train_set.collate_fn(
            [train_set[i] for i in range(step * BATCH, (step + 1) * BATCH)]
        )
        with torch.no_grad():
            ref = concatenated_logps(reference, batch)
        out = compute_dpo(concatenated_logps(policy, batch), ref.chosen, ref.rejected, beta=BETA)
        accumulation_loss(out.losses, num_samples_global=BATCH).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out.losses.mean().item())

    after = _evaluate(policy, eval_ref, eval_batch)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first - 0.05, (first, last)
    assert after["eval_loss"] < before["eval_loss"] - 0.05, after
    assert after["eval_rewards/accuracies"] > 0.6, after
