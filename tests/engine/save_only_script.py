"""A ChatLearn-style script whose trainer overrides only ``save_checkpoint``, run as a subprocess.

    python save_only_script.py OUTPUT_DIR PROBE_DIR NUM_EPISODE {save_only,calls_super}

``save_only``: the trainer writes its own ``state.json`` and never calls super(), as ChatLearn's
modules do; a resume must restore the data position without calling ``load_checkpoint``.
``calls_super``: the override calls super() first, so ``TorchModule``'s files are there and a
resume loads them. Both probe ``first_step`` with the weights' sum, to tell which happened.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from resume_script import NUM_SAMPLES, config  # noqa: E402
from torch_modules import TinyReference, TinyTrainer  # noqa: E402

import chatlearn  # noqa: E402
from chatlearn import DPOEngine  # noqa: E402


class _Trainer(TinyTrainer):
    def train_step(self, data, iteration):
        if not self._stepped:
            total = float(sum(p.detach().sum() for p in self.model.parameters()))
            self.probe(event="weights", iteration=iteration, total=total)
        return super().train_step(data, iteration)

    def _write_state(self, iteration: int) -> None:
        directory = self.checkpoint_dir(iteration)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "state.json").write_text(json.dumps({"iteration": iteration}))


class SaveOnlyTrainer(_Trainer):
    def save_checkpoint(self, iteration):
        self._write_state(iteration)


class CallsSuperTrainer(_Trainer):
    def save_checkpoint(self, iteration):
        super().save_checkpoint(iteration)
        self._write_state(iteration)


TRAINERS = {"save_only": SaveOnlyTrainer, "calls_super": CallsSuperTrainer}


def main() -> None:
    output_dir, probe_dir, num_episode, kind = sys.argv[1:5]
    settings = config(output_dir, probe_dir, None)
    settings["runtime"]["num_episode"] = int(num_episode)
    chatlearn.init(settings)
    engine = DPOEngine(TinyReference("reference"), TRAINERS[kind]("policy_trainer"))
    engine.set_dataset(list(range(NUM_SAMPLES)))
    engine.learn()


if __name__ == "__main__":
    main()
