"""A coordinator script for the restart tests: ``chatlearn launch restart_script.py MODE DIR``.

Every attempt appends ``{"attempt", "pid", "ppid"}`` (attempt: ``CHATLEARN_COORDINATOR_RESTARTS``,
-1 when unset) to DIR/attempts.jsonl, then by MODE:

- ``once``: the first attempt writes DIR/first and SIGKILLs itself; the next writes DIR/second
  and exits 0.
- ``always``: every attempt makes a runtime directory (its path in DIR/runtime-ATTEMPT) and
  SIGKILLs itself.
- ``raise``: raises RuntimeError.
- ``interrupted``: raises what ``DPOEngine.learn()`` raises after a stop on SIGINT.
- ``stopped``: raises what ``DPOEngine.learn_async()`` raises after a stop on SIGINT;
  ``stopped_in_group``: the same in an ExceptionGroup, as a TaskGroup that ran it raises.
- ``keyboard``: raises KeyboardInterrupt.
- ``exit0``: exits 0.
- ``signals``: counts SIGINT/SIGTERM; writes DIR/ready, waits for a first signal (10 s at most),
  then 1 s for more, writes the names it got to DIR/signals.json and exits 128 + the first one.
- ``sleep``: writes DIR/ready and sleeps 30 s.
- ``slow_cleanup``: the same, with an atexit function of 0.5 s (as the runtime's clean-up).
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import sys
import time
from pathlib import Path


def main() -> None:
    mode, directory = sys.argv[1], Path(sys.argv[2])
    attempt = int(os.environ.get("CHATLEARN_COORDINATOR_RESTARTS", "-1"))
    record = {"attempt": attempt, "pid": os.getpid(), "ppid": os.getppid()}
    with open(directory / "attempts.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    if mode == "once":
        if attempt <= 0:
            (directory / "first").write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        (directory / "second").write_text(str(os.getpid()))
    elif mode == "always":
        from chatlearn.transport import RuntimeDir

        # as a coordinator whose actors all run on other hosts: none of them removes it
        runtime = RuntimeDir()  # held: a dropped one removes its directory at once
        (directory / f"runtime-{attempt}").write_text(str(runtime.path))
        os.kill(os.getpid(), signal.SIGKILL)
    elif mode == "raise":
        raise RuntimeError("a bug in the user's script")
    elif mode == "interrupted":
        from chatlearn.engine.interrupts import interrupted

        raise interrupted(signal.SIGINT)
    elif mode in ("stopped", "stopped_in_group"):
        from chatlearn.engine.interrupts import TrainingStopped

        stopped = TrainingStopped(signal.SIGINT)
        if mode == "stopped_in_group":  # what a TaskGroup that ran learn_async() raises
            raise ExceptionGroup("unhandled errors in a TaskGroup", [stopped])
        raise stopped
    elif mode == "keyboard":
        raise KeyboardInterrupt
    elif mode == "signals":
        received: list[int] = []
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda s, _frame: received.append(s))
        (directory / "ready").touch()
        deadline = time.monotonic() + 10
        while not received and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(1.0)  # a duplicate would arrive within this
        names = [signal.Signals(s).name for s in received]
        (directory / "signals.json").write_text(json.dumps(names))
        sys.exit(128 + received[0] if received else 3)
    elif mode == "sleep":
        (directory / "ready").touch()
        time.sleep(30)
    elif mode == "slow_cleanup":
        atexit.register(time.sleep, 0.5)
        (directory / "ready").touch()
        time.sleep(30)
    elif mode != "exit0":
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
