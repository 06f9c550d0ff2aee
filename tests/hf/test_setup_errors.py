"""Settings the HF modules cannot use stop their setup() with a one-line ConfigError naming the
key, its file:line and what to change — not a 70-110 line traceback from the layout, the
packing options, peft or transformers (each failed in an actor with exit 1)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import chatlearn
from chatlearn.config import ConfigError, reset_args

TINY_LLAMA = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 64,
    "vocab_size": 260,
}
TINY = "model_config: {hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1}\n"


@pytest.fixture(autouse=True)
def _clean_global_config() -> Iterator[None]:
    reset_args()
    yield
    reset_args()


def setup_error(tmp_path: Path, model_yaml: str, *, trainer: bool = False) -> ConfigError:
    """The ConfigError of the reference's (or the trainer's) setup() with these model args."""
    from chatlearn.hf.modules import HFDPOTrainer, HFReference

    (tmp_path / "model.yaml").write_text(model_yaml)
    (tmp_path / "cfg.yaml").write_text(
        "runtime: {num_episode: 1, sample_per_episode: 16}\n"
        "models:\n"
        "  reference: {num_cpu: 1, model_config_file: model.yaml}\n"
        "  policy: {num_cpu: 1, trainable: true, model_config_file: model.yaml}\n"
    )
    config = chatlearn.init(str(tmp_path / "cfg.yaml"))
    module = (
        HFDPOTrainer("policy", args=config) if trainer else HFReference("reference", args=config)
    )
    with pytest.raises(ConfigError) as info:
        module.setup()
    error = info.value
    _, fix = str(error).split("\n")  # where: key: problem, then the fix
    assert fix.startswith("  fix: ") and error.fix, str(error)
    return error


def assert_located(error: ConfigError, tmp_path: Path, key: str, line: int, name: str) -> None:
    assert error.key == f"models.{name}.model_args.{key}", str(error)
    assert error.where == f"{tmp_path / 'model.yaml'}:{line}", str(error)


def save_checkpoint(directory: Path, config: object, *, tokenizer: object | None = None) -> str:
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)  # type: ignore[attr-defined]
    return str(directory)


def test_fp16_on_cpu(tmp_path: Path) -> None:
    error = setup_error(tmp_path, TINY + "mixed_precision: fp16\n")
    assert_located(error, tmp_path, "mixed_precision", 2, "reference")
    assert "needs CUDA" in error.problem and "bf16" in (error.fix or "")


def test_no_parallel_wrapper_on_two_trainer_ranks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from chatlearn.actors.module import TorchModule

    # two data-parallel ranks of the trainer, as in an actor of a 2-process group
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(TorchModule, "data_parallel_size", property(lambda self: 2))
    error = setup_error(tmp_path, TINY + "parallel: none\n", trainer=True)
    assert_located(error, tmp_path, "parallel", 2, "policy")
    assert "cannot train on 2 ranks" in error.problem and "ddp" in (error.fix or "")
