"""Broken configs: one clear ConfigError each, naming the file (and line), the key and the fix."""

from __future__ import annotations

import sys
from pathlib import Path
from textwrap import dedent

import pytest

from chatlearn.config import Config, ConfigError, init, load_config

TWO_MODELS = """
models:
  reference:
    num_cpu: 1
  policy_trainer:
    num_cpu: 1
    trainable: true
"""


def error_of(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value


def check_format(error: ConfigError) -> None:
    """One line saying where/what, one line with the fix; and a ValueError for old code."""
    assert isinstance(error, ValueError)
    head, fix = str(error).split("\n")
    assert head and fix.startswith("  fix: ") and len(fix) > len("  fix: ") + 5
    assert error.fix


def runtime_error(write_yaml, runtime: str) -> ConfigError:
    text = "runtime:\n" + dedent(runtime).strip("\n").replace("\n", "\n  ").join(["  ", "\n"])
    path = write_yaml("main.yaml", text + dedent(TWO_MODELS))
    error = error_of(path)
    check_format(error)
    return error


def test_missing_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nope.yaml"
    monkeypatch.setattr(sys, "argv", ["train.py", "-c", str(missing)])
    with pytest.raises(ConfigError) as info:
        init()
    check_format(info.value)
    assert "nope.yaml" in info.value.where and "not found" in str(info.value)
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_bad_yaml_names_its_line(write_yaml) -> None:
    path = write_yaml(
        "main.yaml",
        """
        runtime:
          num_episode: 2
          sample_per_episode: [1, 2
        models: {}
        """,
    )
    error = error_of(path)
    check_format(error)
    assert error.where.endswith("main.yaml:4")
    assert "invalid YAML" in error.problem


def test_bad_yaml_indentation(write_yaml) -> None:
    error = error_of(write_yaml("main.yaml", "runtime:\n  num_episode: 2\n   seed: 3\n"))
    assert error.where.endswith("main.yaml:3") and "invalid YAML" in str(error)


def test_duplicate_key_in_strict_mode(write_yaml, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATLEARN_STRICT_CONFIG", "1")
    path = write_yaml("main.yaml", "runtime:\n  seed: 1\n  num_episode: 2\n  seed: 3\n")
    error = error_of(path)
    check_format(error)
    assert error.where.endswith("main.yaml:4") and error.key == "runtime.seed"
    assert "first set at" in error.problem and "main.yaml:2" in error.problem


def test_top_level_must_be_a_mapping(write_yaml) -> None:
    error = error_of(write_yaml("main.yaml", "- runtime\n- models\n"))
    check_format(error)
    assert "top level must be a mapping" in error.problem


@pytest.mark.parametrize(
    ("section", "suggestion"),
    [
        ("model", "models"),
        ("runtim", "runtime"),
        ("include", "includes"),
        ("runtime-env", "runtime_env"),
    ],
)
def test_misspelled_section(write_yaml, section: str, suggestion: str) -> None:
    error = error_of(write_yaml("main.yaml", f"{section}:\n  x: 1\n"))
    check_format(error)
    assert error.key == section and error.where.endswith("main.yaml:1")
    assert f"rename it to {suggestion}" in error.fix


def test_section_not_a_mapping(write_yaml) -> None:
    error = error_of(write_yaml("main.yaml", "runtime: [1, 2]\n"))
    check_format(error)
    assert error.key == "runtime" and error.where.endswith("main.yaml:1")


@pytest.mark.parametrize(
    ("line", "key", "words"),
    [
        ("train_micro_batch_size: '4x'", "train_micro_batch_size", "whole number"),
        ("num_episode: many", "num_episode", "whole number"),
        ("num_episode: 2.5", "num_episode", "whole number"),
        ("num_episode: true", "num_episode", "whole number"),
        ("data_shuffle: 'no thanks'", "data_shuffle", "true or false"),
        ("data_shuffle: 1", "data_shuffle", "true or false"),
        ("heartbeat_interval: fast", "heartbeat_interval", "number"),
        ("exp_name: [a]", "exp_name", "string"),
        ("sample_per_episode: null", "sample_per_episode", "null"),
    ],
)
def test_wrong_type(write_yaml, line: str, key: str, words: str) -> None:
    error = runtime_error(write_yaml, line)
    assert error.key == f"runtime.{key}"
    assert error.where.endswith("main.yaml:2")
    assert words in str(error)


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("train_micro_batch_size: 0", "train_micro_batch_size"),
        ("train_global_batch_size: -2", "train_global_batch_size"),
        ("sample_per_episode: 0", "sample_per_episode"),
        ("num_training_epoch: 0", "num_training_epoch"),
        ("num_episode: -1", "num_episode"),
        ("heartbeat_interval: 0", "heartbeat_interval"),
        ("save_keep_last: -1", "save_keep_last"),
    ],
)
def test_negative_or_zero_sizes(write_yaml, line: str, key: str) -> None:
    error = runtime_error(write_yaml, line)
    assert error.key == f"runtime.{key}" and "must be" in error.problem


def test_negative_model_devices(write_yaml) -> None:
    path = write_yaml("main.yaml", "models:\n  reference:\n    num_gpu: -1\n")
    error = error_of(path)
    check_format(error)
    assert error.key == "models.reference.num_gpu" and error.where.endswith("main.yaml:3")


def test_global_batch_not_a_multiple_of_micro(write_yaml) -> None:
    error = runtime_error(write_yaml, "train_micro_batch_size: 4\ntrain_global_batch_size: 10")
    assert error.key == "runtime.train_global_batch_size"
    assert error.where.endswith("main.yaml:3")
    assert "not a multiple of train_micro_batch_size (4)" in error.problem
    assert "e.g. 8" in error.fix


def test_sample_per_episode_smaller_than_global_batch(write_yaml) -> None:
    error = runtime_error(write_yaml, "sample_per_episode: 4\ntrain_global_batch_size: 8")
    assert error.key == "runtime.sample_per_episode" and error.where.endswith("main.yaml:2")
    assert "smaller than train_global_batch_size (8)" in error.problem


@pytest.mark.parametrize("model", ["reference:", "reference: {num_gpu: 0, num_cpu: 0}"])
def test_model_without_devices(write_yaml, model: str) -> None:
    error = error_of(write_yaml("main.yaml", f"models:\n  {model}\n"))
    check_format(error)
    assert error.key == "models.reference" and error.where.endswith("main.yaml:2")
    assert "neither num_gpu nor num_cpu" in error.problem


@pytest.mark.parametrize(
    ("line", "key", "choices"),
    [
        ("training_shuffle_mode: random", "training_shuffle_mode", "batch, sample"),
        ("drop_last: maybe", "drop_last", "must be one of cycle, drop;"),
        # ChatLearn's mode the sampler does not offer: it passed, then the run's start raised
        ("drop_last: retain", "drop_last", "must be one of cycle, drop; got 'retain'"),
        ("drop_last: false", "drop_last", "string"),
    ],
)
def test_bad_choice(write_yaml, line: str, key: str, choices: str) -> None:
    error = runtime_error(write_yaml, line)
    assert error.key == f"runtime.{key}" and choices in str(error)


def test_missing_include(write_yaml) -> None:
    path = write_yaml("main.yaml", "runtime:\n  seed: 1\nincludes:\n  - base.yaml\n")
    error = error_of(path)
    check_format(error)
    assert error.key == "includes" and error.where.endswith("main.yaml:3")
    assert "'base.yaml' not found" in error.problem


def test_include_cycle(write_yaml) -> None:
    write_yaml("a.yaml", "includes: [b.yaml]\n")
    write_yaml("b.yaml", "includes: [a.yaml]\n")
    path = write_yaml("main.yaml", "includes: [a.yaml]\n")
    error = error_of(path)
    check_format(error)
    assert "include cycle" in error.problem
    assert "a.yaml → " in error.problem and error.where.endswith("b.yaml:1")


@pytest.mark.timeout(20)
def test_an_alias_bomb_is_refused_before_it_is_expanded(write_yaml) -> None:
    """Eight lines whose aliases each repeat the previous list ten times: 10^8 values."""
    lines = ["a0: &a0 [" + ", ".join(["x"] * 10) + "]"]
    for i in range(1, 8):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    path = write_yaml("main.yaml", "\n".join(lines) + "\nruntime:\n  bomb: *a7\n" + TWO_MODELS)
    error = error_of(path)
    check_format(error)
    assert "aliases expand to more than 1,000,000 values" in error.problem
    assert error.where.endswith("main.yaml:6")  # a5: the first list beyond (1.1 million)


@pytest.mark.parametrize(
    ("text", "line"),
    [("runtime:\n  x: &a [*a]\n", 2), ("runtime: &r\n  self: *r\n", 1)],
)
def test_an_alias_inside_its_own_anchor_is_refused(write_yaml, text: str, line: int) -> None:
    error = error_of(write_yaml("main.yaml", text + TWO_MODELS))
    check_format(error)
    assert "holds an alias of itself" in error.problem and error.where.endswith(f":{line}")


def test_shared_anchors_and_merge_keys_still_load(write_yaml) -> None:
    text = (
        "base: &b\n  num_cpu: 1\nmodels:\n  reference:\n    <<: *b\n  policy_trainer:\n"
        "    <<: *b\n    trainable: true\n"
        "runtime:\n  colocation: &c [[reference, policy_trainer]]\n"
    )
    config = load_config(write_yaml("main.yaml", text))
    assert config.models["policy_trainer"].num_cpu == 1


def test_file_including_itself(write_yaml) -> None:
    error = error_of(write_yaml("main.yaml", "includes: [main.yaml]\n"))
    assert "include cycle" in error.problem


def test_includes_not_a_list(write_yaml) -> None:
    error = error_of(write_yaml("main.yaml", "includes: {a: 1}\n"))
    check_format(error)
    assert error.key == "includes" and "list" in error.problem


def test_missing_model_config_file(write_yaml) -> None:
    path = write_yaml(
        "main.yaml", "models:\n  policy:\n    num_cpu: 1\n    model_config_file: policy.yaml\n"
    )
    error = error_of(path)
    check_format(error)
    assert error.key == "models.policy.model_config_file"
    assert error.where.endswith("main.yaml:4")
    assert "model config file 'policy.yaml' not found" in error.problem


def test_bad_yaml_in_model_config_file(write_yaml) -> None:
    write_yaml("policy.yaml", "lr: [1\n")
    path = write_yaml(
        "main.yaml", "models:\n  policy:\n    num_cpu: 1\n    model_config_file: policy.yaml\n"
    )
    error = error_of(path)
    assert "policy.yaml:2" in error.where and "invalid YAML" in error.problem


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("data_ratio: [0.5, 0.5]", "whole numbers"),
        ("data_ratio: a,b", "cannot read"),
        ("data_ratio: [0, 0]", "at least one entry > 0"),
        ("data_ratio: 0", "≥ 1"),
        ("data_ratio: {a: 1}", "list of whole numbers"),
    ],
)
def test_data_ratio_type(write_yaml, line: str, words: str) -> None:
    error = runtime_error(write_yaml, line)
    assert error.key == "runtime.data_ratio" and words in error.problem


def test_data_ratio_length_against_data_path(write_yaml) -> None:
    error = runtime_error(write_yaml, "data_path: [a.json, b.json]\ndata_ratio: [1, 2, 3]")
    assert error.key == "runtime.data_ratio" and error.where.endswith("main.yaml:3")
    assert "3 entries" in error.problem and "2 datasets" in error.problem


def test_data_ratio_length_against_datasets(write_yaml) -> None:
    path = write_yaml("main.yaml", "runtime:\n  data_ratio: [1, 2]\n")
    config = load_config(path)
    with pytest.raises(ConfigError) as info:
        config.runtime_args.resolve_data_ratio(3)
    check_format(info.value)
    assert info.value.key == "runtime.data_ratio" and info.value.where.endswith("main.yaml:2")


def test_unknown_model_name(write_yaml) -> None:
    config = load_config(write_yaml("main.yaml", dedent(TWO_MODELS)))
    with pytest.raises(ConfigError) as info:
        config.model("referense")
    error = info.value
    check_format(error)
    assert error.key == "models.referense" and error.where.endswith("main.yaml:1")
    assert "known models: policy_trainer, reference" in error.problem
    assert "did you mean 'reference'" in error.fix


def test_unknown_model_name_without_models() -> None:
    with pytest.raises(ConfigError, match="no models: section") as info:
        Config().model("reference")
    assert info.value.where == "config built in code"


def test_alias_conflict(write_yaml) -> None:
    path = write_yaml("main.yaml", "models:\n  reference:\n    num_gpu: 1\n    num_device: 2\n")
    error = error_of(path)
    check_format(error)
    assert error.key == "models.reference.num_device" and error.where.endswith("main.yaml:4")
    assert "disagree" in error.problem


def test_malformed_placeholder(write_yaml) -> None:
    error = runtime_error(write_yaml, "output_dir: ${HOME}/runs")
    assert error.key == "runtime.output_dir" and "whole placeholder" in error.problem


def test_placeholder_value_of_wrong_type(write_yaml, monkeypatch) -> None:
    monkeypatch.setenv("MICRO", "four")
    error = runtime_error(write_yaml, "train_micro_batch_size: ${MICRO}")
    assert error.key == "runtime.train_micro_batch_size" and "'four'" in error.problem


def test_pipeline_window_smaller_than_a_step(write_yaml) -> None:
    error = runtime_error(write_yaml, "train_global_batch_size: 8\npipeline_window: 3")
    assert error.key == "runtime.pipeline_window" and "one training step of 4" in error.problem


def test_heartbeat_timeout_not_longer_than_interval(write_yaml) -> None:
    error = runtime_error(write_yaml, "heartbeat_interval: 2\nheartbeat_timeout: 1")
    assert error.key == "runtime.heartbeat_timeout"


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ('colocation: ["reference,critic"]', "'critic'"),
        ('colocation: ["reference,policy_trainer", "reference"]', "more than one"),
        ("colocation: reference", "list of model groups"),
    ],
)
def test_bad_colocation(write_yaml, line: str, words: str) -> None:
    error = runtime_error(write_yaml, line)
    assert error.key == "runtime.colocation" and words in error.problem


@pytest.mark.parametrize(
    ("model", "key", "words"),
    [
        ("{num_cpu: 3, cpu_per_process: 2}", "cpu_per_process", "does not divide"),
        ("{num_gpu: 2, gpu_per_process: 4}", "gpu_per_process", "does not divide"),
        ("{num_gpu: 3, tensor_model_parallel_size: 2}", "tensor_model_parallel_size", "3"),
        ("{num_gpu: 4, zero_size: 2, tensor_model_parallel_size: 2}", "zero_size", "ZeRO"),
        ("{num_gpu: 4, zero_size: 3}", "zero_size", "does not divide"),
        ("{num_cpu: 1, nice: 40}", "nice", "≤ 19"),
        ("{num_cpu: 1, trainable: 'yes'}", "trainable", "true or false"),
    ],
)
def test_bad_model_sizes(write_yaml, model: str, key: str, words: str) -> None:
    path = write_yaml("main.yaml", f"runtime:\n  sample_per_episode: 12\nmodels:\n  m: {model}\n")
    error = error_of(path)
    check_format(error)
    assert error.key == f"models.m.{key}" and words in str(error)


def test_replicas_must_divide_the_episode(write_yaml) -> None:
    path = write_yaml(
        "main.yaml", "runtime:\n  sample_per_episode: 10\nmodels:\n  ref: {num_gpu: 4}\n"
    )
    error = error_of(path)
    check_format(error)
    assert error.key == "runtime.sample_per_episode" and error.where.endswith("main.yaml:2")
    assert "4 replicas of model 'ref'" in error.problem


def test_data_parallel_ranks_must_share_a_step(write_yaml) -> None:
    path = write_yaml(
        "main.yaml",
        "runtime:\n  train_global_batch_size: 6\nmodels:\n  pol: {num_gpu: 2, trainable: true}\n",
    )
    error = error_of(path)
    check_format(error)
    assert error.key == "runtime.train_global_batch_size"
    assert "2 data-parallel ranks of model 'pol'" in error.problem


def test_parallel_size_disagrees_with_model_config_file(write_yaml) -> None:
    write_yaml("policy.yaml", "tensor_model_parallel_size: 2\n")
    path = write_yaml(
        "main.yaml",
        "models:\n  pol:\n    num_gpu: 4\n    tensor_model_parallel_size: 4\n"
        "    model_config_file: policy.yaml\n",
    )
    error = error_of(path)
    check_format(error)
    assert error.key == "models.pol.tensor_model_parallel_size"
    assert error.where.endswith("main.yaml:4")


def test_bad_parallel_size_in_model_config_file(write_yaml) -> None:
    write_yaml("policy.yaml", "hidden: 8\npipeline_model_parallel_size: 0\n")
    path = write_yaml(
        "main.yaml", "models:\n  pol:\n    num_gpu: 1\n    model_config_file: policy.yaml\n"
    )
    error = error_of(path)
    assert error.key == "models.pol.model_args.pipeline_model_parallel_size"
    assert error.where.endswith("policy.yaml:2")


def test_deprecated_save_interval(write_yaml) -> None:
    error = runtime_error(write_yaml, "save_interval: 10")
    assert error.key == "runtime.save_interval" and "save_episode_interval" in error.fix


def test_model_entry_not_a_mapping(write_yaml) -> None:
    error = error_of(write_yaml("main.yaml", "models:\n  reference: 4\n"))
    check_format(error)
    assert error.key == "models.reference" and error.where.endswith("main.yaml:2")


def test_model_name_not_a_string() -> None:
    with pytest.raises(ConfigError, match="model names must be strings"):
        Config({"models": {1: {"num_cpu": 1}}})


def test_validate_catches_changes_made_in_code(write_yaml) -> None:
    config = load_config(write_yaml("main.yaml", dedent(TWO_MODELS)))
    config.runtime_args.train_micro_batch_size = 4
    config.runtime_args.train_global_batch_size = 6
    with pytest.raises(ConfigError) as info:
        config.validate()
    check_format(info.value)
    assert info.value.where == "config built in code"
    assert info.value.key == "runtime.train_global_batch_size"


def test_in_place_mutation_is_rechecked() -> None:
    config = Config({"models": {"a": {"num_cpu": 1}, "b": {"num_cpu": 1}}})
    config.runtime_args.colocation.append(5)
    with pytest.raises(ConfigError) as info:
        config.validate()
    assert info.value.key == "runtime.colocation"


def test_errors_of_config_built_in_code() -> None:
    with pytest.raises(ConfigError) as info:
        Config({"runtime": {"train_micro_batch_size": "x"}})
    check_format(info.value)
    assert info.value.where == "config built in code"
    assert info.value.key == "runtime.train_micro_batch_size"


def test_includes_in_a_dict_built_in_code() -> None:
    with pytest.raises(ConfigError, match="config files only"):
        Config({"includes": ["base.yaml"]})


def test_both_rlhf_and_runtime(write_yaml) -> None:
    error = error_of(write_yaml("main.yaml", "rlhf: {seed: 1}\nruntime: {seed: 2}\n"))
    check_format(error)
    assert error.key == "rlhf" and "merge rlhf" in error.fix


def test_nested_placeholder(write_yaml) -> None:
    # it was read as the literal string '${B:1}' (ChatLearn reads it as 'B'), without a word
    error = runtime_error(write_yaml, "my_setting: ${CHATLEARN_TEST_UNSET:${B:1}}")
    check_format(error)
    assert error.key == "runtime.my_setting" and error.where.endswith("main.yaml:2")
    assert "nested placeholders are not supported" in error.problem
