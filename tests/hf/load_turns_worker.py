"""One rank of the load-turns test: `python load_turns_worker.py RANK PORT CHECKPOINT OUT`.

Two ranks on a gloo group over 127.0.0.1 build the sharded reference (FSDP2) from the local
checkpoint CHECKPOINT twice: with ``load_in_turns: true`` (and ``load_once: false``: every rank
loads), then false. For each, OUT gets when this rank's load started and when its copy was handed
over (sharded), and its log-probs of the first micro-batch.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layout_worker import end_worker, first_batch, make_args  # noqa: E402

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import chatlearn.hf.base as modules  # noqa: E402
from chatlearn.hf.modules import HFReference  # noqa: E402


def build(rank: int, checkpoint: str, turns: bool) -> dict[str, Any]:
    times: dict[str, float] = {}
    load, done = modules.causal_lm_from_args, modules.LoadTurns.done

    def timed_load(*args: Any, **kwargs: Any) -> Any:
        times["load"] = time.time()
        return load(*args, **kwargs)

    def timed_done(self: Any) -> None:
        times.setdefault("handed_over", time.time())
        done(self)

    modules.causal_lm_from_args = timed_load
    modules.LoadTurns.done = timed_done  # type: ignore[method-assign]
    try:
        args = make_args(
            2, model_path=checkpoint, parallel="fsdp", load_in_turns=turns, load_once=False
        )
        reference = HFReference("reference", args=args)
        reference._rank, reference._world_size = rank, 2
        reference.setup()
    finally:
        modules.causal_lm_from_args, modules.LoadTurns.done = load, done  # type: ignore[method-assign]
    output = reference.forward_step(first_batch())
    return {**times, "logps": output["ref_chosen_logps"].tolist()}


def join_group(rank: int, port: str, timeout: float = 20) -> None:
    """This rank of the 2-rank gloo group over 127.0.0.1 (one thread: two ranks share two cores);
    a collective the other rank never joins is an error after `timeout` seconds."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=timedelta(seconds=timeout),
    )


def main() -> None:
    rank, port, checkpoint, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    join_group(rank, port)
    results = {"turns": build(rank, checkpoint, True), "together": build(rank, checkpoint, False)}
    Path(out).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    end_worker()
