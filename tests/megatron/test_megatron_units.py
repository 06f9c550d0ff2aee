"""Pure logic of chatlearn.megatron: rank layouts, config, masks, and the missing-extra error.

None of these need megatron-core (they run, and must pass, without it) and none start a process.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from chatlearn.megatron.gpt import GPTConfig, causal_attention_mask, padded_vocab_size
from chatlearn.megatron.parallel import ParallelLayout, RankCoordinates
from chatlearn.megatron.requirement import MegatronNotInstalledError, require_megatron


def test_layout_tp2_pp2_dp2_is_tensor_fastest_data_slowest() -> None:
    layout = ParallelLayout(
        world_size=8, tensor_model_parallel_size=2, pipeline_model_parallel_size=2
    )
    assert layout.data_parallel_size == 2
    coords = [layout.coordinates(rank) for rank in range(8)]
    assert coords[:4] == [(0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0)]
    assert coords[4:] == [(0, 0, 1), (1, 0, 1), (0, 1, 1), (1, 1, 1)]
    assert coords[5] == RankCoordinates(tensor=1, pipeline=0, data=1)
    # one output rank per data-parallel rank: the last rank of each replica
    assert [r for r in range(8) if layout.is_last_rank(r)] == [3, 7]
    # BaseModule's formula for the data-parallel rank agrees with the layout
    assert [rank // layout.model_parallel_size for rank in range(8)] == [c.data for c in coords]


def test_layout_rejects_bad_sizes_with_a_fix() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        ParallelLayout(world_size=3, tensor_model_parallel_size=2)
    with pytest.raises(ValueError, match="positive integer"):
        ParallelLayout(world_size=2, tensor_model_parallel_size=0)
    with pytest.raises(ValueError, match="outside"):
        ParallelLayout(world_size=2).coordinates(2)


def test_layout_from_config_reads_the_model_section_then_its_model_args() -> None:
    section = {"tensor_model_parallel_size": 2, "model_args": {"pipeline_model_parallel_size": 2}}
    layout = ParallelLayout.from_config(section, world_size=8)
    assert (layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size) == (2, 2)
    assert ParallelLayout.from_config({}, world_size=3).data_parallel_size == 3
    with pytest.raises(ValueError, match="must be an integer"):
        ParallelLayout.from_config({"tensor_model_parallel_size": "2"}, world_size=2)


def test_layout_from_chatlearn_config_object() -> None:
    from chatlearn.config import Config

    config = Config.from_dict(
        {
            "models": {
                "policy": {"num_cpu": 4, "cpu_per_process": 1, "tensor_model_parallel_size": 2}
            }
        }
    )
    layout = ParallelLayout.from_config(config.model("policy"), world_size=4)
    assert (layout.tensor_model_parallel_size, layout.data_parallel_size) == (2, 2)


def test_gpt_config_from_model_args_ignores_other_keys() -> None:
    config = GPTConfig.from_model_args({"vocab_size": 128, "hidden_size": 32, "lr": 0.1})
    assert (config.vocab_size, config.hidden_size, config.num_layers) == (128, 32, 2)
    with pytest.raises(ValueError, match="vocab_size"):
        GPTConfig.from_model_args({"hidden_size": 32})
    with pytest.raises(ValueError, match="params_dtype"):
        GPTConfig(vocab_size=8, params_dtype="float64")


def test_padded_vocab_size_follows_megatron_lm() -> None:
    assert padded_vocab_size(128, 1, 2) == 128
    assert padded_vocab_size(100, 1, 8) == 104
    assert padded_vocab_size(50257, 128, 1) == 50304


def test_causal_attention_mask_masks_future_and_padded_keys() -> None:
    plain = causal_attention_mask(None, 3)
    assert plain.shape == (1, 1, 3, 3) and plain.dtype == torch.bool
    assert plain[0, 0].tolist() == [
        [False, True, True],
        [False, False, True],
        [False, False, False],
    ]
    padded = causal_attention_mask(torch.tensor([[1, 1, 0]]), 3)
    assert padded[0, 0, 2].tolist() == [False, False, True]  # the pad key is masked for everyone
    assert padded[0, 0, 1].tolist() == [False, False, True]


def test_require_megatron_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "megatron.core", None)  # makes the import fail
    with pytest.raises(MegatronNotInstalledError, match=r"pip install 'chatlearn\[megatron\]'"):
        require_megatron("a test")


def test_megatron_module_without_megatron_says_which_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from chatlearn.megatron import module

    class Policy(module.MegatronModule):
        def setup(self) -> None:
            pass

    monkeypatch.setattr(module, "megatron_available", lambda: False)
    with pytest.raises(ImportError, match=r"chatlearn\[megatron\]"):
        Policy("policy", args={"models": {"policy": {"num_cpu": 1}}})


def test_megatron_module_template_reads_config_only() -> None:
    """The coordinator's object: no megatron initialization, views from the config."""
    from chatlearn.megatron.module import MegatronModule
    from chatlearn.megatron.requirement import megatron_available

    if not megatron_available():
        pytest.skip("megatron-core is not installed (pip install 'chatlearn[megatron]')")

    class Policy(MegatronModule):
        def setup(self) -> None:
            raise AssertionError("setup never runs in the coordinator")

    args = {
        "models": {"policy": {"num_cpu": 4, "tensor_model_parallel_size": 2}},
        "runtime_args": {"seed": 5},
    }
    policy = Policy("policy", args=args)
    assert policy.tensor_model_parallel_size == 2
    assert policy.seed == 5
    assert policy.data_parallel_rank == 0
    assert getattr(Policy.setup, "__chatlearn_megatron_setup__", False)  # wrapped: init first
    with pytest.raises(RuntimeError, match="setup"):
        policy.megatron_parallel_state  # noqa: B018


def test_importing_the_package_imports_neither_torch_nor_megatron() -> None:
    code = (
        "import sys, chatlearn.megatron, chatlearn.megatron.module; "
        "print('torch' in sys.modules, 'megatron' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout.split()
    assert out == ["False", "False"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: on GPU nothing is patched")
def test_no_patch_with_cuda() -> None:
    from chatlearn.megatron.compat import apply_cpu_compat, cpu_config_overrides

    assert apply_cpu_compat() == []
    assert cpu_config_overrides() == {}


def _megatron_template(model_args: dict, trainable: bool = True, **module: object) -> object:
    import argparse

    from chatlearn.megatron.module import MegatronModule
    from chatlearn.megatron.requirement import megatron_available

    if not megatron_available():
        pytest.skip("megatron-core is not installed (pip install 'chatlearn[megatron]')")

    class Policy(MegatronModule):
        def add_extra_args(self, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
            group = parser.add_argument_group("policy")
            group.add_argument("--dpo-beta", type=float, default=0.25)
            group.add_argument("--ref-temperature", type=float, default=1.0)
            return parser

    args = {
        "models": {
            "policy": {
                "num_cpu": 4,
                "tensor_model_parallel_size": 2,
                "trainable": trainable,
                "model_args": model_args,
                **module,
            }
        },
        "runtime_args": {
            "seed": 5,
            "train_micro_batch_size": 2,
            "train_global_batch_size": 8,
            "generation_batch_size": 3,
        },
    }
    return Policy("policy", args=args)


def test_megatron_args_follow_megatron_lm_from_model_args_and_runtime() -> None:
    model_args = {
        "num_layers": 2,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "seq_length": 128,
        "swiglu": True,
        "bf16": True,
        "lr": 5e-3,
        "micro_batch_size": 16,  # replaced by the runtime's, as ChatLearn does
        "ref_temperature": 0.5,  # the config wins over an extra argument's default
        "load": "/ckpt/llama",
        "tokenizer_type": "HFTokenizer",
        "vocab_size": 100,
        "my_own_key": "kept",
    }
    policy = _megatron_template(model_args)
    args = policy.megatron_args
    assert (args.micro_batch_size, args.global_batch_size) == (2, 8)
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (2, 1)
    assert (args.num_layers, args.hidden_size, args.lr, args.load) == (2, 64, 5e-3, "/ckpt/llama")
    assert policy.num_layers() == 2  # ChatLearn's MegatronModule.num_layers()
    # derived as Megatron-LM's validate_args does
    assert args.ffn_hidden_size == 128  # swiglu: 2/3 of 4h, down to a multiple of 64
    assert (args.kv_channels, args.num_query_groups) == (16, 4)
    assert args.max_position_embeddings == 128 and args.params_dtype is torch.bfloat16
    assert args.padded_vocab_size == 256  # 128 × tp
    # Megatron-LM defaults, TransformerConfig fields, extra arguments, unknown keys, the seed
    assert (args.weight_decay, args.make_vocab_size_divisible_by, args.save) == (0.01, 128, None)
    assert args.layernorm_epsilon == 1e-5 and args.gated_linear_unit is False
    assert (args.dpo_beta, args.ref_temperature, args.my_own_key) == (0.25, 0.5, "kept")
    assert args.seed == 5
    # model_args: the config plus extra-argument defaults and runtime batch sizes, a copy
    assert policy.model_args["dpo_beta"] == 0.25
    assert policy.model_args["micro_batch_size"] == 2
    assert model_args["micro_batch_size"] == 16


def test_inference_model_batch_size_is_its_generation_batch_size() -> None:
    policy = _megatron_template({"hidden_size": 64}, trainable=False, generation_batch_size=6)
    assert policy.megatron_args.micro_batch_size == 6
    # Megatron-LM's default: micro × data parallel (the template's world is 1 rank until setup)
    assert policy.megatron_args.global_batch_size == 6
    runtime_default = _megatron_template({"hidden_size": 64}, trainable=False)
    assert runtime_default.model_args["micro_batch_size"] == 3


def test_load_pretrained_model_says_what_load_must_be(tmp_path: object) -> None:
    policy = _megatron_template({})
    with pytest.raises(ValueError, match="set `load`"):
        policy.load_pretrained_model()
    policy = _megatron_template({"load": str(tmp_path)})
    with pytest.raises(ValueError, match="neither a Hugging Face .* nor a Megatron torch_dist"):
        policy.load_pretrained_model()
