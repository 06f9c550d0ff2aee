"""A user program whose module class is defined in the script itself (it runs as `__main__`).

Run as `python user_main_script.py MARKER_FILE`: the `__main__` block appends a line to the marker
file and prints a JSON line with what the actor reported. The actor runs this file under another
module name, so the block below must not run there (the marker file gets exactly one line).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from chatlearn.actors import ActorSystem, BaseModule
from chatlearn.config import Config
from chatlearn.transport import run

MAIN_BLOCK_RAN = False


class ScriptModule(BaseModule):
    def setup(self) -> None:
        self.greeting = "hello from " + __name__

    def where(self) -> dict[str, Any]:
        return {
            "module_name": __name__,
            "class_module": type(self).__module__,
            "actor_pid": os.getpid(),
            "main_block_ran": MAIN_BLOCK_RAN,
            "greeting": self.greeting,
        }


async def drive() -> dict[str, Any]:
    cfg = Config({"models": {"script_model": {"num_cpu": 1}}})
    async with ActorSystem(cfg) as system:
        (group,) = await system.launch(ScriptModule("script_model", cfg))
        return await group.call(0, "where")


if __name__ == "__main__":
    MAIN_BLOCK_RAN = True
    with open(sys.argv[1], "a") as marker:
        marker.write(f"main block ran in pid {os.getpid()}\n")
    result = run(drive())
    print(json.dumps({"coordinator_pid": os.getpid(), **result}), flush=True)
