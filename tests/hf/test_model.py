"""Small Llama-style models: seeded construction, dtype, and a round trip through a local
checkpoint directory (from_pretrained, offline)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from chatlearn.hf import (
    build_causal_lm,
    byte_tokenizer,
    causal_lm_from_args,
    load_causal_lm,
    num_parameters,
    resolve_dtype,
)

TINY = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
}


def test_same_seed_same_weights_and_global_rng_untouched() -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_causal_lm(TINY, seed=7)
    after = torch.rand(1)
    b = build_causal_lm(TINY, seed=7)
    c = build_causal_lm(TINY, seed=8)
    assert torch.equal(before, after)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert not all(
        torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters(), strict=True)
    )


def test_from_args_uses_the_tokenizer_and_dtype() -> None:
    tok = byte_tokenizer()
    model = causal_lm_from_args({"model_config": TINY, "dtype": "bfloat16", "seed": 1}, tok)
    assert model.config.vocab_size == len(tok)
    assert model.config.pad_token_id == tok.pad_token_id
    assert next(model.parameters()).dtype == torch.bfloat16
    logits = model(input_ids=torch.tensor([[257, 97, 98]])).logits
    assert logits.shape == (1, 3, len(tok))
    assert num_parameters(model) > 0


def test_save_and_load_local_checkpoint(tmp_path: Path) -> None:
    model = build_causal_lm(TINY, seed=3)
    model.save_pretrained(tmp_path)
    loaded = causal_lm_from_args({"model_path": str(tmp_path)}, byte_tokenizer())
    ids = torch.tensor([[257, 1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    half = load_causal_lm(tmp_path, dtype="float16")
    assert next(half.parameters()).dtype == torch.float16


def test_a_checkpoint_read_onto_a_device_goes_through_device_map_and_loads_the_same_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On CUDA a module reads its (unsharded) checkpoint straight onto its GPU: no copy in host
    # memory. Here the device is the CPU; the weights must be those of a plain load.
    from transformers import AutoModelForCausalLM

    from chatlearn.hf.model import loads_onto_device

    build_causal_lm(TINY, seed=3).save_pretrained(tmp_path)
    seen: list[object] = []
    load = AutoModelForCausalLM.from_pretrained.__func__  # type: ignore[attr-defined]

    def spy(cls: type, *args: object, **kwargs: object) -> object:
        seen.append(kwargs.get("device_map"))
        return load(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    plain = load_causal_lm(tmp_path)
    onto = causal_lm_from_args(
        {"model_path": str(tmp_path)}, byte_tokenizer(), device=torch.device("cpu")
    )
    assert loads_onto_device()  # accelerate here
    assert seen == [None, torch.device("cpu")]
    for (name, a), (_, b) in zip(
        plain.state_dict().items(), onto.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert {p.device for p in onto.parameters()} == {torch.device("cpu")}


def test_without_accelerate_a_checkpoint_read_for_a_device_loads_in_host_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # from_pretrained takes a device_map only with accelerate (transformers 5 too): without it
    # every checkpoint on CUDA was model_path's "does not load ... requires `accelerate`"
    from transformers.utils import import_utils

    from chatlearn.hf.model import loads_onto_device

    build_causal_lm(TINY, seed=3).save_pretrained(tmp_path)
    monkeypatch.setitem(sys.modules, "accelerate", None)  # find_spec: not installed
    import_utils.is_accelerate_available.cache_clear()
    try:
        assert not loads_onto_device()
        model = load_causal_lm(tmp_path, device=torch.device("cpu"))
    finally:
        monkeypatch.undo()
        import_utils.is_accelerate_available.cache_clear()
    assert {p.device for p in model.parameters()} == {torch.device("cpu")}
    assert loads_onto_device()


def test_a_model_path_under_the_home_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `model_path: ~/models/x` was refused as "not a directory", though the config's other
    # paths (data_path, includes) expand ~
    from chatlearn.hf import load_tokenizer

    build_causal_lm(TINY, seed=3).save_pretrained(tmp_path / "model")
    byte_tokenizer().save_pretrained(tmp_path / "model")
    monkeypatch.setenv("HOME", str(tmp_path))
    args = {"model_path": "~/model"}
    loaded = causal_lm_from_args(args, load_tokenizer(args["model_path"]))
    assert loaded.config.hidden_size == TINY["hidden_size"]


def test_dtype_names() -> None:
    assert resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype("torch.float32") is torch.float32
    assert resolve_dtype("auto") is None and resolve_dtype(None) is None
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int3")
    with pytest.raises(ValueError, match="not a directory"):
        load_causal_lm("/nonexistent/checkpoint")


def test_the_dtype_goes_by_the_name_this_transformers_takes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # transformers before 4.56 takes torch_dtype (the hf extra allows 4.40 on): `dtype=` reached
    # the model's constructor there and failed, naming no key
    import transformers
    from transformers import AutoModelForCausalLM

    build_causal_lm(TINY, seed=3).save_pretrained(tmp_path)
    seen: list[set[str]] = []
    load = AutoModelForCausalLM.from_pretrained.__func__  # type: ignore[attr-defined]

    def spy(cls: type, *args: object, **kwargs: object) -> object:
        seen.append(set(kwargs) & {"dtype", "torch_dtype"})
        kwargs["dtype"] = kwargs.pop("torch_dtype", kwargs.get("dtype"))  # as this one takes it
        return load(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    load_causal_lm(tmp_path, dtype="bfloat16")
    monkeypatch.setattr(transformers, "__version__", "4.45.2")
    half = load_causal_lm(tmp_path, dtype="bfloat16")
    assert seen == [{"dtype"}, {"torch_dtype"}]
    assert next(half.parameters()).dtype == torch.bfloat16
