"""One rank of the layout test runs: `python layout_worker.py --rank R --world-size W ...`.

Started by test_layouts.py, one process per rank, on a gloo group over 127.0.0.1. It drives the
ready-made HF modules (chatlearn.hf.modules) as the engine does — reference `forward_step`, then
trainer `train_step` over micro-batches — on the example's min/max task with a tiny model, and
writes what the tests check as JSON to `--out`:

- `train`: 10 steps (the plain layout with W = 1, FSDP2 with W = 2); losses, grad norms,
  reference log-probs, memory report; a periodic checkpoint after step 5, and a second trainer
  that loads it and repeats steps 6-10 (losses and final weights must be bit-identical); the
  policy's log-probs at the checkpoint and its HF export (the checkpoint's `hf_model` with one
  process, written apart with FSDP2, as at a run's end: it must reproduce them); the reference's
  store fingerprint (`chatlearn.engine.reference_store`).
- `ddp` (W = 2): DDP steps and their memory report, to compare with FSDP2's; a checkpoint
  after step 2 and a second trainer that loads it and repeats the steps after it.
- `lora`: LoRA steps (FSDP2 with W = 2): losses, which parameters changed, the adapter and the
  trainer's log-probs (the saved adapter on the base model must reproduce them).
  With W = 1 a periodic checkpoint after step 15 and a second trainer that loads it and repeats
  3 steps;
  with W = 2 a periodic (sharded) checkpoint at the end, where the adapter is exported.
- `bf16`: a few steps with mixed_precision bf16.
- `tied`: a few steps of the model with tied embeddings; with W = 2, whether the FSDP2 root's
  parameters were sharded again by the time the backward reached the embedding.

Every run uses the same seed, data and global batches, so their results must agree.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from chatlearn.algorithms import concatenated_logps  # noqa: E402
from chatlearn.config import Config  # noqa: E402
from chatlearn.engine.reference_store import fingerprint  # noqa: E402
from chatlearn.hf.modules import HFDPOTrainer, HFReference  # noqa: E402
from examples.dpo.make_data import make_pairs  # noqa: E402

TINY = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
STEPS, GLOBAL_BATCH, MICRO_BATCHES = 10, 8, 2
CHECKPOINT_AFTER = 5
DDP_STEPS, DDP_CHECKPOINT_AFTER = 4, 2
BUDGET = 40  # tokens per forward: a pair of the task is about 20-50 (prompt shared)
LORA_STEPS = {1: 30, 2: 5}  # enough to see the loss fall in one process; to compare with two
LORA_CHECKPOINT_AFTER = 15  # one process: a checkpoint, and a trainer resuming it


def make_args(world_size: int, **model_args: Any) -> Config:
    args = {
        "model_config": TINY,
        "seed": 0,
        "max_length": 32,
        "beta": 0.1,
        "learning_rate": 3e-3,
        "warmup_steps": 2,
        "logps_chunk_size": 16,
        **model_args,
    }
    model = {"num_cpu": world_size, "model_args": args}
    return Config(
        {
            "models": {"reference": model, "policy": dict(model, trainable=True)},
            "runtime": {
                "num_episode": 1,
                "sample_per_episode": STEPS * GLOBAL_BATCH,
                "train_micro_batch_size": GLOBAL_BATCH // MICRO_BATCHES,
                "train_global_batch_size": GLOBAL_BATCH,
            },
        }
    )


def start(module: Any, rank: int, world_size: int) -> Any:
    module._rank, module._world_size = rank, world_size  # as the runtime sets them
    module.setup()
    return module


def reference_batches(
    args: Config, rank: int, world: int, steps: int = STEPS, found: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Reference outputs of every micro-batch of the run (the whole global micro-batch);
    ``found`` gets the reference's store fingerprint (a collective when sharded)."""
    reference = start(HFReference("reference", args=args), rank, world)
    if found is not None:
        found["fingerprint"] = fingerprint(reference)
    train, _ = make_pairs(num_train=steps * GLOBAL_BATCH, num_eval=8, max_value=99)
    dataset = reference.build_dataset(train)
    size = GLOBAL_BATCH // MICRO_BATCHES
    return [
        reference.forward_step(dataset.collate_fn([dataset[j] for j in range(i, i + size)]))
        for i in range(0, len(dataset), size)
    ]


def first_batch() -> dict[str, Any]:
    """The run's first micro-batch as the reference receives it (for checks outside a run)."""
    from chatlearn.hf import PreferenceDataset, load_tokenizer

    train, _ = make_pairs(num_train=STEPS * GLOBAL_BATCH, num_eval=8, max_value=99)
    dataset = PreferenceDataset(train, load_tokenizer(None), max_length=32)
    size = GLOBAL_BATCH // MICRO_BATCHES
    return dataset.collate_fn([dataset[j] for j in range(size)])


def local_share(batch: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    """This data-parallel rank's rows of a micro-batch (all of them with one rank)."""
    rows = batch["ref_chosen_logps"].shape[0]
    share = rows // world
    return {key: value[rank * share : (rank + 1) * share] for key, value in batch.items()}


def step_data(batches: list[dict[str, Any]], step: int, rank: int, world: int) -> list[Any]:
    first = step * MICRO_BATCHES
    return [local_share(b, rank, world) for b in batches[first : first + MICRO_BATCHES]]


def policy_logps(trainer: HFDPOTrainer, batch: dict[str, Any]) -> list[float]:
    with torch.no_grad():
        logps = concatenated_logps(trainer.network, batch, pad_token_id=trainer.pad_token_id)
    return torch.cat([logps.chosen, logps.rejected]).tolist()


def _local(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if hasattr(param, "to_local") else param


def weights_digest(trainer: HFDPOTrainer) -> list[float]:
    """Per-parameter sums of this rank's (local) values: equal iff the runs agree bit for bit
    (in practice), cheap to ship as JSON."""
    out = []
    for param in trainer.network.parameters():
        out.append(float(_local(param).detach().double().sum()))
    return out


def run_train(rank: int, world: int, tmp: Path, **model_args: Any) -> dict[str, Any]:
    parallel = "fsdp" if world > 1 else "none"
    args = make_args(world, parallel=parallel, **model_args)
    found: dict[str, Any] = {}
    batches = reference_batches(args, rank, world, found=found)
    trainer = start(HFDPOTrainer("policy", args=args), rank, world)
    checkpoint = tmp / "checkpoint" / "policy" / f"rank_{rank}"
    losses, norms, logps_at_checkpoint = [], [], []
    for step in range(STEPS):
        metrics = trainer.train_step(step_data(batches, step, rank, world), iteration=step)
        losses.append(metrics["loss"])
        norms.append(metrics["grad_norm"])
        if step + 1 == CHECKPOINT_AFTER:
            # as the engine sets them around a periodic save (FSDP2: no hf_model then)
            trainer._checkpoint_dir, trainer.checkpoint_reason = checkpoint, "interval"
            trainer.save_checkpoint(step + 1)
            final_extra = trainer.final_checkpoint_extra_bytes()  # the engine asks then
            trainer._checkpoint_dir = trainer.checkpoint_reason = None
            if trainer.layout.sharded:  # what the run's end (or a request) writes
                trainer.export_hf_model(tmp / "export")
            logps_at_checkpoint = policy_logps(trainer, batches[0])
    memory = trainer.memory_report()
    final = weights_digest(trainer)

    resumed = start(HFDPOTrainer("policy", args=args), rank, world)
    resumed._checkpoint_dir = checkpoint
    resumed.load_checkpoint(CHECKPOINT_AFTER)
    resumed_losses = [
        resumed.train_step(step_data(batches, step, rank, world), iteration=step)["loss"]
        for step in range(CHECKPOINT_AFTER, STEPS)
    ]
    return {
        "losses": losses,
        "grad_norms": norms,
        "ref_logps": [b["ref_chosen_logps"].tolist() for b in batches],
        "memory": memory,
        "final_weights": final,
        "resumed_losses": resumed_losses,
        "resumed_weights": weights_digest(resumed),
        "logps_at_checkpoint": logps_at_checkpoint,
        "checkpoint": str(checkpoint),
        "export": str(tmp / "export" if trainer.layout.sharded else checkpoint / "hf_model"),
        "final_extra_bytes": final_extra,
        "layout": trainer.layout.describe(),
        "reference_fingerprint": found["fingerprint"],
    }


def run_ddp(rank: int, world: int, tmp: Path) -> dict[str, Any]:
    args = make_args(world, parallel="ddp")
    batches = reference_batches(args, rank, world, steps=DDP_STEPS)
    trainer = start(HFDPOTrainer("policy", args=args), rank, world)
    checkpoint = tmp / "ddp_checkpoint" / "policy" / f"rank_{rank}"
    losses = []
    for step in range(DDP_STEPS):
        losses.append(trainer.train_step(step_data(batches, step, rank, world), step)["loss"])
        if step + 1 == DDP_CHECKPOINT_AFTER:
            trainer._checkpoint_dir = checkpoint  # as the engine sets it around a save
            trainer.save_checkpoint(step + 1)
            trainer._checkpoint_dir = None
    resumed = start(HFDPOTrainer("policy", args=args), rank, world)
    resumed._checkpoint_dir = checkpoint
    resumed.load_checkpoint(DDP_CHECKPOINT_AFTER)
    resumed_losses = [
        resumed.train_step(step_data(batches, step, rank, world), step)["loss"]
        for step in range(DDP_CHECKPOINT_AFTER, DDP_STEPS)
    ]
    return {
        "memory": trainer.memory_report(),
        "layout": trainer.layout.describe(),
        "losses": losses,
        "final_weights": weights_digest(trainer),
        "resumed_losses": resumed_losses,
        "resumed_weights": weights_digest(resumed),
        "checkpoint": str(checkpoint),
    }


def run_lora(rank: int, world: int, tmp: Path) -> dict[str, Any]:
    parallel = "fsdp" if world > 1 else "none"
    lora = {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]}
    args = make_args(world, parallel=parallel, lora=lora, learning_rate=3e-2, beta=0.5)
    steps = LORA_STEPS[world]
    batches = reference_batches(args, rank, world, steps)
    trainer = start(HFDPOTrainer("policy", args=args), rank, world)
    before = {name: _local(p).detach().clone() for name, p in trainer.model.named_parameters()}
    checkpoint = tmp / "lora_checkpoint" / "policy" / f"rank_{rank}"
    losses = []
    final_extra = None
    for step in range(steps):
        losses.append(trainer.train_step(step_data(batches, step, rank, world), step)["loss"])
        if step + 1 == LORA_CHECKPOINT_AFTER and world == 1:
            # as the engine sets them around a periodic save (the adapter, not merged weights)
            trainer._checkpoint_dir, trainer.checkpoint_reason = checkpoint, "interval"
            trainer.save_checkpoint(step + 1)
            final_extra = trainer.final_checkpoint_extra_bytes()
            trainer._checkpoint_dir = trainer.checkpoint_reason = None
    resumed_losses = []
    if world == 1:  # the unsharded checkpoint: the adapters and the base's digest
        resumed = start(HFDPOTrainer("policy", args=args), rank, world)
        resumed._checkpoint_dir = checkpoint
        resumed.load_checkpoint(LORA_CHECKPOINT_AFTER)
        resumed_losses = [
            resumed.train_step(step_data(batches, step, rank, world), step)["loss"]
            for step in range(LORA_CHECKPOINT_AFTER, LORA_CHECKPOINT_AFTER + 3)
        ]
    changed = sorted(
        name
        for name, p in trainer.model.named_parameters()
        if not torch.equal(_local(p).detach(), before[name])
    )
    if world > 1:  # a periodic sharded checkpoint, where the export below is taken
        trainer._checkpoint_dir, trainer.checkpoint_reason = checkpoint, "interval"
        trainer.save_checkpoint(steps)
        final_extra = trainer.final_checkpoint_extra_bytes()
        trainer._checkpoint_dir = trainer.checkpoint_reason = None
    target = tmp / "lora_export"
    trainer.export_hf_model(target)
    optimizer_params = sum(len(g["params"]) for g in trainer.optimizer.param_groups)
    return {
        "losses": losses,
        "changed": changed,
        "num_parameters": len(before),
        "optimizer_params": optimizer_params,
        "logps": policy_logps(trainer, batches[0]),
        "export": str(target),
        "memory": trainer.memory_report(),
        "checkpoint": str(checkpoint),
        "resumed_losses": resumed_losses,
        "final_extra_bytes": final_extra,
    }


def run_tied(rank: int, world: int) -> dict[str, Any]:
    """Tied input and output embeddings (their gradients summed in place); with FSDP2, whether
    the root's parameters are sharded again when the backward reaches the embedding."""
    from torch.distributed.tensor import DTensor

    parallel = "fsdp" if world > 1 else "none"
    args = make_args(world, parallel=parallel, model_config={**TINY, "tie_word_embeddings": True})
    steps = 4
    batches = reference_batches(args, rank, world, steps)
    trainer = start(HFDPOTrainer("policy", args=args), rank, world)
    root_sharded: list[bool] = []

    def embedding_ran(module: Any, args: Any, output: torch.Tensor) -> None:
        if output.requires_grad:  # its gradient comes after every layer's backward
            output.register_hook(
                lambda grad: root_sharded.append(isinstance(trainer.network.head.weight, DTensor))
            )

    trainer.model.get_input_embeddings().register_forward_hook(embedding_ran)
    metrics = [
        trainer.train_step(step_data(batches, step, rank, world), iteration=step)
        for step in range(steps)
    ]
    return {
        "losses": [m["loss"] for m in metrics],
        "grad_norms": [m["grad_norm"] for m in metrics],
        "head": type(trainer.model.get_output_embeddings()).__name__,
        "root_sharded_in_backward": root_sharded,
    }


def run_bf16(rank: int, world: int) -> dict[str, Any]:
    parallel = "fsdp" if world > 1 else "none"
    args = make_args(world, parallel=parallel, mixed_precision="bf16")
    batches = reference_batches(args, rank, world)
    trainer = start(HFDPOTrainer("policy", args=args), rank, world)
    losses = [
        trainer.train_step(step_data(batches, step, rank, world), iteration=step)["loss"]
        for step in range(4)
    ]
    dtypes = sorted({str(p.dtype) for p in trainer.network.parameters()})
    return {"losses": losses, "param_dtypes": dtypes}


def run_budget(rank: int, world: int) -> dict[str, Any]:
    """`train`'s steps with a token budget per forward of `BUDGET` tokens: the step's pairs run
    in more forwards than micro-batches (and, sharded, in as many on every rank)."""
    parallel = "fsdp" if world > 1 else "none"
    args = make_args(world, parallel=parallel, max_tokens_per_micro_batch=BUDGET)
    batches = reference_batches(args, rank, world)
    trainer = start(HFDPOTrainer("policy", args=args), rank, world)
    forwards: list[int] = []
    regroup = trainer._within_budget

    def counted(data: list[dict[str, Any]]) -> list[dict[str, Any]]:
        groups = regroup(data)
        forwards.append(len(groups))
        return groups

    trainer._within_budget = counted  # type: ignore[method-assign]
    losses, norms = [], []
    for step in range(STEPS):
        metrics = trainer.train_step(step_data(batches, step, rank, world), iteration=step)
        losses.append(metrics["loss"])
        norms.append(metrics["grad_norm"])
    evaluated = trainer.eval_step(local_share(batches[0], rank, world))
    trainer.token_budget = None
    evaluated_whole = trainer.eval_step(local_share(batches[0], rank, world))
    return {
        "losses": losses,
        "grad_norms": norms,
        "ref_logps": [b["ref_chosen_logps"].tolist() for b in batches],
        "forwards": forwards,
        "eval": evaluated,
        "eval_whole": evaluated_whole,
    }


def end_worker() -> None:
    """End this rank's process as an actor process ends (chatlearn/actors/worker.py,
    `_hard_exit`: os._exit once the output is flushed): the interpreter's own shutdown, with
    torch.distributed's threads still there, aborted now and then ("terminate called without an
    active exception", exit -6) after every result had been written (1 run in 3 under load)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tmp", required=True)
    parser.add_argument("--runs", default="train,lora,bf16")
    opts = parser.parse_args()
    torch.set_num_threads(1)  # several ranks share two cores
    rank, world, tmp = opts.rank, opts.world_size, Path(opts.tmp)
    if world > 1:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{opts.port}", rank=rank, world_size=world
        )
    runs = {
        "train": lambda: run_train(rank, world, tmp),
        "ddp": lambda: run_ddp(rank, world, tmp),
        "lora": lambda: run_lora(rank, world, tmp),
        "bf16": lambda: run_bf16(rank, world),
        "tied": lambda: run_tied(rank, world),
        "budget": lambda: run_budget(rank, world),
    }
    results = {name: runs[name]() for name in opts.runs.split(",")}
    Path(opts.out).write_text(json.dumps(results))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    end_worker()
