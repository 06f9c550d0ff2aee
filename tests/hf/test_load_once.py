"""A model's first rank loads its checkpoint and the others receive it (chatlearn/hf/load_once.py):
two gloo ranks, a sharded (FSDP2) reference and trainer and a DDP trainer, each against every
rank loading."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from test_load_turns import _run_ranks  # noqa: E402


def _tied_bf16_checkpoint(tmp_path: Path) -> Path:
    """The layout tests' tiny model with tied embeddings, saved in bfloat16."""
    import torch
    from layout_worker import TINY

    from chatlearn.hf import byte_tokenizer
    from chatlearn.hf.model import causal_lm_from_args

    tokenizer = byte_tokenizer()
    config = {**TINY, "tie_word_embeddings": True}
    model = causal_lm_from_args({"model_config": config, "seed": 0}, tokenizer)
    checkpoint = tmp_path / "model"
    model.to(torch.bfloat16).save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    return checkpoint


def _run(tmp_path: Path, case: str) -> tuple[list[dict], list[str]]:
    checkpoint = _tied_bf16_checkpoint(tmp_path)
    worker = str(HERE / "load_once_worker.py")
    outputs, codes = _run_ranks(
        [
            [worker, str(rank), "{port}", str(checkpoint), str(tmp_path / f"{rank}.json"), case]
            for rank in range(2)
        ]
    )
    assert codes == [0, 0], "\n".join(outputs)[-4000:]
    return [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)], outputs


@pytest.mark.timeout(240)
def test_only_rank_0_reads_the_checkpoint_and_every_rank_computes_what_it_computes_loading_it(
    tmp_path: Path,
) -> None:
    ranks, outputs = _run(tmp_path, "layouts")
    for parallel in ("fsdp", "ddp"):
        once = [r[f"{parallel}_once"] for r in ranks]
        every = [r[f"{parallel}_every"] for r in ranks]
        # rank 0 read the weights, once for each model; rank 1 never did
        assert [(r["reference_reads"], r["trainer_reads"]) for r in once] == [(1, 1), (0, 0)]
        assert [(r["reference_reads"], r["trainer_reads"]) for r in every] == [(1, 1), (1, 1)]
        for rank in range(2):
            # the same log-probs, losses and weights, bit for bit, as when each rank loads
            assert once[rank]["ref_logps"] == every[rank]["ref_logps"], parallel
            # the reference store finds what the same model wrote loaded by every rank (dtype
            # unset: rank 1's config said dtype None, rank 0's bfloat16, and every entry missed)
            assert once[rank]["fingerprint"] == every[rank]["fingerprint"], parallel
            assert once[rank]["losses"] == every[rank]["losses"], parallel
            assert once[rank]["weights"] == every[rank]["weights"], parallel
            # tied embeddings stay one tensor, stepped once: as many tensors on every rank
            assert once[rank]["tied"] and every[rank]["tied"], parallel
            assert once[rank]["optimized"] == every[rank]["optimized"] == once[0]["optimized"]
    assert "FSDP2 over 2 ranks" in ranks[1]["fsdp_once"]["layout"]
    assert "DDP over 2 ranks" in ranks[1]["ddp_once"]["layout"]
    # DDP's constructor does not broadcast the whole model again where load_once did
    assert [r["ddp_once"]["ddp_syncs"] for r in ranks] == [0, 0]
    assert [r["ddp_every"]["ddp_syncs"] for r in ranks] == [1, 1]
    # rank 0 says what it sent, and that load_in_turns does nothing with load_once (4 models)
    assert outputs[0].count("sent the model") == outputs[0].count("does nothing here") == 4
    assert "does nothing here" not in outputs[1]


@pytest.mark.timeout(180)
def test_a_rank_whose_model_differs_from_rank_0s_stops_with_the_same_error_on_every_rank(
    tmp_path: Path,
) -> None:
    ranks, _ = _run(tmp_path, "mismatch")
    errors = [r["error"] for r in ranks]
    assert all(errors), errors
    assert "load_once" in errors[0] and "load_once: false" in errors[0], errors[0]
    assert "layers.2" in errors[1], errors[1]  # the rank that differs says where


@pytest.mark.timeout(180)
def test_the_other_ranks_wait_for_rank_0s_read_however_long_beyond_the_collective_timeout(
    tmp_path: Path,
) -> None:
    # rank 0 reads the checkpoint for twice the group's collective timeout (a 70B can take longer
    # than runtime.dist_timeout, 600 s): rank 1 failed with gloo's "Timed out waiting 4000ms for
    # recv" (on NCCL its watchdog aborted the process), naming no key; the setup has
    # runtime.startup_timeout for that
    ranks, _ = _run(tmp_path, "slow")
    assert [r["error"] for r in ranks] == [None, None], ranks
    assert ranks[0]["logps"] == ranks[1]["logps"]


@pytest.mark.timeout(180)
def test_the_other_ranks_stop_waiting_for_rank_0_when_the_setups_time_is_up(
    tmp_path: Path,
) -> None:
    # startup_timeout 3 s, and a tiny checkpoint's time to read (ms): rank 0 reads for 8 s
    ranks, _ = _run(tmp_path, "too_slow")
    assert "waited 3 s for rank 0" in (ranks[1]["error"] or ""), ranks
    assert ranks[1]["error_at"] < ranks[0]["read_done"], ranks  # not once rank 0 was done


@pytest.mark.timeout(180)
def test_a_setup_that_builds_its_network_without_build_network_stops_naming_load_once(
    tmp_path: Path,
) -> None:
    # rank 1's model stayed on the meta device (rank 0 sends its weights in build_network):
    # its setup passed, and its first forward failed on a meta tensor, naming nothing to change
    ranks, _ = _run(tmp_path, "own_network")
    errors = [r["error"] for r in ranks]
    assert all(errors), errors
    for error in errors:
        assert "load_once" in error and "build_network" in error, error
    assert "self.model: model.embed_tokens.weight" in errors[1], errors[1]


@pytest.mark.timeout(180)
def test_a_setup_that_reads_the_weights_before_build_network_says_load_once_on_rank_1(
    tmp_path: Path,
) -> None:
    # resize_token_embeddings' mean resizing reads the old rows: on rank 1's model (the meta
    # device until build_network) it failed with "Tensor.item() cannot be called on meta
    # tensors", naming neither load_once nor what to do
    ranks, _ = _run(tmp_path, "resize")
    error = ranks[1]["error"]
    assert error and "load_once" in error and "mean_resizing=False" in error, error
    assert "meta tensors" in error, error  # what failed, in its words
