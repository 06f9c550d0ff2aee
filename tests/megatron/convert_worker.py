"""One rank of the HF ↔ GPTModel conversion test: `python convert_worker.py --rank R ...`.

Started by test_megatron_convert.py, one process per rank, on a gloo group over 127.0.0.1, with
the HF checkpoint directories the test saved. For each checkpoint, at TP = world size:

- loads it into a GPTModel (`load_hf_checkpoint`) and compares the next-token log-probs (TP
  shards gathered) with the HF model's on the same tokens;
- gathers the GPTModel back to HF names and compares bit for bit with the safetensors file;
- the same round trip with a padded vocabulary (`make_vocab_size_divisible_by`);
- `save_hf_checkpoint` into `--save-dir/<name>-tp<W>` (rank 0 writes; the test reloads it).

Writes what the test checks as JSON to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

warnings.filterwarnings("ignore")  # megatron warns at import that Apex/TE are missing

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

SEED = 3


def next_token_logps(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def gathered_logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state as mpu

    from chatlearn.megatron.gpt import gpt_logits

    logits = gpt_logits(model, ids).contiguous()
    parts = [torch.empty_like(logits) for _ in range(mpu.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, logits, group=mpu.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def check_checkpoint(path: Path, save_to: Path, world_size: int) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from chatlearn.megatron.convert import (
        gather_hf_state_dict,
        load_hf_checkpoint,
        load_hf_state_dict,
        save_hf_checkpoint,
    )
    from chatlearn.megatron.parallel import (
        ParallelLayout,
        destroy_parallel_state,
        initialize_parallel_state,
    )

    layout = ParallelLayout(world_size, tensor_model_parallel_size=world_size)
    initialize_parallel_state(layout, seed=SEED)
    model, config = load_hf_checkpoint(path)
    model.eval()
    ids = torch.randint(0, config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    hf_model = AutoModelForCausalLM.from_pretrained(
        str(path), attn_implementation="eager", dtype=torch.float32
    ).eval()
    with torch.no_grad():
        ours = next_token_logps(gathered_logits(model, ids), ids)
        theirs = next_token_logps(hf_model(ids).logits, ids)
    original = load_hf_state_dict(path)
    back = gather_hf_state_dict(model, config)
    save_hf_checkpoint(model, config, save_to, source=path)
    local_rows = model.embedding.word_embeddings.weight.shape[0]
    destroy_parallel_state()

    # the same round trip through a padded vocabulary (rows a tp-divisible multiple)
    initialize_parallel_state(layout, seed=SEED)
    padded, _ = load_hf_checkpoint(path, make_vocab_size_divisible_by=64)
    padded_rows = padded.embedding.word_embeddings.weight.shape[0] * world_size
    padded_back = gather_hf_state_dict(padded, config)
    destroy_parallel_state()
    module_result = check_module_load(path, save_to.with_name(save_to.name + "-module"), ours, ids)
    return {
        **module_result,
        "max_logp_diff": float((ours - theirs).abs().max()),
        "logp_scale": float(theirs.abs().mean()),
        "local_vocab_rows": local_rows,
        "round_trip_exact": _identical(original, back),
        "padded_vocab_rows": padded_rows,
        "padded_round_trip_exact": _identical(original, padded_back),
    }


def check_module_load(
    path: Path, save_to: Path, expected: torch.Tensor, ids: torch.Tensor
) -> dict[str, Any]:
    """A MegatronModule with `load: <HF dir>` starts from it; `save` gets it back."""
    from chatlearn.megatron import MegatronModule
    from chatlearn.megatron.parallel import destroy_parallel_state

    class Policy(MegatronModule):
        def setup(self) -> None:
            self.model = self.load_pretrained_model()

    world_size = dist.get_world_size()
    args = {
        "models": {
            "policy": {
                "num_cpu": world_size,
                "tensor_model_parallel_size": world_size,
                "trainable": True,
                "model_args": {"load": str(path), "save": str(save_to)},
            }
        },
        "runtime_args": {"seed": SEED, "train_micro_batch_size": 2, "train_global_batch_size": 4},
    }
    policy = Policy("policy", args=args)
    policy.setup()
    with torch.no_grad():
        logps = next_token_logps(gathered_logits(policy.model.eval(), ids), ids)
    policy.save_hf_checkpoint(policy.model)
    destroy_parallel_state()
    return {"module_logps_equal": bool(torch.equal(logps, expected))}


def _identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names that differ (missing, extra, dtype, shape or any bit); empty when identical."""
    names = sorted(set(a) | set(b))
    return [
        n
        for n in names
        if n not in a
        or n not in b
        or a[n].dtype != b[n].dtype
        or a[n].shape != b[n].shape
        or not torch.equal(a[n], b[n])
    ]


def end_worker() -> None:
    """End this rank's process as an actor process ends (chatlearn/actors/worker.py,
    `_hard_exit`: os._exit once the output is flushed): the interpreter's own shutdown, with
    torch.distributed's threads still there, aborted now and then ("terminate called without an
    active exception", exit -6) after every result had been written (1 run in 3 under load)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--save-dir", required=True)
    parser.add_argument("checkpoints", nargs="+")
    opts = parser.parse_args()
    torch.set_num_threads(1)  # several ranks share two cores
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{opts.port}",
        rank=opts.rank,
        world_size=opts.world_size,
    )
    from chatlearn.megatron.compat import apply_cpu_compat

    apply_cpu_compat()
    result = {}
    for checkpoint in map(Path, opts.checkpoints):
        save_to = Path(opts.save_dir) / f"{checkpoint.name}-tp{opts.world_size}"
        result[checkpoint.name] = check_checkpoint(checkpoint, save_to, opts.world_size)
    Path(opts.out).write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    end_worker()
