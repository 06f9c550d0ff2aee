"""The layout, LoRA and memory options of the HF modules: parsing, errors users see, and the
out-of-memory message (pure logic; the layouts themselves run in test_layouts.py)."""

from __future__ import annotations

import pytest
import torch

from chatlearn.config import ConfigError
from chatlearn.config.model_args import LORA_DEFAULTS
from chatlearn.hf.lora import lora_settings
from chatlearn.hf.memory import memory_report, out_of_memory_message
from chatlearn.hf.parallel import Layout


def test_layout_defaults_to_ddp_in_full_precision() -> None:
    layout = Layout.from_args({}, world_size=2, device_type="cpu")
    assert (layout.parallel, layout.mixed_precision, layout.sharded) == ("ddp", "no", False)
    assert layout.describe() == "DDP over 2 ranks, mixed precision no, cpu"
    fsdp = Layout.from_args({"parallel": "FSDP", "mixed_precision": "bfloat16"}, world_size=2,
                            device_type="cpu")  # fmt: skip
    assert fsdp.sharded and fsdp.compute_dtype == torch.bfloat16
    assert Layout.from_args({"parallel": "fsdp"}, world_size=1, device_type="cpu").sharded is False


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"parallel": "zero3"}, "parallel: must be one of none, ddp, fsdp"),
        ({"mixed_precision": "fp8"}, "mixed_precision: must be one of no, bf16, fp16; got 'fp8'"),
        (
            {"mixed_precision": "fp16"},
            "mixed_precision: fp16 needs a loss scaler, which needs CUDA",
        ),
    ],
)
def test_layout_errors_say_what_to_change(args: dict, message: str) -> None:
    # the ConfigError of the key (a ValueError); a module's setup() gives its file:line
    with pytest.raises(ConfigError, match=message) as info:
        Layout.from_args(args, world_size=1, device_type="cpu")
    assert info.value.key == f"model_args.{next(iter(args))}" and info.value.fix


def test_hsdp_when_ranks_span_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert Layout.from_args({"parallel": "fsdp"}, world_size=8, device_type="cuda").num_hosts == 2
    layout = Layout.from_args({"parallel": "fsdp", "hsdp": False}, world_size=8, device_type="cuda")
    assert layout.num_hosts == 1
    assert Layout.from_args({"parallel": "ddp"}, world_size=8, device_type="cuda").num_hosts == 1


def test_lora_settings() -> None:
    assert lora_settings({}) is None
    assert lora_settings({"enable_lora": True}) == LORA_DEFAULTS
    assert lora_settings({"lora": {"r": 4}})["r"] == 4
    assert lora_settings({"lora": {}}) == LORA_DEFAULTS  # it trained the whole model silently
    assert lora_settings({"lora": None}) is None  # `lora:` with every setting commented out
    # an explicit enable_lora: false wins over a section, beside it or (ChatLearn) in it
    assert lora_settings({"enable_lora": False, "lora": {"r": 8}}) is None
    assert lora_settings({"lora": {"enable_lora": False, "lora_dim": 16}}) is None
    # ChatLearn's names of r and dropout
    chatlearn_style = lora_settings(
        {"lora": {"enable_lora": True, "lora_dim": 8, "lora_dropout": 0.1}}
    )
    assert chatlearn_style == {**LORA_DEFAULTS, "r": 8, "dropout": 0.1}


@pytest.mark.parametrize(
    ("section", "key", "message"),
    [
        ({"rank": 4}, "lora.rank", "not a LoRA setting here"),
        (16, "lora", "expected a mapping like {r: 16, alpha: 32}"),
        ({"r": 0}, "lora.r", "must be ≥ 1, got 0"),
        ({"r": 2.5}, "lora.r", "expected a whole number"),
        ({"alpha": 0}, "lora.alpha", "must be > 0"),
        ({"dropout": 1.0}, "lora.dropout", "must be ≤ 0.99"),
        ({"target_modules": []}, "lora.target_modules", "expected a name or a list of names"),
    ],
)
def test_lora_mistakes_name_their_key(section: object, key: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        lora_settings({"lora": section})
    assert info.value.key == f"model_args.{key}" and message in info.value.problem


def test_memory_report_estimates_before_the_first_step_and_measures_after() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    model[1].requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    before = memory_report(model, optimizer)
    assert before["estimated"] and before["num_parameters"] == 72 + 18
    assert before["num_trainable_parameters"] == 72
    assert before["param_bytes"] == 90 * 4 and before["optimizer_bytes"] == 2 * 72 * 4
    model(torch.randn(3, 8)).sum().backward()
    optimizer.step()
    after = memory_report(model, optimizer)
    assert not after["estimated"]
    assert (after["grad_bytes"], after["optimizer_bytes"]) == (72 * 4, 2 * 72 * 4)
    message = out_of_memory_message(RuntimeError("CUDA out of memory"), after, "one process")
    assert "parallel: fsdp" in message and "lora" in message and "one process" in message


def test_training_without_a_parallel_wrapper_on_several_ranks_is_an_error() -> None:
    layout = Layout.from_args({"parallel": "none"}, world_size=2, device_type="cpu")
    with pytest.raises(ValueError, match="parallel: none cannot train on 2 ranks"):
        layout.wrap(torch.nn.Linear(2, 2), trainable=True)
    assert isinstance(layout.wrap(torch.nn.Linear(2, 2), trainable=False), torch.nn.Linear)


@pytest.mark.parametrize(
    ("name", "num_cpu", "zero_size", "fix"),
    [
        ("reference", 2, 1, "set models.reference.zero_size"),  # 2 replicas of one process
        ("reference", 2, 2, None),  # one replica of two processes
        ("policy", 1, 1, "give models.policy more processes"),  # was silent
        ("policy", 2, 1, None),
    ],
)
def test_fsdp_that_shards_nothing_says_so(
    name: str, num_cpu: int, zero_size: int, fix: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    # Two processes of an inference model are two replicas of one process unless zero_size
    # makes them one replica: `parallel: fsdp` alone then shards nothing, which users expect
    # it to (the README's advice for a reference too big for one device said only that); nor
    # on a trainer of one process.
    from chatlearn.config import Config
    from chatlearn.hf.modules import HFDPOTrainer, HFReference

    tiny = {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 32,
    }
    model_args = {"model_config": tiny, "seed": 0, "parallel": "fsdp"}
    processes = {"num_cpu": num_cpu, "cpu_per_process": 1}
    config = Config(
        {
            "models": {
                "reference": {**processes, "zero_size": zero_size, "model_args": model_args},
                "policy": {**processes, "trainable": True, "model_args": model_args},
            },
            "runtime": {
                "num_episode": 1,
                "sample_per_episode": 16,
                "train_micro_batch_size": 4,
                "train_global_batch_size": 8,
            },
        }
    )
    module = (HFReference if name == "reference" else HFDPOTrainer)(name, args=config)
    # as the runtime sets them in replica 0 (a trainer is one replica of all its processes)
    module._rank, module._world_size = 0, zero_size if name == "reference" else num_cpu
    with caplog.at_level("WARNING"):
        module.setup()
    warned = [r.getMessage() for r in caplog.records if "shards nothing" in r.getMessage()]
    if fix is not None:
        assert len(warned) == 1 and fix in warned[0], warned
    else:
        assert warned == []


@pytest.mark.parametrize("learned", [True, False])
def test_max_length_beyond_the_models_positions(
    learned: bool, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    # learned positions (a local GPT-2 checkpoint): the first longer sample failed with an
    # IndexError deep in the model (a device assert on CUDA); rotary ones (Llama) extrapolate,
    # which is said
    from transformers import GPT2Config, GPT2LMHeadModel

    from chatlearn.config import Config, reset_args, set_args
    from chatlearn.hf import byte_tokenizer
    from chatlearn.hf.modules import HFReference

    model_args: dict = {"seed": 0, "max_length": 64}
    if learned:
        gpt2 = GPT2Config(n_positions=32, n_embd=16, n_layer=1, n_head=2, vocab_size=260)
        GPT2LMHeadModel(gpt2).save_pretrained(tmp_path)
        byte_tokenizer().save_pretrained(tmp_path)
        model_args["model_path"] = str(tmp_path)
    else:
        tiny = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
        model_args["model_config"] = {**tiny, "max_position_embeddings": 32}
    config = Config(
        {
            "models": {
                "reference": {"num_cpu": 1, "model_args": model_args},
                "policy": {"num_cpu": 1, "trainable": True, "model_args": dict(model_args)},
            },
            "runtime": {"num_episode": 1, "sample_per_episode": 16},
        }
    )
    set_args(config)
    try:
        module = HFReference("reference", args=config)
        if learned:
            with pytest.raises(ConfigError) as info:
                module.setup()
            assert info.value.key == "models.reference.model_args.max_length"
            assert "more than the 32 positions of the model (GPT2LMHeadModel)" in str(info.value)
            return
        with caplog.at_level("WARNING"):
            module.setup()
        assert any("extrapolates" in r.getMessage() for r in caplog.records), caplog.text
    finally:
        reset_args()


def test_chatlearns_per_model_lora_section_is_applied_by_the_hf_trainer() -> None:
    # models.<name>.lora: {enable_lora: true, ...} made self.enable_lora true while the HF
    # trainer, which read only model_args, trained the whole model
    from chatlearn.config import Config
    from chatlearn.hf.lora import module_lora_settings
    from chatlearn.hf.modules import HFDPOTrainer

    def trainer(model: dict) -> HFDPOTrainer:
        config = Config({"models": {"policy": {"num_cpu": 1, "trainable": True, **model}}})
        return HFDPOTrainer("policy", config)

    section = {"enable_lora": True, "lora_dim": 4, "lora_scaling": 2.0, "lora_dropout": 0.1}
    policy = trainer({"lora": section})
    assert policy.enable_lora is True
    assert module_lora_settings(policy) == {**LORA_DEFAULTS, "r": 4, "alpha": 2.0, "dropout": 0.1}
    # ChatLearn's defaults: lora_dim 8, lora_scaling 1 (its update is lora_scaling / lora_dim)
    defaults = module_lora_settings(trainer({"lora": {"enable_lora": True}}))
    assert defaults == {**LORA_DEFAULTS, "r": 8, "alpha": 1.0}
    assert module_lora_settings(trainer({"lora": {"lora_dim": 4}})) is None  # not enabled
    # the model_args' own settings win, an explicit enable_lora: false included
    mine = trainer({"lora": section, "model_args": {"lora": {"r": 2}}})
    assert module_lora_settings(mine) == {**LORA_DEFAULTS, "r": 2}
    assert (
        module_lora_settings(trainer({"lora": section, "model_args": {"enable_lora": False}}))
        is None
    )
    with pytest.raises(ConfigError) as info:
        module_lora_settings(trainer({"lora": {"enable_lora": True, "lora_dim": 0}}))
    assert info.value.key == "models.policy.lora.r" and "must be ≥ 1" in info.value.problem
