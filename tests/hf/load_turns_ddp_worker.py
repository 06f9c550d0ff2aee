"""One rank of the load-turns DDP test: `python load_turns_ddp_worker.py RANK PORT CHECKPOINT`.

Two ranks on a gloo group over 127.0.0.1 build the DDP trainer from the local checkpoint CHECKPOINT
with ``load_in_turns: true`` (and ``load_once: false``: every rank loads), its copy taken as handed
over as on CUDA (where `build_model` moves it to the GPU): DDP's constructor is a collective (it
checks the parameters' shapes across ranks and broadcasts rank 0's), which the ranks must all reach.
Exits 0 once both are built.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layout_worker import end_worker, make_args  # noqa: E402
from load_turns_worker import join_group  # noqa: E402

warnings.filterwarnings("ignore")

import torch.distributed as dist  # noqa: E402

from chatlearn.hf.load_turns import LoadTurns  # noqa: E402
from chatlearn.hf.modules import HFDPOTrainer  # noqa: E402


def main() -> None:
    rank, port, checkpoint = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    join_group(rank, port)  # a collective the other rank never joins: an error
    agree = LoadTurns.agree.__func__  # type: ignore[attr-defined]

    def handed_over(cls: Any, *args: Any, **kwargs: Any) -> LoadTurns:
        return agree(cls, *args, **{**kwargs, "hands_over": True})  # as on CUDA

    LoadTurns.agree = classmethod(handed_over)  # type: ignore[method-assign,assignment]
    args = make_args(2, model_path=checkpoint, parallel="ddp", load_in_turns=True, load_once=False)
    policy = HFDPOTrainer("policy", args=args)
    policy._rank, policy._world_size = rank, 2
    policy.setup()
    assert policy._load_turns.plan is not None  # they did take turns
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    end_worker()
