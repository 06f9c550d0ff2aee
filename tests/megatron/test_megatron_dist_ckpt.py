"""Megatron torch_dist checkpoints across TP sizes; HF checkpoints split over two pipeline stages.

One 2-rank gloo group runs dist_ckpt_worker.py once for this module, taking the layouts TP 2,
TP 1 (two data-parallel replicas) and PP 2 in turn, on a small Llama (untied head) and a small
Qwen2 (tied embeddings, q/k/v bias) built from config with random weights (nothing downloaded).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from chatlearn.megatron.requirement import megatron_available

pytestmark = [
    pytest.mark.skipif(
        not megatron_available(),
        reason="megatron-core is not installed (pip install 'chatlearn[megatron]')",
    ),
    pytest.mark.timeout(300),
]

transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gloo_ranks import hf_configs, run_ranks, save_random_checkpoint  # noqa: E402

WORKER = Path(__file__).with_name("dist_ckpt_worker.py")
RUN_TIMEOUT = 240.0
TOLERANCE = 1e-5
ARCHS = ["llama", "qwen2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("dist_ckpt")
    checkpoints = [tmp / name for name in ARCHS]
    for path in checkpoints:
        save_random_checkpoint(path.name, path)
    jobs = [("rank0", 0, 2), ("rank1", 1, 2)]
    run_ranks(WORKER, jobs, ["--tmp", str(tmp), *map(str, checkpoints)], tmp, RUN_TIMEOUT)
    results = [json.loads((tmp / f"{name}.json").read_text()) for name, _, _ in jobs]
    return {"ranks": results, "tmp": tmp}


def _worst(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) > 0
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def _assert_same_checkpoint(saved: Path, source: Path) -> None:
    from chatlearn.megatron.convert import load_hf_state_dict

    original = load_hf_state_dict(source)
    again = load_hf_state_dict(saved)
    assert sorted(again) == sorted(original)
    assert all(torch.equal(again[name], original[name]) for name in original)
    configs = [transformers.AutoConfig.from_pretrained(str(d)).to_dict() for d in (saved, source)]
    for config in configs:
        config.pop("_name_or_path")
    assert configs[0] == configs[1]


@pytest.mark.parametrize("arch", ARCHS)
def test_pipeline_split_gives_hf_log_probs(runs: dict[str, Any], arch: str) -> None:
    first, last = (rank[arch] for rank in runs["ranks"])
    # stage 0 holds the embedding and layer 1, stage 1 layer 2 and the head
    assert (first["pp2_layers"], last["pp2_layers"]) == ([1], [2])
    assert (first["pp2_has_embedding"], last["pp2_has_embedding"]) == (True, False)
    assert first["pp2"] is None  # only the last stage has logits
    assert _worst(last["pp2"], last["hf"]) < TOLERANCE
    assert sum(abs(x) for x in last["hf"]) / len(last["hf"]) > 1.0  # not a near-uniform model
    assert _worst(last["pp2_module"], last["hf"]) < TOLERANCE


@pytest.mark.parametrize("arch", ARCHS)
def test_pipeline_split_round_trips_to_hf_exactly(runs: dict[str, Any], arch: str) -> None:
    for rank in runs["ranks"]:
        assert rank[arch]["pp2_round_trip"] == []  # every stage gets every tensor, bit for bit
    _assert_same_checkpoint(runs["tmp"] / f"{arch}-pp2-hf", runs["tmp"] / arch)


@pytest.mark.parametrize("arch", ARCHS)
def test_megatron_module_save_checkpoint_writes_hf_model(runs: dict[str, Any], arch: str) -> None:
    written = Path(runs["ranks"][0][arch]["hf_model_dir"])
    assert written.parent.name == "rank_0"
    _assert_same_checkpoint(written, runs["tmp"] / arch)
    assert not Path(runs["ranks"][1][arch]["hf_model_dir"]).exists()  # rank 1 does not write


@pytest.mark.parametrize("arch", ARCHS)
def test_torch_dist_across_tensor_parallel_sizes(runs: dict[str, Any], arch: str) -> None:
    for rank in runs["ranks"]:
        result = rank[arch]
        assert _worst(result["tp2"], result["hf"]) < TOLERANCE
        # saved at TP 2, read at TP 1 by a module that rebuilt the model from the recorded config
        assert _worst(result["tp1_from_tp2"], result["tp2"]) < TOLERANCE
        assert result["tp1_local_vocab_rows"] == hf_configs()[arch].vocab_size  # really TP 1
        assert result["tp1_round_trip"] == []
        # saved at TP 1, read at TP 2 and at PP 2
        assert _worst(result["tp2_from_tp1"], result["tp1_from_tp2"]) < TOLERANCE
    last = runs["ranks"][1][arch]
    assert _worst(last["pp2_from_tp1"], last["hf"]) < TOLERANCE


@pytest.mark.parametrize("arch", ARCHS)
def test_torch_dist_layout_is_megatron_lms(runs: dict[str, Any], arch: str) -> None:
    tmp = runs["tmp"]
    tp2_dir = Path(runs["ranks"][0][arch]["tp2_dir"])
    assert tp2_dir == tmp / f"{arch}-dist-tp2" / "iter_0000012"
    assert (tmp / f"{arch}-dist-tp2" / "latest_checkpointed_iteration.txt").read_text() == "12"
    metadata = json.loads((tp2_dir / "metadata.json").read_text())
    assert metadata["sharded_backend"] == "torch_dist"
    assert sorted(p.name for p in tp2_dir.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    release = tmp / f"{arch}-dist-tp1"
    assert (release / "latest_checkpointed_iteration.txt").read_text() == "release"
    assert runs["ranks"][0][arch]["tp1_common"] == {"checkpoint_version": 3.0, "iteration": 0}
    assert runs["ranks"][0][arch]["tp1_records_hf_config"] is True
    # the module saved at TP 1 from a torch_dist start goes back to HF exactly
    _assert_same_checkpoint(tmp / f"{arch}-tp1-hf", tmp / arch)


def test_gpt_config_model_torch_dist_tp2_to_tp1_and_back(runs: dict[str, Any]) -> None:
    for rank in runs["ranks"]:
        gpt = rank["gpt"]
        assert _worst(gpt["tp1_before"], gpt["tp2"]) > 1e-3  # other weights before the load
        assert _worst(gpt["tp1"], gpt["tp2"]) < TOLERANCE
        assert _worst(gpt["tp2_again"], gpt["tp2"]) < TOLERANCE
        assert "does the model config match" in gpt["mismatch_error"]


def test_paths_that_are_not_torch_dist_say_why(tmp_path: Path) -> None:
    from chatlearn.megatron.dist_ckpt import DistCheckpointError, find_dist_checkpoint

    with pytest.raises(DistCheckpointError, match="not a Megatron torch_dist checkpoint"):
        find_dist_checkpoint(tmp_path)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("5")
    with pytest.raises(DistCheckpointError, match="names iter_0000005, which is not"):
        find_dist_checkpoint(tmp_path)
    (tmp_path / "iter_0000005").mkdir()
    (tmp_path / "iter_0000005" / "metadata.json").write_text('{"sharded_backend": "zarr"}')
    with pytest.raises(DistCheckpointError, match="names iter_0000005"):
        find_dist_checkpoint(tmp_path)
    with pytest.raises(DistCheckpointError, match="only torch_dist is supported"):
        find_dist_checkpoint(tmp_path / "iter_0000005")
