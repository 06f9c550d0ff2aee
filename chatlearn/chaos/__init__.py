"""`chatlearn chaos -- COMMAND...`: kill random actors of a run and compare it with a clean one.

The harness behind self-healing (issue 15): it runs COMMAND (a chatlearn run, e.g.
``python -m examples.dpo.train_dpo -c examples/dpo/dpo.yaml``) once uninterrupted, then once more
while a :class:`ChaosMonkey` sends SIGKILL or SIGSTOP to random actor processes of the run at
random moments, and then compares the two runs with :func:`compare_runs`: every training
iteration exactly once with the same metrics, and bit-identical final trainer weights. A run that
heals itself correctly passes; one that loses or repeats a step, or drifts, fails and says where.

What it relies on, and nothing more:

- Actors are the processes of the run's tree whose argv holds ``--label MODEL.REPLICA.RANK``
  (``chatlearn.actors.remote`` puts it there; the identity itself travels on stdin).
- The run writes into the directory named by one environment variable (``--output-env``,
  default ``OUTPUT_DIR``, which ``examples/dpo/dpo.yaml`` reads): ``metrics.jsonl`` (records of
  ``"kind": "train"`` carry the iteration as ``"step"``, see ``engine/metrics.py``) and
  ``checkpoints/iter_NNNNNNN/`` with ``MANIFEST.json`` written last (``engine/checkpoint.py``),
  the trainer's files under ``<model>/rank_<r>/`` (``model.pt``, ``optimizer.pt``, ``rng.pt``,
  ..., and ``hf_model/*.safetensors`` for the Hugging Face modules).

The package: `monkey` (the actors of a run, the plan, the monkey's thread), `runs` (running a
command and killing its whole tree), `compare` (the verdict on two runs), `cli` (the command).

Every wait is bounded: the monkey stops at its deadline, a run is killed at ``--timeout``, and a
killed run's whole process tree goes (SIGSTOP to freeze it, then SIGKILL and SIGCONT), stopped
actors included, so nothing is left behind, also on Ctrl-C, SIGTERM or SIGHUP.
"""

from chatlearn.chaos.cli import command
from chatlearn.chaos.compare import Comparison, compare_runs, find_run_dir
from chatlearn.chaos.monkey import (
    Actor,
    ChaosEvent,
    ChaosMonkey,
    ChaosPlan,
    PlanError,
    find_actors,
    parse_label,
)
from chatlearn.chaos.runs import RunResult, kill_tree, run_command

__all__ = [
    "Actor",
    "ChaosEvent",
    "ChaosMonkey",
    "ChaosPlan",
    "Comparison",
    "PlanError",
    "RunResult",
    "command",
    "compare_runs",
    "find_actors",
    "find_run_dir",
    "kill_tree",
    "parse_label",
    "run_command",
]
