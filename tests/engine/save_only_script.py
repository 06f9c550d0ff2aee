"""A ChatLearn-style script whose trainer overrides only ``save_checkpoint``, run as a subprocess.

    python save_only_script.py OUTPUT_DIR PROBE_DIR NUM_EPISODE {save_only,calls_super,...}

``save_only``: the trainer writes its own ``state.json`` and never calls super(), as ChatLearn's
modules do; a resume must restore the data position without calling ``load_checkpoint``.
``calls_super``: the override calls super() first, so ``TorchModule``'s files are there and a
resume loads them. ``loads_in_setup``: ChatLearn's trainers' way, weights saved by the override
and loaded back by ``setup()`` when ``resume_training`` is set (before ``setup()``, as ChatLearn
sets it). All probe ``weights`` with the weights' sum at the first step, to tell what happened.
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from resume_script import NUM_SAMPLES, config  # noqa: E402
from torch_modules import TinyReference, TinyTrainer  # noqa: E402

import chatlearn  # noqa: E402
from chatlearn import DPOEngine  # noqa: E402


class _Reference(TinyReference):
    def setup(self):
        super().setup()
        # ChatLearn sets a resumed reference's forward-call counter before setup()
        self.probe(event="reference_setup", iteration=self._iteration)


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


class LoadsInSetupTrainer(_Trainer):
    """ChatLearn's own trainers' way: save the weights in ``save_checkpoint`` (no super()), and
    load them back in ``setup()`` when ``resume_training`` says the run resumes."""

    def setup(self):
        super().setup()
        state = {
            "resume_training": self.resume_training,
            "episode_id": self._episode_id,
            "consumed_samples": self.runtime_args.consumed_samples,
        }
        self.probe(event="setup_state", train_iteration=self._train_iteration, **state)
        if self.resume_training:
            weights = self.checkpoint_dir() / "weights.pt"  # the checkpoint it resumes from
            self.model.load_state_dict(torch.load(weights, weights_only=True))

    def save_checkpoint(self, iteration):
        self._write_state(iteration)
        torch.save(self.model.state_dict(), self.checkpoint_dir(iteration) / "weights.pt")


TRAINERS = {
    "save_only": SaveOnlyTrainer,
    "calls_super": CallsSuperTrainer,
    "loads_in_setup": LoadsInSetupTrainer,
}


def main() -> None:
    output_dir, probe_dir, num_episode, kind = sys.argv[1:5]
    settings = config(output_dir, probe_dir, None)
    settings["runtime"]["num_episode"] = int(num_episode)
    chatlearn.init(settings)
    engine = DPOEngine(_Reference("reference"), TRAINERS[kind]("policy_trainer"))
    engine.set_dataset(list(range(NUM_SAMPLES)))
    engine.learn()


if __name__ == "__main__":
    main()
