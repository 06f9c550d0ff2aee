"""A custom flow: start models as processes, call any method on any replica, stream, stop.

    python -m examples.custom_flow.flow

This is what the DPO engine does underneath, written by hand: two "scorer" replicas (each its own
pinned process) score texts, outputs stream back in input order while later inputs are still being
computed, and a per-replica call shows which process did what. Any asyncio program can do this;
``await engine.learn_async()`` likewise runs DPO training inside a loop you already have.
"""

from __future__ import annotations

import os

import chatlearn
from chatlearn import Engine
from chatlearn.actors import BaseModule
from chatlearn.engine.engine import stream


class Scorer(BaseModule):
    """Scores a text by its vowel fraction (a stand-in for a reward model)."""

    def setup(self) -> None:
        self.calls = 0

    def score(self, text: str) -> dict:
        self.calls += 1
        vowels = sum(ch in "aeiou" for ch in text.lower())
        return {"text": text, "score": vowels / max(1, len(text)), "pid": os.getpid()}

    def stats(self) -> dict:
        return {"replica": self.replica_id, "calls": self.calls, "pid": os.getpid()}


async def main() -> None:
    # two single-core replicas; on a CPU-only host a "device" is a core
    chatlearn.init({"models": {"scorer": {"num_cpu": 2, "cpu_per_process": 1}}})
    async with Engine(Scorer("scorer")) as engine:  # start() ... stop(), even on errors
        scorer = engine.group("scorer")
        texts = ["chatlearn", "direct preference optimization", "zeromq", "asyncio", "torch"]
        async for result in stream(scorer, "score", texts, max_inflight=2):
            print(f"{result['score']:.2f}  {result['text']!r}  (pid {result['pid']})")
        for stats in await scorer.call_all("stats"):
            print(f"replica {stats['replica']} (pid {stats['pid']}) served {stats['calls']} calls")


if __name__ == "__main__":
    from chatlearn.transport import run

    run(main())
