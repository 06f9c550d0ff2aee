"""A stand-in for a training run in the chaos CLI tests: writes ``$OUTPUT_DIR/run/metrics.jsonl``
(train records of iterations 1..4) and a complete checkpoint of iteration 4 with
``policy_trainer/rank_0/model.pt``, the same in every run; ``--noise`` makes iteration 3's loss
differ from run to run (by the process id); ``--linger S`` makes it wait S seconds before it
ends (a run whose actors are elsewhere: the monkey finds none in its tree)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from chatlearn.engine.checkpoint import CheckpointManager, CoordinatorState


def main() -> None:
    run = Path(os.environ["OUTPUT_DIR"]) / "run"
    run.mkdir(parents=True)
    with (run / "metrics.jsonl").open("w") as f:
        for step in range(1, 5):
            loss = 1.0 / (step + 2)
            if step == 3 and "--noise" in sys.argv:
                loss += os.getpid() * 1e-9
            record = {"kind": "train", "step": step, "time": time.time(), "loss": loss}
            f.write(json.dumps(record) + "\n")
    manager = CheckpointManager(run / "checkpoints")
    staging = manager.begin(4)
    (staging / "policy_trainer" / "rank_0").mkdir(parents=True)
    weights = {"layer.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3) / 7}
    torch.save(weights, staging / "policy_trainer" / "rank_0" / "model.pt")
    state = CoordinatorState(
        iteration=4,
        episode=1,
        step_in_episode=0,
        consumed_samples=16,
        sampler={},
        training={},
        trainer={},
    )
    manager.commit(staging, state)
    if "--linger" in sys.argv:
        time.sleep(float(sys.argv[sys.argv.index("--linger") + 1]))


if __name__ == "__main__":
    main()
