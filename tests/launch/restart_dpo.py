"""A DPO run whose coordinator dies once: ``chatlearn launch restart_dpo.py OUTPUT_DIR PROBE_DIR``.

Runs tests/engine/resume_script.py (a tiny torch DPO pair, 3 episodes of 4 steps, a checkpoint
after each episode). On the first attempt (``CHATLEARN_COORDINATOR_RESTARTS`` 0 or unset) the
trainer is held at the gate of iteration 5, after the checkpoint of iteration 4, and a thread
SIGKILLs this process once the trainer waits there (60 s at most). A restarted attempt runs
without the gate and resumes from that checkpoint.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))

import resume_script  # noqa: E402

GATE = 5  # the first step of episode 2 that is not done before the kill


def kill_at_gate(probe: Path) -> None:
    deadline = time.monotonic() + 60
    while not (probe / "waiting").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    output_dir, probe_dir = sys.argv[1], sys.argv[2]
    if int(os.environ.get("CHATLEARN_COORDINATOR_RESTARTS", "0")) == 0:
        threading.Thread(target=kill_at_gate, args=(Path(probe_dir),), daemon=True).start()
        sys.argv = [sys.argv[0], output_dir, probe_dir, str(GATE)]
    resume_script.main()


if __name__ == "__main__":
    main()
