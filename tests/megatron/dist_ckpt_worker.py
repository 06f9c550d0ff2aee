"""One rank of the torch_dist and pipeline tests: `python dist_ckpt_worker.py --rank R ...`.

Started twice by test_megatron_dist_ckpt.py, as the two ranks of a gloo group over 127.0.0.1,
with the HF checkpoint directories the test saved. The same two ranks take several layouts in
turn (TP 2; TP 1 with two data-parallel replicas; PP 2), so a checkpoint written in one layout is
read in the next. For each checkpoint:

- PP 2: the HF checkpoint split into two stages; log-probs through both stages (last stage)
  against the HF model's; the HF state dict gathered back (bit for bit) and saved; a
  MegatronModule at PP 2 starting from `load` and writing `hf_model` in `save_checkpoint`;
- TP 2: the HF checkpoint saved as torch_dist (`save_dist_checkpoint`, HF config recorded);
- TP 1: a MegatronModule starting from that torch_dist checkpoint (architecture from the
  recorded config), saved again as torch_dist, and back to HF;
- TP 2 again and PP 2: loading the TP 1 torch_dist checkpoint.

And a GPTModel built from GPTConfig (no HF config anywhere) saved at TP 2, loaded at TP 1 into a
model built from the same config, and the reverse. Writes what the test checks as JSON to `--out`.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
warnings.filterwarnings("ignore")  # megatron warns at import that Apex/TE are missing

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from convert_worker import (  # noqa: E402
    _identical,
    end_worker,
    gathered_logits,
    next_token_logps,
)

SEED = 3


def layout(tp: int = 1, pp: int = 1) -> None:
    from chatlearn.megatron.parallel import (
        ParallelLayout,
        destroy_parallel_state,
        initialize_parallel_state,
    )

    destroy_parallel_state()
    world = dist.get_world_size()
    initialize_parallel_state(
        ParallelLayout(world, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp),
        seed=SEED,
    )


def logps_of(model: Any, ids: torch.Tensor) -> list[float] | None:
    """Next-token log-probs, vocab shards gathered; None on a pipeline stage that is not last."""
    from megatron.core import parallel_state as mpu

    from chatlearn.megatron.gpt import pipeline_logits

    model.eval()
    with torch.no_grad():
        if mpu.get_pipeline_model_parallel_world_size() > 1:
            assert mpu.get_tensor_model_parallel_world_size() == 1  # no vocab shards to gather
            logits = pipeline_logits(model, ids)
            if logits is None:
                return None
        else:
            logits = gathered_logits(model, ids)
    return next_token_logps(logits, ids).flatten().tolist()


def module(name: str, tmp: Path, model_args: dict[str, Any], pp: int = 1) -> Any:
    """A MegatronModule (the trainer kind) whose setup() loads `load`, on this 2-rank group."""
    from chatlearn.megatron import MegatronModule

    class Policy(MegatronModule):
        def setup(self) -> None:
            self.model = self.load_pretrained_model()

    args = {
        "models": {
            name: {
                "num_cpu": 2,
                "pipeline_model_parallel_size": pp,
                "trainable": True,
                "model_args": model_args,
            }
        },
        "runtime_args": {
            "seed": SEED,
            "train_micro_batch_size": 2,
            "train_global_batch_size": 4,
            "data_checkpoint_path": str(tmp / "checkpoints"),
        },
    }
    policy = Policy(name, args=args)
    policy._rank, policy._world_size = dist.get_rank(), dist.get_world_size()  # as the runtime
    policy.setup()
    return policy


def check_checkpoint(path: Path, tmp: Path) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from chatlearn.megatron.convert import (
        gather_hf_state_dict,
        load_hf_checkpoint,
        load_hf_state_dict,
        save_hf_checkpoint,
    )
    from chatlearn.megatron.dist_ckpt import (
        find_dist_checkpoint,
        load_dist_checkpoint,
        read_common_state,
        save_dist_checkpoint,
    )
    from chatlearn.megatron.parallel import destroy_parallel_state

    name = path.name
    out: dict[str, Any] = {"rank": dist.get_rank()}
    hf_model = AutoModelForCausalLM.from_pretrained(
        str(path), attn_implementation="eager", dtype=torch.float32
    ).eval()
    config = hf_model.config
    ids = torch.randint(0, config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out["hf"] = next_token_logps(hf_model(ids).logits, ids).flatten().tolist()
    original = load_hf_state_dict(path)

    # PP 2: split, forward through both stages, back to HF
    layout(pp=2)
    model, config = load_hf_checkpoint(path)
    out["pp2_layers"] = [layer.layer_number for layer in model.decoder.layers]
    out["pp2_has_embedding"] = model.pre_process
    out["pp2"] = logps_of(model, ids)
    out["pp2_round_trip"] = _identical(original, gather_hf_state_dict(model, config))
    save_hf_checkpoint(model, config, tmp / f"{name}-pp2-hf", source=path)
    del model

    # a MegatronModule at PP 2: load from HF, save_checkpoint writes hf_model
    destroy_parallel_state()
    policy = module("pp_policy", tmp / f"{name}-run", {"load": str(path)}, pp=2)
    out["pp2_module"] = logps_of(policy.model, ids)
    policy.save_checkpoint(7)
    out["hf_model_dir"] = str(policy.checkpoint_dir(7) / "hf_model")
    del policy

    # TP 2: HF -> torch_dist (HF config recorded)
    layout(tp=2)
    model, config = load_hf_checkpoint(path)
    out["tp2"] = logps_of(model, ids)
    root_tp2 = tmp / f"{name}-dist-tp2"
    save_dist_checkpoint(model, root_tp2, iteration=12, hf_config=config)
    out["tp2_dir"] = str(find_dist_checkpoint(root_tp2))
    del model

    # TP 1 (two data-parallel replicas): a module starting from the TP 2 torch_dist checkpoint
    destroy_parallel_state()
    model_args = {"load": str(root_tp2), "save": str(tmp / f"{name}-tp1-hf")}
    policy = module("dist_policy", tmp, model_args)
    out["tp1_from_tp2"] = logps_of(policy.model, ids)
    out["tp1_local_vocab_rows"] = policy.model.embedding.word_embeddings.weight.shape[0]
    out["tp1_round_trip"] = _identical(original, gather_hf_state_dict(policy.model, config))
    policy.save_hf_checkpoint(policy.model)
    root_tp1 = tmp / f"{name}-dist-tp1"
    policy.save_dist_checkpoint(policy.model, root_tp1)
    common = read_common_state(root_tp1)
    out["tp1_common"] = {key: common[key] for key in ("checkpoint_version", "iteration")}
    out["tp1_records_hf_config"] = "chatlearn_hf_config" in common
    del policy

    # TP 2 and PP 2 from the TP 1 torch_dist checkpoint
    layout(tp=2)
    model, _ = load_hf_checkpoint(path)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()  # what is loaded must come from the checkpoint
    load_dist_checkpoint(model, root_tp1)
    out["tp2_from_tp1"] = logps_of(model, ids)
    del model
    layout(pp=2)
    model, _ = load_hf_checkpoint(path)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
    load_dist_checkpoint(model, root_tp1)
    out["pp2_from_tp1"] = logps_of(model, ids)
    destroy_parallel_state()
    return out


def check_gpt_config_model(tmp: Path) -> dict[str, Any]:
    """A GPTModel from GPTConfig (no HF config): TP 2 -> torch_dist -> TP 1, and the reverse."""
    from chatlearn.megatron.dist_ckpt import load_dist_checkpoint, save_dist_checkpoint
    from chatlearn.megatron.gpt import GPTConfig, build_gpt_model
    from chatlearn.megatron.parallel import destroy_parallel_state

    config = GPTConfig(vocab_size=128, num_layers=2, untie_embeddings_and_output_weights=True)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    out: dict[str, Any] = {}
    layout(tp=2)
    torch.manual_seed(11)
    model = build_gpt_model(config)
    out["tp2"] = logps_of(model, ids)
    save_dist_checkpoint(model, tmp / "gpt-tp2")
    layout(tp=1)
    torch.manual_seed(12)  # other initial weights: the loaded ones must replace them
    model = build_gpt_model(config)
    out["tp1_before"] = logps_of(model, ids)
    load_dist_checkpoint(model, tmp / "gpt-tp2")
    out["tp1"] = logps_of(model, ids)
    save_dist_checkpoint(model, tmp / "gpt-tp1")
    layout(tp=2)
    torch.manual_seed(13)
    model = build_gpt_model(config)
    load_dist_checkpoint(model, tmp / "gpt-tp1")
    out["tp2_again"] = logps_of(model, ids)
    # a checkpoint of another architecture says so
    wider = build_gpt_model(GPTConfig(vocab_size=128, num_layers=3))
    try:
        load_dist_checkpoint(wider, tmp / "gpt-tp1")
        out["mismatch_error"] = None
    except ValueError as exc:
        out["mismatch_error"] = str(exc)
    destroy_parallel_state()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tmp", required=True)
    parser.add_argument("checkpoints", nargs="+")
    opts = parser.parse_args()
    torch.set_num_threads(1)  # two ranks share two cores
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{opts.port}",
        rank=opts.rank,
        world_size=opts.world_size,
    )
    tmp = Path(opts.tmp)
    result: dict[str, Any] = {"gpt": check_gpt_config_model(tmp)}
    for checkpoint in map(Path, opts.checkpoints):
        result[checkpoint.name] = check_checkpoint(checkpoint, tmp)
    Path(opts.out).write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    end_worker()
