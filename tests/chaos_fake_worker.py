"""A stand-in for an actor process in the chaos tests: argv ``--label MODEL.REPLICA.RANK`` like a
real worker's, then it sleeps (bounded by ``--seconds``) and exits with its parent."""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--label", required=True)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--tag", default="", help="marks the processes of one test")
    opts = parser.parse_args()
    parent = os.getppid()
    deadline = time.monotonic() + opts.seconds
    while time.monotonic() < deadline and os.getppid() == parent:
        time.sleep(0.05)


if __name__ == "__main__":
    main()
