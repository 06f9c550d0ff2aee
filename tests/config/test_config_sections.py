"""Config sections: attribute access, .get(), unknown keys, defaults that follow code changes."""

from __future__ import annotations

import logging

import pytest

from chatlearn.config import (
    MODEL_KEYS,
    RUNTIME_KEYS,
    Config,
    ConfigError,
    ModelConfig,
    RuntimeConfig,
    RuntimeEnvConfig,
)
from chatlearn.config import schema as schema_module

# The DPO keys and defaults ChatLearn has (docs/chatlearn-compat.md, "The rules we reproduce").
SPEC_RUNTIME_DEFAULTS = {
    "num_episode": 5000,
    "sample_per_episode": 1000,
    "num_training_epoch": 1,
    "generation_batch_size": 2,
    "train_micro_batch_size": 2,
    "train_global_batch_size": 2,  # = micro
    "save_episode_interval": None,
    "data_shuffle": True,
    "data_ratio": None,
    "colocation": [],
    "eval_episode_interval": 0,
    "enable_eval_before_training": False,
    "data_checkpoint_path": None,
    "enable_resume_training": True,
    "load_data_checkpoint_iteration": None,
    "training_shuffle_mode": "batch",
    "exp_name": "CHATLEARN",
    "output_dir": "./",
}
SPEC_MODEL_DEFAULTS = {
    "num_gpu": 0,
    "num_cpu": 0,
    "gpu_per_process": 1,
    "trainable": False,
    "tensor_model_parallel_size": 1,
    "pipeline_model_parallel_size": 1,
    "zero_size": 1,
    "model_config_file": "",
    "free_memory": False,
}
EXTENSION_DEFAULTS = {
    "seed": 42,
    "heartbeat_interval": 0.5,
    "heartbeat_timeout": 5.0,
    "startup_timeout": 60.0,
    "call_timeout": None,
    "save_keep_last": 3,
    "tensorboard": False,
    "log_interval": 1,
    "reference_cache": True,
    "max_reference_cache_mb": 1024.0,
    "drop_last": "cycle",
    "consumed_samples": 0,
}


def test_spec_defaults() -> None:
    rt = RuntimeConfig()
    for key, default in {**SPEC_RUNTIME_DEFAULTS, **EXTENSION_DEFAULTS}.items():
        if key == "output_dir":  # reads as output_dir/exp_name (test_output_path)
            assert rt.output_dir_as_given == default
            continue
        assert getattr(rt, key) == default, key
    model = ModelConfig()
    for key, default in SPEC_MODEL_DEFAULTS.items():
        assert getattr(model, key) == default, key
    assert model.num_device == 0
    assert model.model_args == {}
    assert model.nice == 0


def test_every_known_key_is_in_the_docstring_table() -> None:
    doc = schema_module.__doc__ or ""
    for key in [*RUNTIME_KEYS, *MODEL_KEYS]:
        assert f"| {key} " in doc, key


def test_get_returns_none_with_a_warning_when_absent(caplog: pytest.LogCaptureFixture) -> None:
    rt = RuntimeConfig(custom=1)
    with caplog.at_level(logging.WARNING, logger="chatlearn.config"):
        assert rt.get("custom") == 1
        assert rt.get("num_episode") == 5000  # known keys too (ChatLearn's get misses them)
        assert caplog.text == ""
        assert rt.get("absent_key") is None
    assert "absent_key not found in runtime" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="chatlearn.config"):
        assert rt.get("absent_key", 7) == 7  # an explicit default: no warning
    assert caplog.text == ""


def test_unknown_attribute_raises_attribute_error() -> None:
    with pytest.raises(AttributeError, match="use .get"):
        _ = RuntimeConfig().no_such_key
    assert not hasattr(RuntimeConfig(), "no_such_key")


def test_unknown_keys_kept_and_assignable() -> None:
    rt = RuntimeConfig({"my_flag": [1, 2]})
    rt.other = {"a": 1}
    assert rt.my_flag == [1, 2] and rt.other == {"a": 1}
    assert "my_flag" in rt and "other" in rt and "nope" not in rt
    assert rt.to_dict() == {"my_flag": [1, 2], "other": {"a": 1}}
    assert set(rt.keys()) >= {"my_flag", "other", "num_episode"}


def test_assignment_is_checked() -> None:
    rt = RuntimeConfig()
    rt.train_micro_batch_size = 4
    assert rt.train_micro_batch_size == 4
    with pytest.raises(ConfigError) as info:
        rt.train_micro_batch_size = "4"
    assert info.value.key == "runtime.train_micro_batch_size"
    assert "remove the quotes" in str(info.value)
    with pytest.raises(ConfigError):
        rt.data_shuffle = 1
    rt.heartbeat_timeout = 3  # ints are fine for float keys
    assert rt.heartbeat_timeout == 3.0 and isinstance(rt.heartbeat_timeout, float)


def test_training_shuffle_mode_is_case_insensitive() -> None:
    assert RuntimeConfig(training_shuffle_mode="Sample").training_shuffle_mode == "sample"


def test_global_batch_default_follows_micro_batch_changes() -> None:
    rt = RuntimeConfig()
    rt.train_micro_batch_size = 8
    assert rt.train_global_batch_size == 8
    assert rt.to_dict() == {"train_micro_batch_size": 8}  # the default is not frozen in
    rt.train_global_batch_size = 32
    assert rt.micro_batches_per_step == 4
    del rt.train_global_batch_size
    assert rt.train_global_batch_size == 8


def test_pipeline_window_default() -> None:
    rt = RuntimeConfig(train_micro_batch_size=2, train_global_batch_size=8)
    assert rt.pipeline_window == 8  # two steps of four micro-batches
    rt.pipeline_window = 0
    assert rt.pipeline_window == 0


def test_output_path() -> None:
    assert RuntimeConfig().output_path == "./CHATLEARN"
    rt = RuntimeConfig(output_dir="/runs", exp_name="dpo")
    assert rt.output_path == "/runs/dpo"
    # as ChatLearn: output_dir reads as output_dir/exp_name, once (not /runs/dpo/dpo)
    assert rt.output_dir == rt.get("output_dir") == rt._args_dict["output_dir"] == "/runs/dpo"
    assert rt.output_dir_as_given == "/runs"
    assert rt.to_dict() == {"output_dir": "/runs", "exp_name": "dpo"}  # shipped as written
    shipped = RuntimeConfig(rt.to_dict(resolved=True))
    assert shipped.output_dir == shipped.output_path == "/runs/dpo"
    rt.exp_name = "other"  # both follow exp_name until learn()
    assert rt.output_dir == rt.output_path == "/runs/other"
    assert RuntimeConfig(output_dir="/runs/dpo/", exp_name="dpo").output_path == "/runs/dpo/"
    with pytest.raises(AttributeError, match="derived"):
        rt.output_path = "/elsewhere"


def test_colocation_forms() -> None:
    rt = RuntimeConfig(colocation=["reference, policy_trainer", ["a", "b"]])
    assert rt.colocation == [["reference", "policy_trainer"], ["a", "b"]]


def test_mutable_defaults_are_not_shared() -> None:
    first, second = RuntimeConfig(), RuntimeConfig()
    first.colocation.append(["a", "b"])
    assert first.colocation == [["a", "b"]]
    assert second.colocation == []


@pytest.mark.parametrize(
    ("ratio", "num", "expected"),
    [
        (None, 3, [1, 1, 1]),
        ([], 2, [1, 1]),
        (2, 2, [2, 2]),
        ([1, 3], 2, [1, 3]),
        ("1,2", 2, [1, 2]),
    ],
)
def test_resolve_data_ratio(ratio: object, num: int, expected: list[int]) -> None:
    assert RuntimeConfig(data_ratio=ratio).resolve_data_ratio(num) == expected


def test_model_generation_batch_size_follows_runtime() -> None:
    config = Config({"runtime": {"generation_batch_size": 8}, "models": {"r": {"num_cpu": 1}}})
    model = config.models["r"]
    assert model.generation_batch_size == 8 and model.forward_chunk_size == 8
    config.runtime_args.generation_batch_size = 4
    assert model.generation_batch_size == 4
    model.generation_batch_size = 3  # the model's own value overrides the runtime's
    assert model.forward_chunk_size == 3
    model.generation_batch_size = 0  # a model value <= 0 means no split
    assert model.forward_chunk_size is None
    model.generation_batch_size = None  # null: back to the runtime's
    assert model.forward_chunk_size == 4
    config.runtime_args.generation_batch_size = -1
    assert model.forward_chunk_size is None


@pytest.mark.parametrize(
    ("keys", "replicas", "dp", "processes"),
    [
        ({"num_gpu": 4}, 4, 1, 4),
        ({"num_gpu": 4, "tensor_model_parallel_size": 2}, 2, 1, 4),
        (
            {"num_gpu": 8, "tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2},
            2,
            1,
            8,
        ),
        ({"num_gpu": 4, "trainable": True}, 1, 4, 4),
        ({"num_gpu": 4, "trainable": True, "tensor_model_parallel_size": 2}, 1, 2, 4),
        ({"num_gpu": 4, "zero_size": 2}, 2, 2, 4),
        ({"num_gpu": 4, "gpu_per_process": 2}, 4, 1, 2),
        ({"num_cpu": 4}, 1, 1, 1),  # by default one process gets all the cores
        ({"num_cpu": 4, "cpu_per_process": 1}, 4, 1, 4),
        ({"num_cpu": 4, "cpu_per_process": 2, "trainable": True}, 1, 2, 2),
    ],
)
def test_model_derived_sizes(keys: dict, replicas: int, dp: int, processes: int) -> None:
    model = ModelConfig(keys)
    assert (model.num_replica, model.data_parallel_size, model.num_processes) == (
        replicas,
        dp,
        processes,
    )


def test_model_cpu_per_process_default_and_alias() -> None:
    model = ModelConfig(num_cpu=3)
    assert model.cpu_per_process == 3
    model.num_device = 2
    assert model.num_gpu == 2 and model.uses_gpu
    assert model.to_dict() == {"num_cpu": 3, "num_gpu": 2}
    with pytest.raises(ConfigError, match=r"num_replica: is derived from num_cpu and cpu_per"):
        ModelConfig(num_cpu=3).num_replica = 3


def test_assigning_num_replica_as_chatlearn_takes_it(caplog) -> None:
    # ChatLearn's config classes store any assignment, and its programs set models[name].
    # num_replica in code (its tests: `= 1`): the value the model already has changes nothing
    config = Config({"models": {"reference": {"num_cpu": 1}, "policy": {"num_gpu": 1}}})
    model = config.models["reference"]
    model.num_replica = 1
    assert model.num_replica == 1 and "num_replica" not in model.to_dict()
    # a CPU model's replicas come from the assignment in ChatLearn: here one line on what to set
    with pytest.raises(ConfigError) as error:
        model.num_replica = 2
    assert error.value.one_line() == (
        "config built in code: models.reference.num_replica: is derived from num_cpu and "
        "cpu_per_process (1 here), so 2 cannot be assigned (fix: set cpu_per_process to num_cpu "
        "/ the replicas wanted (each replica is one process of that many cores; a trainer is "
        "one replica, its processes data-parallel ranks))"
    )
    # a GPU model's follow its GPUs in ChatLearn too (its test sets 2 on one GPU and runs on)
    with caplog.at_level(logging.WARNING, logger="chatlearn.config"):
        config.models["policy"].num_replica = 2
    assert config.models["policy"].num_replica == 1
    assert "models.policy.num_replica = 2 ignored: a GPU model's replicas" in caplog.text
    model.args_dict = {"lr": 0.5}  # ChatLearn's name of model_args, assignable as there
    assert model.model_args == {"lr": 0.5}
    with pytest.raises(AttributeError, match="derived"):
        config.runtime_args.output_path = "/elsewhere"  # ours alone: no ChatLearn program sets it


def test_derived_keys_in_a_file_are_ignored_with_a_warning(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="chatlearn.config"):
        config = Config({"models": {"r": {"num_cpu": 1, "num_replica": 5}}})
    assert config.models["r"].num_replica == 1
    assert "models.r.num_replica is derived" in caplog.text


def test_model_args_assignment() -> None:
    model = ModelConfig(num_cpu=1, model_args={"lr": 0.1})
    model.model_args["hidden"] = 8
    assert model.model_args == {"lr": 0.1, "hidden": 8}
    model.model_args = {"x": 1}
    assert model.args_dict == {"x": 1}
    with pytest.raises(ConfigError):
        model.model_args = [1, 2]


def test_env_section() -> None:
    env = RuntimeEnvConfig(pip=["a"], env_vars={"X": 1})
    assert env.pip == ["a"] and env.env_vars == {"X": "1"} and env.working_dir is None
    with pytest.raises(ConfigError):
        env.pip = "a"


def test_section_equality_and_repr() -> None:
    assert RuntimeConfig(seed=1) == RuntimeConfig({"seed": 1})
    assert RuntimeConfig(seed=1) != RuntimeConfig(seed=2)
    assert "seed" in repr(RuntimeConfig(seed=1))
    assert "train_micro_batch_size" in dir(RuntimeConfig())
