"""One rank of the load-turns error test: `python load_turns_error_worker.py RANK PORT CHECKPOINT
MARK`.

Two ranks on a gloo group over 127.0.0.1 build the sharded reference from CHECKPOINT with
``load_in_turns: true`` (and ``load_once: false``: every rank loads); rank 0's load fails. Rank 1
creates the file MARK when it starts loading; rank 0 prints whether MARK existed when its error came
out of ``setup`` and exits 3.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layout_worker import end_worker, make_args  # noqa: E402
from load_turns_worker import join_group  # noqa: E402

warnings.filterwarnings("ignore")

import torch.distributed as dist  # noqa: E402

import chatlearn.hf.base as modules  # noqa: E402
from chatlearn.hf.modules import HFReference  # noqa: E402


def main() -> None:
    rank, port, checkpoint, mark = int(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4])
    join_group(rank, port)  # a collective the other rank never joins: an error
    load = modules.causal_lm_from_args

    def failing_load(*args: Any, **kwargs: Any) -> Any:
        if rank == 0:
            raise OSError("the checkpoint's weights cannot be read")
        mark.touch()
        return load(*args, **kwargs)

    modules.causal_lm_from_args = failing_load
    args = make_args(2, model_path=checkpoint, parallel="fsdp", load_in_turns=True, load_once=False)
    reference = HFReference("reference", args=args)
    reference._rank, reference._world_size = rank, 2
    try:
        reference.setup()
    except OSError:
        print(f"rank {rank} failed; rank 1 loaded first: {mark.exists()}", flush=True)
        os._exit(3)  # as the worker reports its start-up failure and exits
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    end_worker()
