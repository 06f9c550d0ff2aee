"""`models.<name>.nice` lowers an actor's priority even with autogroup scheduling.

Every actor has its own session, hence its own autogroup when the kernel has them enabled; nice
alone then would not rank it against the other actors, so its autogroup must get the value too.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

_PROBE = """
import os
from chatlearn.actors.core import apply_nice
apply_nice(7)
print(os.getpriority(os.PRIO_PROCESS, 0))
try:
    print(open("/proc/self/autogroup").read().split()[-1])
except OSError:
    print("none")
"""


def test_apply_nice_sets_the_thread_and_its_session_autogroup() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE],
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,  # as spawn_worker does: its own session, its own autogroup
    )
    assert done.returncode == 0, done.stderr
    priority, autogroup = done.stdout.split()
    assert int(priority) == os.getpriority(os.PRIO_PROCESS, 0) + 7
    if autogroup == "none":
        pytest.skip("this kernel has no autogroups")
    assert int(autogroup) == int(priority)
