"""A user's DPO training script for the checkpoint tests, run as a subprocess.

    python resume_script.py OUTPUT_DIR PROBE_DIR [GATE_ITERATION]

Trains ``torch_modules.TinyReference``/``TinyTrainer`` for 3 episodes of 8 samples (4 optimizer
steps each: 2 per pass, 2 passes), with a checkpoint after every episode. Run again with the same
OUTPUT_DIR it resumes from the newest complete checkpoint. See ``torch_modules`` for the gate.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from torch_modules import (  # noqa: E402
    TinyDataParallelTrainer,
    TinyOpaqueReference,
    TinyReference,
    TinyShardedReference,
    TinyTrainer,
)

import chatlearn  # noqa: E402
from chatlearn import DPOEngine  # noqa: E402

NUM_SAMPLES = 20  # not a multiple of the episode: episodes wrap into the next shuffled pass


# REFERENCE_SHARDED=1: the reference is one replica of two processes (TinyShardedReference),
# colocated with the trainer on this 2-core machine
SHARDED = os.environ.get("REFERENCE_SHARDED") == "1"
# REFERENCE_OPAQUE=1: the reference's weights are in no attribute (TinyOpaqueReference)
OPAQUE = os.environ.get("REFERENCE_OPAQUE") == "1"
# REFERENCE_REPLICAS=2: two reference replicas of one process each
REPLICAS = int(os.environ.get("REFERENCE_REPLICAS", "1"))
# TRAINER_RANKS=2: the trainer is two data-parallel processes (TinyDataParallelTrainer)
TRAINER_RANKS = int(os.environ.get("TRAINER_RANKS", "1"))


def config(output_dir: str, probe_dir: str, gate: int | None) -> dict:
    reference = {"num_cpu": 2, "cpu_per_process": 1, "zero_size": 2} if SHARDED else {"num_cpu": 1}
    if REPLICAS > 1:
        reference = {"num_cpu": REPLICAS, "cpu_per_process": 1}
    return {
        "models": {
            "reference": reference,
            "policy_trainer": {
                "num_cpu": TRAINER_RANKS,
                "cpu_per_process": 1,
                "trainable": True,
                "model_args": _trainer_args(),
            },
        },
        "runtime": {
            "colocation": [["reference", "policy_trainer"]]
            if SHARDED or TRAINER_RANKS > 1 or REPLICAS > 1
            else [],
            "output_dir": output_dir,
            "num_episode": int(os.environ.get("NUM_EPISODE", "3")),
            "sample_per_episode": int(os.environ.get("SAMPLE_PER_EPISODE", "8")),
            "generation_batch_size": 4,
            "train_micro_batch_size": 2,
            "train_global_batch_size": int(os.environ.get("TRAIN_GLOBAL_BATCH_SIZE", "4")),
            "num_training_epoch": int(os.environ.get("NUM_TRAINING_EPOCH", "2")),
            "data_shuffle": True,
            "save_episode_interval": int(os.environ.get("SAVE_EPISODE_INTERVAL", "1")),
            "save_keep_last": 3,
            "seed": 7,
            "probe_dir": probe_dir,
            "gate_iteration": gate,
            # RESTARTS=0: a lost actor stops the run (the fail-fast tests); else self-healing
            "max_restarts": int(os.environ.get("RESTARTS", "3")),
            "heartbeat_timeout": float(os.environ.get("HEARTBEAT_TIMEOUT", "5")),
            "restart_on_error": os.environ.get("RESTART_ON_ERROR") == "1",
            "fail_iteration": _int_or_none(os.environ.get("FAIL_ITERATION")),
            "save_step_interval": _int_or_none(os.environ.get("SAVE_STEP_INTERVAL")),
            "reference_store": os.environ.get("REFERENCE_STORE") or None,
            "tensorboard": os.environ.get("TENSORBOARD") == "1",
            # the last rank of the sharded reference (forward call) or of the data-parallel
            # trainer (train_step iteration) kills itself there
            "kill_rank_at": _int_or_none(os.environ.get("KILL_RANK_AT")),
            # the trainer kills itself while saving this iteration (once a run)
            "kill_at_save": _int_or_none(os.environ.get("KILL_AT_SAVE")),
            # the trainer's save of this iteration meets a full disk
            "disk_full_at_save": _int_or_none(os.environ.get("DISK_FULL_AT_SAVE")),
            "load_data_checkpoint_iteration": _int_or_none(os.environ.get("LOAD_ITER")),
            "enable_resume_training": os.environ.get("RESUME", "1") == "1",
        },
    }


def _trainer_args() -> dict:
    """TinyTrainer's model size: TRAINER_WIDTH=n, a setting of its own (``width``);
    TRAINER_HIDDEN_SIZE=n, a Hugging Face architecture setting (``model_config.hidden_size``)."""
    args: dict = {}
    if os.environ.get("TRAINER_WIDTH"):
        args["width"] = int(os.environ["TRAINER_WIDTH"])
    if os.environ.get("TRAINER_HIDDEN_SIZE"):
        args["model_config"] = {"hidden_size": int(os.environ["TRAINER_HIDDEN_SIZE"])}
    return args


def _int_or_none(value: str | None) -> int | None:
    return int(value) if value else None


def main() -> None:
    output_dir, probe_dir = sys.argv[1], sys.argv[2]
    gate = int(sys.argv[3]) if len(sys.argv) > 3 else None
    chatlearn.init(config(output_dir, probe_dir, gate))
    reference_class = TinyShardedReference if SHARDED else TinyReference
    reference = (TinyOpaqueReference if OPAQUE else reference_class)("reference")
    trainer = (TinyDataParallelTrainer if TRAINER_RANKS > 1 else TinyTrainer)("policy_trainer")
    engine = DPOEngine(reference, trainer)
    # DATA_OFFSET=n: other rows, as many (another data file)
    engine.set_dataset([s + int(os.environ.get("DATA_OFFSET", "0")) for s in range(NUM_SAMPLES)])
    engine.learn()


if __name__ == "__main__":
    main()
