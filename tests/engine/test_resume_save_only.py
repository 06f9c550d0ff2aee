"""Resume of modules that override only ``save_checkpoint`` (ChatLearn's own modules do).

A first run of ``save_only_script.py`` trains one episode and checkpoints it; a second run with
two episodes resumes from it. A trainer whose override never calls super() resumes at the right
data position with the weights ``setup()`` built (``load_checkpoint`` is not called: the default
would need ``model.pt``). The other cases of the rule (an override calling super(), a module's
own ``load_checkpoint``) are decided by ``resume_loads_checkpoint``, tested in
``tests/actors/test_module_api.py``; the default TorchModule resume in ``test_resume.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from resume_trials import Trial, stop  # noqa: E402

pytestmark = pytest.mark.timeout(90)

SCRIPT = Path(__file__).resolve().parent / "save_only_script.py"


def _run(trial: Trial, num_episode: int, kind: str) -> str:
    args = [sys.executable, str(SCRIPT), str(trial.output), str(trial.probe), str(num_episode)]
    proc = subprocess.Popen(
        [*args, kind], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )
    try:
        out, _ = proc.communicate(timeout=60)
    finally:
        stop(proc)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text
    return text


def test_rerun_resumes_a_module_overriding_only_save_checkpoint(tmp_path: Path):
    trial = Trial(tmp_path)
    _run(trial, 1, "save_only")
    saved = trial.checkpoints / "iter_0000004" / "policy_trainer" / "rank_0"
    assert json.loads((saved / "state.json").read_text()) == {"iteration": 4}
    assert not (saved / "model.pt").exists()

    second = _run(trial, 2, "save_only")
    first, resumed = trial.events("weights")
    assert (first["iteration"], resumed["iteration"]) == (0, 4)  # the second episode's data
    assert trial.events("first_step")[-1]["resume"] is True
    assert trial.state("iter_0000008").consumed_samples == 16
    assert trial.complete() == [4, 8]
    assert "policy_trainer: no load_checkpoint of its own" in second
    assert resumed["total"] == first["total"]  # setup()'s weights: nothing was loaded


def test_a_module_that_loads_its_checkpoint_in_setup_resumes_with_its_weights(tmp_path: Path):
    # ChatLearn sets resume_training, the episode and the iteration before setup(), and its
    # trainers load their own checkpoint there: a resume must give them those counters in
    # setup(), or they start again from fresh weights with nothing said
    trial = Trial(tmp_path)
    _run(trial, 1, "loads_in_setup")
    saved = trial.checkpoints / "iter_0000004" / "policy_trainer" / "rank_0" / "weights.pt"
    total = float(sum(t.sum() for t in torch.load(saved, weights_only=True).values()))
    _run(trial, 2, "loads_in_setup")
    fresh, resumed = trial.events("setup_state")
    assert (fresh["resume_training"], fresh["episode_id"], fresh["train_iteration"]) == (
        False,
        0,
        0,
    )
    assert (resumed["resume_training"], resumed["episode_id"], resumed["train_iteration"]) == (
        True,
        1,
        4,
    )
    # as ChatLearn's data checkpoint sets runtime_args.consumed_samples: one episode of 8
    assert (fresh["consumed_samples"], resumed["consumed_samples"]) == (0, 8)
    # and the reference's forward calls: one episode of 8 samples in chunks of 4
    assert [r["iteration"] for r in trial.events("reference_setup")] == [0, 2]
    first, after_resume = trial.events("weights")
    assert after_resume["iteration"] == 4
    assert after_resume["total"] == pytest.approx(total, abs=0, rel=0)  # the saved weights
    assert after_resume["total"] != first["total"]
    assert trial.complete() == [4, 8]
