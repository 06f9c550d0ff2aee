"""A stand-in for a chatlearn run in the chaos tests: one fake actor (chaos_fake_worker.py) per
label given, then it waits, bounded by ``--seconds``; with ``--respawn`` it restarts an actor
that died under the same label (as self-healing would). It kills its actors when it ends."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path

WORKER = str(Path(__file__).with_name("chaos_fake_worker.py"))


def spawn(label: str, opts: argparse.Namespace) -> subprocess.Popen[bytes]:
    argv = [sys.executable, WORKER, "--label", label, "--seconds", str(opts.seconds)]
    return subprocess.Popen([*argv, "--tag", opts.tag])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("labels", nargs="*")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--respawn", action="store_true")
    parser.add_argument("--tag", default="")
    opts = parser.parse_args()
    children = {label: spawn(label, opts) for label in opts.labels}
    deadline = time.monotonic() + opts.seconds
    try:
        while time.monotonic() < deadline:
            for label, child in list(children.items()):
                if child.poll() is not None and opts.respawn:
                    children[label] = spawn(label, opts)
            if not opts.respawn and all(c.poll() is not None for c in children.values()):
                break
            time.sleep(0.02)
    finally:
        for child in children.values():
            for sig in (signal.SIGKILL, signal.SIGCONT):
                if child.poll() is None:
                    child.send_signal(sig)
            child.wait(timeout=5)


if __name__ == "__main__":
    main()
