"""One rank of the megatron DPO test runs: `python dpo_worker.py --rank R --world-size W ...`.

Started by test_megatron_dpo.py, one process per rank, on a gloo group over 127.0.0.1. It drives
the example's modules (examples/megatron/models.py) the way the engine will: reference
`build_dataset` + `forward_step`, then trainer `train_step` over micro-batches, and writes what
the tests check as JSON to `--out`:

- world size 1: TP=1 training, plus single-process checks (compat idempotence, explicit vs
  default attention mask, vocab-parallel log-probs vs chatlearn.algorithms.logps.sequence_logps).
- world size 2: rank layouts for (tp, pp) in (1, 2), (2, 1), (1, 1); TP=2 training with the
  same log-prob check on gathered logits; then DP=2 training (each rank half the micro-batches).

Every run uses the same seed, data and global batches, so their losses must agree.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))  # `examples.megatron` is imported as the main file does

warnings.filterwarnings("ignore")  # megatron warns at import that Apex/TE are missing

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from convert_worker import end_worker  # noqa: E402

SEED = 7
NUM_STEPS = 4
MICRO_BATCH_SIZE = 4
MICRO_BATCHES_PER_STEP = 2
MODEL_ARGS = {
    "vocab_size": 128,
    "hidden_size": 32,
    "num_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 32,
    "max_length": 24,
    "lr": 0.01,
    "beta": 0.5,
}


def make_args(tensor_model_parallel_size: int, world_size: int) -> dict[str, Any]:
    model = {
        "num_cpu": world_size,
        "cpu_per_process": 1,
        "tensor_model_parallel_size": tensor_model_parallel_size,
        "model_args": MODEL_ARGS,
    }
    return {
        "models": {"reference": dict(model), "ppo_policy": dict(model, trainable=True)},
        "runtime_args": {"seed": SEED},
    }


def run_dpo(tensor_model_parallel_size: int) -> dict[str, Any]:
    """Reference forward on every micro-batch, then NUM_STEPS trainer steps; losses per step."""
    from chatlearn.megatron.parallel import destroy_parallel_state
    from examples.megatron.data import toy_preference_pairs
    from examples.megatron.models import PolicyReference, PolicyTrainer

    args = make_args(tensor_model_parallel_size, dist.get_world_size())
    reference = PolicyReference("reference", args=args)
    trainer = PolicyTrainer("ppo_policy", args=args)
    reference.setup()
    trainer.setup()
    dataset = reference.build_dataset(toy_preference_pairs(16, seed=SEED))
    num_micro = len(dataset) // MICRO_BATCH_SIZE
    micro_batches = []
    for index in range(num_micro):
        items = [
            dataset[i] for i in range(index * MICRO_BATCH_SIZE, (index + 1) * MICRO_BATCH_SIZE)
        ]
        micro_batches.append(reference.forward_step(dataset.collate_fn(items)))
    dp_rank, dp_size = trainer.data_parallel_rank, trainer.data_parallel_size
    losses, step_seconds = [], []
    for step in range(NUM_STEPS):
        first = (step * MICRO_BATCHES_PER_STEP) % num_micro
        step_batches = [
            micro_batches[(first + i) % num_micro] for i in range(MICRO_BATCHES_PER_STEP)
        ]
        start = time.perf_counter()
        metrics = trainer.train_step(step_batches[dp_rank::dp_size], iteration=step)
        step_seconds.append(time.perf_counter() - start)
        losses.append(metrics["loss"])
    result = {
        "losses": losses,
        "last_metrics": metrics,
        "step_seconds": step_seconds,
        "tensor_parallel_rank": trainer.tensor_parallel_rank(),
        "data_parallel_rank": dp_rank,
        "data_parallel_size": dp_size,
        "is_last_rank": trainer.is_last_rank(),
        "cpu_compat_patches": trainer.cpu_compat_patches,
        "logps_check": logps_check(trainer.model, micro_batches[0]),
    }
    destroy_parallel_state()
    return result


def logps_check(model: Any, batch: dict[str, Any]) -> float:
    """Max |vocab-parallel log-probs - sequence_logps(all-gathered logits)| on one batch."""
    from megatron.core import parallel_state as mpu

    from chatlearn.algorithms.dpo import concatenate_pairs
    from chatlearn.algorithms.logps import sequence_logps
    from chatlearn.megatron.dpo import vocab_parallel_sequence_logps
    from chatlearn.megatron.gpt import gpt_logits

    with torch.no_grad():
        cat = concatenate_pairs(batch)
        logits = gpt_logits(model, cat["input_ids"], cat["attention_mask"])
        ours, count = vocab_parallel_sequence_logps(logits, cat["input_ids"], cat["loss_mask"])
        # megatron's gather_from_tensor_model_parallel_region allocates on CUDA: gather by hand
        parts = [
            torch.empty_like(logits) for _ in range(mpu.get_tensor_model_parallel_world_size())
        ]
        dist.all_gather(parts, logits.contiguous(), group=mpu.get_tensor_model_parallel_group())
        full = torch.cat(parts, dim=-1)
        expected, expected_count = sequence_logps(full, cat["input_ids"], cat["loss_mask"])
    assert torch.equal(count, expected_count)
    return float((ours - expected).abs().max())


def single_process_checks() -> dict[str, Any]:
    """Compat idempotence and explicit vs default causal mask, on a fresh TP=1 model."""
    from chatlearn.megatron.compat import applied_patches, apply_cpu_compat
    from chatlearn.megatron.gpt import GPTConfig, build_gpt_model, position_ids_for
    from chatlearn.megatron.parallel import (
        ParallelLayout,
        destroy_parallel_state,
        initialize_parallel_state,
    )

    first = [patch.name for patch in apply_cpu_compat()]
    second = [patch.name for patch in apply_cpu_compat()]
    initialize_parallel_state(ParallelLayout(world_size=1), seed=SEED)
    model = build_gpt_model(GPTConfig.from_model_args(MODEL_ARGS)).eval()
    ids = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    explicit = torch.triu(torch.ones(10, 10, dtype=torch.bool), diagonal=1)[None, None]
    with torch.no_grad():
        with_mask = model(ids, position_ids_for(ids), explicit)
        default_mask = model(ids, position_ids_for(ids), None)  # the patched default mask
    destroy_parallel_state()
    return {
        "patches_first_call": first,
        "patches_second_call": second,
        "patches_in_effect": [patch.name for patch in applied_patches()],
        "mask_max_diff": float((with_mask - default_mask).abs().max()),
    }


def layout_checks() -> list[dict[str, Any]]:
    from chatlearn.megatron.parallel import (
        ParallelLayout,
        destroy_parallel_state,
        initialize_parallel_state,
        is_last_rank,
    )

    results = []
    for tp, pp in ((1, 2), (2, 1), (1, 1)):
        state = initialize_parallel_state(ParallelLayout(2, tp, pp), seed=SEED)
        results.append(
            {
                "tp": tp,
                "pp": pp,
                "coordinates": [
                    state.tensor_model_parallel_rank,
                    state.pipeline_model_parallel_rank,
                    state.data_parallel_rank,
                ],
                "data_parallel_size": state.data_parallel_size,
                "is_last_rank": is_last_rank(),
            }
        )
        destroy_parallel_state()
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", required=True)
    opts = parser.parse_args()
    torch.set_num_threads(1)  # several ranks share two cores
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{opts.port}",
        rank=opts.rank,
        world_size=opts.world_size,
    )
    result: dict[str, Any] = {"rank": opts.rank, "world_size": opts.world_size}
    if opts.world_size == 1:
        result["checks"] = single_process_checks()
        result["tp1"] = run_dpo(1)
    else:
        result["layouts"] = layout_checks()
        result["tp2"] = run_dpo(2)
        result["dp2"] = run_dpo(1)
    Path(opts.out).write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    end_worker()
