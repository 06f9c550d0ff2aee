"""One rank of the load-once tests: `python load_once_worker.py RANK PORT CHECKPOINT OUT [CASE]`.

Two ranks on a gloo group over 127.0.0.1 build models from the local checkpoint CHECKPOINT (tied
embeddings, stored in bfloat16, `dtype` unset: loaded as stored), each with ``load_once`` on (the
default) and off, and OUT gets, for each: how many times this rank read the checkpoint's weights,
the reference's store fingerprint and log-probs of the first micro-batch, the trainer's losses of
two steps and its parameters' sums, whether its tied weights are still one tensor, and how many
tensors its optimizer steps. CASE ``mismatch``: rank 1 builds a model with one more layer than the
checkpoint's; OUT gets each rank's error. CASE ``slow``: rank 0 reads the checkpoint for longer
than the group's collective timeout (as a 70B may take longer than runtime.dist_timeout); OUT
gets the sharded reference's log-probs, or the error; ``too_slow``: the same, beyond the time its
setup may take. CASE ``own_network``: a subclass's setup
builds its network without `build_network`; OUT gets each rank's error. CASE ``resize``: a
subclass's setup resizes the token embeddings (mean resizing reads the weights) before
`build_network`; OUT gets each rank's error (rank 0's: its peer left).
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layout_worker import (  # noqa: E402
    GLOBAL_BATCH,
    MICRO_BATCHES,
    end_worker,
    make_args,
    reference_batches,
    start,
    step_data,
    weights_digest,
)
from load_turns_worker import join_group  # noqa: E402

warnings.filterwarnings("ignore")

import torch.distributed as dist  # noqa: E402
import torch.nn.parallel.distributed as ddp_module  # noqa: E402

import chatlearn.hf.model as hf_model  # noqa: E402
from chatlearn.config.errors import ConfigError  # noqa: E402
from chatlearn.hf.modules import HFDPOTrainer  # noqa: E402
from chatlearn.hf.parallel import unwrap  # noqa: E402

READS = {"count": 0}
_load = hf_model.load_causal_lm


def counted_load(*args: Any, **kwargs: Any) -> Any:
    if not kwargs.get("empty"):
        READS["count"] += 1
    return _load(*args, **kwargs)


hf_model.load_causal_lm = counted_load


def build(rank: int, checkpoint: str, parallel: str, load_once: bool) -> dict[str, Any]:
    READS["count"] = 0
    # load_in_turns set where it does nothing: rank 0 says so
    args = make_args(
        2, model_path=checkpoint, parallel=parallel, load_once=load_once, load_in_turns=load_once
    )
    found: dict[str, Any] = {}
    batches = reference_batches(args, rank, 2, steps=2, found=found)
    reference_reads = READS["count"]
    syncs = {"count": 0}  # DDP's broadcasts of the whole model at its construction
    sync = ddp_module._sync_module_states

    def counted_sync(*args: Any, **kwargs: Any) -> Any:
        syncs["count"] += 1
        return sync(*args, **kwargs)

    ddp_module._sync_module_states = counted_sync
    try:
        trainer = start(HFDPOTrainer("policy", args=args), rank, 2)
    finally:
        ddp_module._sync_module_states = sync
    model = trainer.model
    losses = [
        trainer.train_step(step_data(batches, step, rank, 2), iteration=step)["loss"]
        for step in range(2)
    ]
    return {
        "reference_reads": reference_reads,
        "trainer_reads": READS["count"] - reference_reads,
        "ref_logps": batches[0]["ref_chosen_logps"].tolist(),
        "fingerprint": found["fingerprint"],
        "losses": losses,
        "weights": weights_digest(trainer),
        "tied": model.get_output_embeddings().weight is model.get_input_embeddings().weight,
        "optimized": sum(len(g["params"]) for g in trainer.optimizer.param_groups),
        "layout": trainer.layout.describe(),
        "network": type(unwrap(trainer.network)).__name__,
        "ddp_syncs": syncs["count"],
    }


def mismatch(rank: int, checkpoint: str) -> dict[str, Any]:
    if rank == 1:  # this rank's config says one more layer than the checkpoint's
        config_of = hf_model.load_causal_lm

        def deeper(*args: Any, **kwargs: Any) -> Any:
            from transformers import AutoConfig

            original = AutoConfig.from_pretrained

            def more_layers(*a: Any, **k: Any) -> Any:
                config = original(*a, **k)
                config.num_hidden_layers += 1
                return config

            AutoConfig.from_pretrained = more_layers  # type: ignore[method-assign]
            try:
                return config_of(*args, **kwargs)
            finally:
                AutoConfig.from_pretrained = original  # type: ignore[method-assign]

        hf_model.load_causal_lm = deeper
    args = make_args(2, model_path=checkpoint, parallel="fsdp")
    try:
        start(HFDPOTrainer("policy", args=args), rank, 2)
    except ConfigError as error:
        return {"error": str(error)}
    return {"error": None}


SLOW_GROUP_TIMEOUT = 4.0  # seconds; rank 0 reads for twice as long


def slow(rank: int, checkpoint: str, startup_timeout: float = 60.0) -> dict[str, Any]:
    import time

    from layout_worker import first_batch

    from chatlearn.hf.modules import HFReference

    read: dict[str, float] = {}

    def slow_read(*args: Any, **kwargs: Any) -> Any:
        time.sleep(2 * SLOW_GROUP_TIMEOUT)
        read["read_done"] = time.time()  # the two processes' clocks are one host's
        return _load(*args, **kwargs)

    if rank == 0:
        hf_model.load_causal_lm = slow_read
    args = make_args(2, model_path=checkpoint, parallel="fsdp")
    args.runtime_args.startup_timeout = startup_timeout
    try:
        reference = start(HFReference("reference", args=args), rank, 2)
    except RuntimeError as error:
        return {"error": str(error)[:300], "error_at": time.time(), **read}
    return {
        "error": None,
        "logps": reference.forward_step(first_batch())["ref_chosen_logps"].tolist(),
    }


def own_network(rank: int, checkpoint: str) -> dict[str, Any]:
    from chatlearn.algorithms.logps import SequenceLogps
    from chatlearn.hf.modules import HFModule, HFReference

    class OwnNetwork(HFReference):
        def setup(self) -> None:
            HFModule.setup(self)
            self.network = SequenceLogps.from_causal_lm(self.model, check=False)

    args = make_args(2, model_path=checkpoint)
    try:
        start(OwnNetwork("reference", args=args), rank, 2)
    except ConfigError as error:
        return {"error": str(error)}
    return {"error": None}


def resize(rank: int, checkpoint: str) -> dict[str, Any]:
    from chatlearn.hf.modules import HFModule, HFReference

    class NewTokens(HFReference):
        def setup(self) -> None:
            HFModule.setup(self)
            self.model.resize_token_embeddings(len(self.tokenizer) + 2)
            self.model.requires_grad_(False)
            self.network = self.build_network(trainable=False)

    try:
        start(NewTokens("reference", args=make_args(2, model_path=checkpoint)), rank, 2)
    except (ConfigError, RuntimeError) as error:
        return {"error": str(error)}
    return {"error": None}


def main() -> None:
    rank, port, checkpoint, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    case = sys.argv[5] if len(sys.argv) > 5 else "layouts"
    # short where rank 0 reads slowly, or is left alone in a collective once rank 1 stopped
    short = case in ("slow", "too_slow", "resize")
    join_group(rank, port, SLOW_GROUP_TIMEOUT if short else 20)
    logging.basicConfig(level=logging.INFO)  # what rank 0 says, in the output
    assert GLOBAL_BATCH // MICRO_BATCHES >= 2  # each rank has rows of every micro-batch
    if case == "mismatch":
        results: dict[str, Any] = mismatch(rank, checkpoint)
    elif case == "own_network":
        results = own_network(rank, checkpoint)
    elif case == "resize":
        Path(out).write_text(json.dumps(resize(rank, checkpoint)))
        return  # rank 1 stopped in setup, rank 0 in a broadcast: no barrier to meet at
    elif case == "slow":
        results = slow(rank, checkpoint)
    elif case == "too_slow":  # beyond the setup's time (startup_timeout 3 s, no checkpoint time)
        Path(out).write_text(json.dumps(slow(rank, checkpoint, startup_timeout=3.0)))
        return  # rank 1 stopped waiting, rank 0 in a broadcast: no barrier to meet at
    else:
        results = {
            f"{parallel}_{'once' if once else 'every'}": build(rank, checkpoint, parallel, once)
            for parallel in ("fsdp", "ddp")
            for once in (True, False)
        }
    Path(out).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    end_worker()
