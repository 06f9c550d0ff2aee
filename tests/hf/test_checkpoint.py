"""Checkpoints of the HF trainer (``chatlearn.hf.checkpoint``): what a failed sharded save or load
raises; when an HF export holds a model's whole state, and reading it back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def _model_and_optimizer(*names: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({name: torch.nn.Linear(4, 4) for name in names})
    optimizer = torch.optim.AdamW(model.parameters())
    for layer in model.values():
        layer(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_a_sharded_checkpoint_that_does_not_fit_fails_as_an_exception(tmp_path: Path) -> None:
    # torch's CheckpointException is a BaseException: the actor took it for a fatal error of its
    # own (a LoRA trainer resumed with other target_modules under parallel: fsdp was restarted
    # max_restarts times, then stopped with an 800-line log instead of one line naming the key)
    from chatlearn.hf.checkpoint import load_sharded, save_sharded

    save_sharded(tmp_path / "sharded", *_model_and_optimizer("a"))
    loaded, optimizer = _model_and_optimizer("a")
    load_sharded(tmp_path / "sharded", loaded, optimizer)  # the same layout loads

    with pytest.raises(Exception, match=r"Missing key in checkpoint state_dict: .*b\.weight"):
        load_sharded(tmp_path / "sharded", *_model_and_optimizer("a", "b"))

    (tmp_path / "a_file").write_text("")
    with pytest.raises(OSError):  # a storage failure as the OS said it (a full disk, ...)
        save_sharded(tmp_path / "a_file" / "sharded", *_model_and_optimizer("a"))


TINY = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
TINY.update(num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)


def _trained(seed: int, **config: object) -> torch.nn.Module:
    """A tiny Llama whose weights are its seed's, nudged off their initial values."""
    from chatlearn.hf.model import build_causal_lm

    model = build_causal_lm({**TINY, **config}, vocab_size=64, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 1e-3)
    return model


@pytest.mark.parametrize("tied", [False, True])
def test_an_export_holding_the_whole_state_loads_back_bit_for_bit(
    tied: bool, tmp_path: Path
) -> None:
    from chatlearn.hf.checkpoint import (
        export_hf,
        export_holds_state,
        full_state_dict,
        load_exported_state,
    )

    model = _trained(1, tie_word_embeddings=tied)
    export_hf(model, full_state_dict(model, sharded=False), tmp_path)
    assert export_holds_state(tmp_path, model)  # a tied head is written once, as its embedding
    other = _trained(2, tie_word_embeddings=tied)
    load_exported_state(tmp_path, other)
    for (name, a), (_, b) in zip(
        model.state_dict().items(), other.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    if tied:
        assert other.lm_head.weight is other.model.embed_tokens.weight  # still one tensor


def test_an_export_of_another_state_is_not_taken_for_the_model(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from chatlearn.hf.checkpoint import (
        export_hf,
        export_holds_state,
        full_state_dict,
        load_exported_state,
    )

    model = _trained(1)
    assert not export_holds_state(tmp_path, model)  # no weights there
    export_hf(model, full_state_dict(model, sharded=False), tmp_path)
    weights = tmp_path / "model.safetensors"
    written = load_file(weights)
    for change in ("cast", "renamed", "extra", "missing"):
        tensors = dict(written)
        if change == "cast":  # as an export in bf16 would be
            tensors["lm_head.weight"] = tensors["lm_head.weight"].bfloat16()
        elif change == "renamed":
            tensors["head.weight"] = tensors.pop("lm_head.weight")
        elif change == "extra":
            tensors["lm_head.bias"] = torch.zeros(64)
        else:
            del tensors["lm_head.weight"]
        save_file(tensors, weights)
        assert not export_holds_state(tmp_path, model), change
    save_file(dict(written), weights)
    with pytest.raises(
        ValueError,
        match=r"mlp.down_proj.weight is not .*float32\[16, 32\], the model's: float32\[16, 64\]",
    ):
        load_exported_state(tmp_path, _trained(1, intermediate_size=64))
    del written["lm_head.weight"]
    save_file(written, weights)
    with pytest.raises(ValueError, match="no lm_head.weight"):
        load_exported_state(tmp_path, _trained(2))


def test_optimizer_shares_balance_bytes_and_merge_back(tmp_path: Path) -> None:
    from chatlearn.hf.checkpoint import load_optimizer_state, optimizer_share, share_owners

    # the largest first, each to the rank with the fewest bytes; rank 0 counted with its weights
    assert share_owners([10, 40, 30, 20], 2) == [0, 0, 1, 1]  # 40 + 10 | 30 + 20
    assert share_owners([10, 40, 30, 20], 2, first_rank_bytes=100) == [1, 1, 1, 1]
    assert share_owners([5, 5, 5], 3) == [0, 1, 2]
    model, optimizer = _model_and_optimizer("a", "b", "c")
    whole = optimizer.state_dict()
    for rank in range(2):
        (tmp_path / f"rank_{rank}").mkdir()
        torch.save(optimizer_share(optimizer, rank, 2), tmp_path / f"rank_{rank}" / "optimizer.pt")
    for rank in range(2):  # every rank reads every share
        merged = load_optimizer_state(tmp_path / f"rank_{rank}" / "optimizer.pt")
        assert merged["param_groups"] == whole["param_groups"]
        assert list(merged["state"]) == list(whole["state"])
        for index, state in whole["state"].items():
            for key, value in state.items():
                assert torch.equal(merged["state"][index][key], value), (index, key)
    (tmp_path / "rank_1" / "optimizer.pt").unlink()
    with pytest.raises(FileNotFoundError, match="rank_1/optimizer.pt"):
        load_optimizer_state(tmp_path / "rank_0" / "optimizer.pt")
