"""A coordinator that starts two models, reports their pids, then waits to be killed (-9).

Prints one JSON line: {"pids": [...], "runtime_dir": "..."}; one actor is busy in a call.
With ``--slow-setup`` the actors' setup() sleeps instead, so a kill lands during start-up.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import actors_testlib as lib  # noqa: E402

from chatlearn.actors import ActorSystem  # noqa: E402
from chatlearn.transport import run  # noqa: E402


async def main() -> None:
    cfg = lib.make_config({"a": {"num_cpu": 1}, "b": {"num_cpu": 1}})
    system = ActorSystem(cfg)
    if "--slow-setup" in sys.argv:
        await system.launch(lib.SlowSetup("a", cfg), lib.SlowSetup("b", cfg))
        return
    group_a, group_b = await system.launch(lib.Recorder("a", cfg), lib.Recorder("b", cfg))
    busy = asyncio.ensure_future(group_a.call(0, "sleep", 600))
    pids = [h.pid for h in (*group_a, *group_b)]
    print(json.dumps({"pids": pids, "runtime_dir": str(system.runtime_dir.path)}), flush=True)
    await asyncio.sleep(600)
    busy.cancel()


if __name__ == "__main__":
    run(main())
