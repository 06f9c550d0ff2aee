"""HF Llama / Qwen2 checkpoints → GPTModel at TP 1 and TP 2 give HF's log-probs; and back, exactly.

The checkpoints are built here from small configs (nothing downloaded) with every weight
randomized (so norms, biases and both embeddings matter) and saved with `save_pretrained`. One
TP=1 process and a 2-rank gloo group run convert_worker.py together, once for this module.
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

WORKER = Path(__file__).with_name("convert_worker.py")
RUN_TIMEOUT = 240.0
TOLERANCE = 1e-5
CHECKPOINTS = {name: (lambda name=name: hf_configs()[name]) for name in ("llama", "qwen2")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("convert")
    checkpoints = [tmp / name for name in CHECKPOINTS]
    for path in checkpoints:
        save_random_checkpoint(path.name, path)
    jobs = [("tp1", 0, 1), ("pair0", 0, 2), ("pair1", 1, 2)]
    args = ["--save-dir", str(tmp / "saved"), *map(str, checkpoints)]
    run_ranks(WORKER, jobs, args, tmp, RUN_TIMEOUT)
    results = {name: json.loads((tmp / f"{name}.json").read_text()) for name, _, _ in jobs}
    return {"results": results, "tmp": tmp}


@pytest.mark.parametrize("arch", list(CHECKPOINTS))
@pytest.mark.parametrize("rank", ["tp1", "pair0", "pair1"])
def test_gpt_log_probs_equal_hf(runs: dict[str, Any], arch: str, rank: str) -> None:
    result = runs["results"][rank][arch]
    assert result["logp_scale"] > 1.0  # real log-probs, not a degenerate near-uniform model
    assert result["max_logp_diff"] < TOLERANCE


@pytest.mark.parametrize("arch", list(CHECKPOINTS))
@pytest.mark.parametrize("rank", ["tp1", "pair0", "pair1"])
def test_megatron_module_starts_from_load_and_saves(
    runs: dict[str, Any], arch: str, rank: str
) -> None:
    assert runs["results"][rank][arch]["module_logps_equal"] is True
    tp = 1 if rank == "tp1" else 2
    saved = runs["tmp"] / "saved" / f"{arch}-tp{tp}-module"
    _assert_same_checkpoint(saved, runs["tmp"] / arch)


@pytest.mark.parametrize("arch", list(CHECKPOINTS))
def test_vocab_is_split_over_tensor_parallel_ranks(runs: dict[str, Any], arch: str) -> None:
    vocab = CHECKPOINTS[arch]().vocab_size
    results = runs["results"]
    assert results["tp1"][arch]["local_vocab_rows"] == vocab
    assert results["pair0"][arch]["local_vocab_rows"] == vocab // 2
    assert results["pair1"][arch]["padded_vocab_rows"] == -(-vocab // 128) * 128


@pytest.mark.parametrize("arch", list(CHECKPOINTS))
@pytest.mark.parametrize("rank", ["tp1", "pair0", "pair1"])
def test_round_trip_to_hf_is_bit_identical(runs: dict[str, Any], arch: str, rank: str) -> None:
    result = runs["results"][rank][arch]
    assert result["round_trip_exact"] == []
    assert result["padded_round_trip_exact"] == []


@pytest.mark.parametrize("arch", list(CHECKPOINTS))
@pytest.mark.parametrize("tp", [1, 2])
def test_saved_hf_directory_equals_the_original(runs: dict[str, Any], arch: str, tp: int) -> None:
    saved = runs["tmp"] / "saved" / f"{arch}-tp{tp}"
    _assert_same_checkpoint(saved, runs["tmp"] / arch)
    assert (saved / "generation_config.json").is_file()  # side files are copied along


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


def test_unsupported_checkpoints_say_why(tmp_path: Path) -> None:
    from chatlearn.megatron.convert import HFConversionError, load_hf_config, load_hf_state_dict

    transformers.GPT2Config(n_layer=1).save_pretrained(str(tmp_path))
    with pytest.raises(HFConversionError, match="model_type 'gpt2' is not supported"):
        load_hf_config(tmp_path)
    with pytest.raises(HFConversionError, match=r"no \*\.safetensors"):
        load_hf_state_dict(tmp_path)
    scaled = CHECKPOINTS["llama"]()
    scaled.rope_parameters = {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}
    scaled.save_pretrained(str(tmp_path))
    with pytest.raises(HFConversionError, match="rope scaling 'linear'"):
        load_hf_config(tmp_path)
