"""A user's DPO script for the launch tests: ``chatlearn launch ... dpo_script.py OUTPUT_DIR``.

Echo modules (tests/engine/echo_modules.py) for one episode; each actor appends the address it
serves on (its host's) to OUTPUT_DIR/hosts.jsonl, so the test can see where it was placed.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "engine"))

from echo_modules import EchoReference, EchoTrainer  # noqa: E402

import chatlearn  # noqa: E402
from chatlearn import DPOEngine  # noqa: E402
from chatlearn.transport.endpoints import network_host  # noqa: E402


def _proc(pid: int, name: str) -> str:
    with open(f"/proc/{pid}/{name}", "rb") as f:
        return f.read().decode(errors="replace")


def log_host(module) -> None:
    """Where the actor runs, and what of HF_TOKEN it got and shows (the tests set it)."""
    token = os.environ.get("HF_TOKEN", "")
    # The parent is the coordinator itself here (launcher "local" execs into the actor), whose
    # environment is the user's own; its command line and ours must not show the token.
    places = [("self", os.getpid(), "cmdline"), ("self", os.getpid(), "environ")]
    places.append(("parent", os.getppid(), "cmdline"))
    shown = [f"{who} {name}" for who, pid, name in places if token and token in _proc(pid, name)]
    record = {
        "model": module.name,
        "host": network_host(),
        "pid": os.getpid(),
        "hf_token": token,
        "token_shown_in": shown,
    }
    output_dir = os.path.dirname(module.runtime_args.get("echo_log"))  # the test's directory
    with open(os.path.join(output_dir, "hosts.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


class Reference(EchoReference):
    def setup(self) -> None:
        super().setup()
        log_host(self)


class Trainer(EchoTrainer):
    def setup(self) -> None:
        super().setup()
        log_host(self)


def main() -> None:
    output_dir = sys.argv[1]
    chatlearn.init(
        {
            "models": {
                "reference": {"num_cpu": 1},
                "policy_trainer": {"num_cpu": 1, "trainable": True},
            },
            "runtime": {
                "output_dir": output_dir,
                "echo_log": os.path.join(output_dir, "log.jsonl"),
                "num_episode": int(os.environ.get("DPO_SCRIPT_EPISODES", "1")),
                "echo_cost": float(os.environ.get("DPO_SCRIPT_ECHO_COST", "0")),
                "sample_per_episode": 8,
                "generation_batch_size": 4,
                "train_micro_batch_size": 2,
                "train_global_batch_size": 4,
            },
        }
    )
    engine = DPOEngine(Reference("reference"), Trainer("policy_trainer"))
    engine.set_dataset(list(range(8)))
    engine.learn()


if __name__ == "__main__":
    main()
