"""ChatLearn's Megatron DPO main file: a reference and a policy on megatron-core GPTModels.

    python examples/megatron/train_dpo.py -c examples/megatron/configs/dpo.yaml

Shaped like ChatLearn's DPO main file (models named `reference` and `ppo_policy`). The
preference data is `--data FILE` (JSONL with prompt / chosen / rejected, e.g. from
examples/dpo/make_data.py) or, without it, min/max pairs made in memory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# `examples.megatron` is imported as a package, as in ChatLearn: run from the repository root or
# let this line find it.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import chatlearn  # noqa: E402
from chatlearn import DPOEngine  # noqa: E402
from examples.megatron.data import load_preference_data, toy_preference_pairs  # noqa: E402
from examples.megatron.models import PolicyReference, PolicyTrainer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="JSONL preference pairs (default: generated min/max pairs)")
    parser.add_argument("--num-samples", type=int, default=512, help="generated pairs")
    opts, _ = parser.parse_known_args()  # chatlearn.init() reads -c/--config itself

    chatlearn.init()
    args = chatlearn.get_args()
    if opts.data:
        try:
            train_prompts = load_preference_data(opts.data)
        except ValueError as exc:  # one line (exit 2), as a config error: it was a traceback
            raise chatlearn.ConfigError(
                " ".join(str(exc).split()),
                key="--data",
                fix="give a JSONL file of {prompt, chosen, rejected} records",
            ) from None
    else:
        train_prompts = toy_preference_pairs(opts.num_samples, seed=args.runtime_args.seed)

    reference_model = PolicyReference("reference")
    ppo_policy_model = PolicyTrainer("ppo_policy")
    engine = DPOEngine(reference_model, ppo_policy_model)
    engine.set_dataset(train_prompts)
    engine.learn()


if __name__ == "__main__":
    main()
