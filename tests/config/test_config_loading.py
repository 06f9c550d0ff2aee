"""Reading config files: sections, ${NAME:default} substitution, includes, model config files."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from textwrap import dedent

import pytest

from chatlearn.config import Config, ConfigError, init, load_config
from chatlearn.config.loader import literal

MODELS = """
models:
  reference:
    num_cpu: 1
  policy_trainer:
    num_cpu: 1
    trainable: true
"""


def test_sections_are_read(write_yaml) -> None:
    path = write_yaml(
        "main.yaml",
        """
        runtime_env:
          platform: DLC
          env_vars: {OMP_NUM_THREADS: 1}
        runtime:
          num_episode: 3
          sample_per_episode: 16
          train_micro_batch_size: 4
          train_global_batch_size: 8
          my_own_key: hello
        models:
          reference:
            num_gpu: 1
            generation_batch_size: 8
          policy_trainer:
            num_gpu: 2
            trainable: true
        """,
    )
    config = load_config(path)
    assert config.config_file == str(path.resolve())
    assert config.config_dir == str(path.parent.resolve())
    rt = config.runtime_args
    assert (rt.num_episode, rt.sample_per_episode, rt.train_micro_batch_size) == (3, 16, 4)
    assert rt.train_global_batch_size == 8
    assert rt.my_own_key == "hello" and rt.get("my_own_key") == "hello"
    assert config.env_args.platform == "DLC"
    assert config.env_args.env_vars == {"OMP_NUM_THREADS": "1"}
    assert sorted(config.models) == ["policy_trainer", "reference"]
    assert config.models["reference"].generation_batch_size == 8
    assert config.models["policy_trainer"].trainable is True


def test_empty_file_gives_defaults(write_yaml) -> None:
    config = load_config(write_yaml("empty.yaml", ""))
    assert config.models == {}
    assert config.runtime_args.num_episode == 5000


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8", 8),
        ("True", True),
        ("null", None),
        ("None", None),
        ("1.5", 1.5),
        ("[1, 2]", [1, 2]),
        ("{'a': 1}", {"a": 1}),
        ("'quoted'", "quoted"),
        ("hello", "hello"),
        ("true", "true"),  # not a Python literal: stays a string, as in ChatLearn
        ("/data/x.json", "/data/x.json"),
        ("", ""),
    ],
)
def test_substituted_values_are_python_literals(text: str, expected: object) -> None:
    assert literal(text) == expected


def test_env_var_wins_over_default(write_yaml, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_yaml(
        "main.yaml",
        dedent(
            """
        runtime:
          num_episode: ${EPISODES:7}
          sample_per_episode: ${SAMPLES:32}
          exp_name: ${EXP}
          data_shuffle: ${SHUFFLE:True}
        """
        )
        + MODELS,
    )
    monkeypatch.setenv("EPISODES", "11")
    monkeypatch.setenv("EXP", "dpo_run")
    monkeypatch.delenv("SAMPLES", raising=False)
    monkeypatch.delenv("SHUFFLE", raising=False)
    rt = load_config(path).runtime_args
    assert rt.num_episode == 11
    assert rt.sample_per_episode == 32
    assert rt.exp_name == "dpo_run"
    assert rt.data_shuffle is True


def test_a_lowercase_false_from_the_environment_says_how_to_write_it(
    write_yaml, monkeypatch: pytest.MonkeyPatch
) -> None:
    """'false' is no Python literal: it stays a string (ChatLearn would treat it as true); the
    error's fix says what to set the variable to."""
    path = write_yaml("main.yaml", "runtime:\n  data_shuffle: ${SHUFFLE:True}\n" + MODELS)
    monkeypatch.setenv("SHUFFLE", "false")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == "runtime.data_shuffle"
    assert "got the string 'false'" in info.value.problem
    assert "so set the variable to False" in info.value.fix


def test_unset_variable_without_default_is_none_with_warning(
    write_yaml, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("CHATLEARN_TEST_UNSET", raising=False)
    path = write_yaml("main.yaml", "runtime:\n  data_checkpoint_path: ${CHATLEARN_TEST_UNSET}\n")
    with caplog.at_level(logging.WARNING, logger="chatlearn.config"):
        config = load_config(path)
    assert config.runtime_args.data_checkpoint_path is None
    assert "CHATLEARN_TEST_UNSET" in caplog.text
    assert "main.yaml:2" in caplog.text


def test_substitution_in_nested_mappings_and_lists(
    write_yaml, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LR", "0.001")
    monkeypatch.setenv("GROUP", "reference,policy_trainer")
    path = write_yaml(
        "main.yaml",
        dedent(
            """
        runtime:
          colocation: ["${GROUP}"]
          optimizer:
            lr: ${LR}
            betas: {b1: "${B1:0.9}"}
        """
        )
        + MODELS,
    )
    rt = load_config(path).runtime_args
    assert rt.optimizer == {"lr": 0.001, "betas": {"b1": 0.9}}
    assert rt.colocation == [["reference", "policy_trainer"]]


def test_default_may_contain_colons(write_yaml, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("URL", raising=False)
    path = write_yaml("main.yaml", "runtime:\n  url: ${URL:http://host:8080/x}\n")
    assert load_config(path).runtime_args.url == "http://host:8080/x"


def test_text_around_a_placeholder_is_kept_literally_and_said(
    write_yaml, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_yaml("main.yaml", "runtime:\n  note: see ${HOME}\n  plain: $HOME {x}\n")
    with caplog.at_level(logging.WARNING, logger="chatlearn.config"):
        config = load_config(path)
    assert config.runtime_args.note == "see ${HOME}"  # as ChatLearn keeps it
    (warning,) = [r.getMessage() for r in caplog.records if "holds a placeholder" in r.getMessage()]
    assert "main.yaml:2: runtime.note: 'see ${HOME}' holds a placeholder inside" in warning


def test_an_empty_config_file_is_said(write_yaml, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="chatlearn.config"):
        load_config(write_yaml("main.yaml", "# nothing yet\n"))
    assert "main.yaml: the config file holds no settings" in caplog.text


def test_includes_merge_in_order(write_yaml) -> None:
    write_yaml(
        "base.yaml",
        """
        runtime:
          num_episode: 1
          sample_per_episode: 8
          optimizer: {lr: 0.1, eps: 1.0e-8}
        models:
          reference: {num_cpu: 1}
        """,
    )
    write_yaml(
        "override.yaml",
        """
        runtime:
          num_episode: 2
          optimizer: {lr: 0.2}
        """,
    )
    path = write_yaml(
        "main.yaml",
        """
        includes:
          - base.yaml
          - override.yaml
        runtime:
          sample_per_episode: 16
        models:
          reference: {generation_batch_size: 4}
        """,
    )
    config = load_config(path)
    rt = config.runtime_args
    assert rt.num_episode == 2  # later include overrides earlier
    assert rt.sample_per_episode == 16  # own keys override includes
    assert rt.optimizer == {"lr": 0.2, "eps": 1.0e-8}  # nested mappings deep-merge
    reference = config.models["reference"]
    assert (reference.num_cpu, reference.generation_batch_size) == (1, 4)


def test_includes_are_recursive_and_relative_to_the_main_config(write_yaml, tmp_path) -> None:
    write_yaml("conf/common/leaf.yaml", "runtime:\n  num_episode: 9\n  seed: 1\n")
    # a nested include is still resolved against the main config's directory
    write_yaml("conf/common/mid.yaml", "includes: [common/leaf.yaml]\nruntime:\n  seed: 2\n")
    path = write_yaml("conf/main.yaml", "includes: [common/mid.yaml]\n")
    rt = load_config(path).runtime_args
    assert (rt.num_episode, rt.seed) == (9, 2)


def test_a_nested_include_not_beside_the_main_config_is_found_beside_its_includer(
    write_yaml,
) -> None:
    # A config of one's own that includes an example's file (which includes dpo.yaml beside
    # it) failed: "included file 'dpo.yaml' not found (looked for <own dir>/dpo.yaml)"
    write_yaml("examples/dpo.yaml", "runtime:\n  num_episode: 9\n  seed: 1\n")
    write_yaml("examples/dpo_fsdp.yaml", "includes: [dpo.yaml]\nruntime:\n  seed: 2\n")
    path = write_yaml("mine/lora.yaml", "includes: [../examples/dpo_fsdp.yaml]\n")
    rt = load_config(path).runtime_args
    assert (rt.num_episode, rt.seed) == (9, 2)
    # the main config's directory first, as ChatLearn: a file of that name there wins
    write_yaml("mine/dpo.yaml", "runtime:\n  num_episode: 3\n")
    assert load_config(path).runtime_args.num_episode == 3
    # a model config file named in an included file, likewise
    write_yaml("examples/model.yaml", "hidden: 7\n")
    write_yaml(
        "examples/models.yaml",
        "models:\n  policy:\n    num_cpu: 1\n    model_config_file: model.yaml\n",
    )
    own = write_yaml("mine/models.yaml", "includes: [../examples/models.yaml]\n")
    assert load_config(own).models["policy"].model_args["hidden"] == 7
    # found in neither: both places named
    write_yaml("examples/mid.yaml", "includes: [nowhere.yaml]\n")
    with pytest.raises(ConfigError) as error:
        load_config(write_yaml("mine/bad.yaml", "includes: [../examples/mid.yaml]\n"))
    assert "mine/nowhere.yaml, " in error.value.problem, error.value
    assert "examples/nowhere.yaml)" in error.value.problem, error.value


def test_include_path_from_environment(write_yaml, monkeypatch: pytest.MonkeyPatch) -> None:
    write_yaml("a.yaml", "runtime:\n  seed: 5\n")
    monkeypatch.setenv("BASE_CONFIG", "a.yaml")
    path = write_yaml("main.yaml", 'includes: ["${BASE_CONFIG}"]\n')
    assert load_config(path).runtime_args.seed == 5


def test_diamond_includes_are_not_a_cycle(write_yaml) -> None:
    write_yaml("d.yaml", "runtime:\n  seed: 4\n")
    write_yaml("b.yaml", "includes: [d.yaml]\n")
    write_yaml("c.yaml", "includes: [d.yaml]\n")
    path = write_yaml("main.yaml", "includes: [b.yaml, c.yaml]\n")
    assert load_config(path).runtime_args.seed == 4


def test_model_config_file_becomes_model_args(write_yaml, monkeypatch) -> None:
    monkeypatch.setenv("HIDDEN", "64")
    write_yaml("models/base_model.yaml", "hidden_size: 32\nnum_layers: 2\n")
    write_yaml(
        "models/policy.yaml",
        """
        includes: [models/base_model.yaml]
        hidden_size: ${HIDDEN}
        model_path: /ckpt/policy
        """,
    )
    path = write_yaml(
        "main.yaml",
        """
        models:
          policy_trainer:
            num_cpu: 1
            trainable: true
            model_config_file: models/policy.yaml
        """,
    )
    model = load_config(path).models["policy_trainer"]
    assert model.model_args == {"hidden_size": 64, "num_layers": 2, "model_path": "/ckpt/policy"}
    assert model.args_dict is model.model_args  # ChatLearn's name


def test_model_config_file_reads_as_the_path_it_was_read_from(
    write_yaml, tmp_path, monkeypatch
) -> None:
    # ChatLearn's tests/base/test_exp.py::test_args: `-c configs/base.yaml` with
    # `model_config_file: model.yaml` reads back as configs/model.yaml (it stayed model.yaml)
    write_yaml("configs/model.yaml", "lr: 0.1\n")
    write_yaml(
        "configs/base.yaml",
        "models:\n  policy:\n    num_cpu: 1\n    model_config_file: model.yaml\n",
    )
    monkeypatch.chdir(tmp_path)
    config = load_config("configs/base.yaml")
    policy = config.models["policy"]
    assert policy.model_config_file == os.path.join("configs", "model.yaml")
    assert config.where("models.policy.model_config_file").endswith("base.yaml:4")
    assert Config.from_dict(config.to_dict()).models["policy"].model_args == {"lr": 0.1}
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # a file outside the working directory: absolute
    elsewhere = Config(
        {"models": {"p": {"num_cpu": 1, "model_config_file": "model.yaml"}}}, tmp_path / "configs"
    )
    assert elsewhere.models["p"].model_config_file == str(tmp_path / "configs" / "model.yaml")


def test_parallel_sizes_come_from_model_config_file(write_yaml) -> None:
    write_yaml("policy.yaml", "tensor_model_parallel_size: 2\npipeline_model_parallel_size: 2\n")
    path = write_yaml(
        "main.yaml",
        """
        models:
          policy:
            num_gpu: 8
            model_config_file: policy.yaml
        runtime:
          sample_per_episode: 16
        """,
    )
    model = load_config(path).models["policy"]
    assert model.tensor_model_parallel_size == 2
    assert model.pipeline_model_parallel_size == 2
    assert model.num_replica == 2


def test_num_device_alias(write_yaml) -> None:
    path = write_yaml(
        "main.yaml",
        """
        models:
          reference: {num_device: 2}
          policy: {num_device: 1, num_gpu: 1, trainable: true}
        runtime: {sample_per_episode: 16}
        """,
    )
    config = load_config(path)
    assert config.models["reference"].num_gpu == 2
    assert config.models["reference"].num_device == 2
    assert config.models["policy"].num_gpu == 1


def test_rlhf_is_read_as_runtime(write_yaml, caplog: pytest.LogCaptureFixture) -> None:
    path = write_yaml("main.yaml", "rlhf:\n  num_episode: 3\n")
    with caplog.at_level(logging.WARNING, logger="chatlearn.config"):
        config = load_config(path)
    assert config.runtime_args.num_episode == 3
    assert "rlhf is deprecated" in caplog.text


def test_unknown_section_is_kept_with_a_warning(
    write_yaml, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_yaml(
        "main.yaml",
        """
        defaults: &defaults
          num_cpu: 1
        models:
          reference:
            <<: *defaults
            generation_batch_size: 4
        """,
    )
    with caplog.at_level(logging.WARNING, logger="chatlearn.config"):
        config = load_config(path)
    assert config.extra == {"defaults": {"num_cpu": 1}}
    assert config.models["reference"].num_cpu == 1  # YAML anchors and merge keys work
    assert "unknown top-level section 'defaults'" in caplog.text
    assert "main.yaml:1" in caplog.text


def test_near_miss_keys_are_kept_with_a_hint(write_yaml, caplog) -> None:
    path = write_yaml(
        "main.yaml",
        """
        models:
          reference: {num_cpu: 1, generation_batch: 4}
        runtime:
          train_micro_batch: 4
        """,
    )
    with caplog.at_level(logging.WARNING, logger="chatlearn.config"):
        config = load_config(path)
    assert config.runtime_args.train_micro_batch == 4
    assert "did you mean train_micro_batch_size?" in caplog.text
    assert "did you mean generation_batch_size?" in caplog.text
    assert "main.yaml:4" in caplog.text


def test_paths_in_messages_are_relative_to_the_working_directory(
    write_yaml, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = write_yaml("conf/main.yaml", "runtime:\n  train_micro_batch_size: x\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config("conf/main.yaml")
    assert info.value.where == "conf/main.yaml:2"
    assert path.exists()


def test_inline_model_args_extend_the_model_config_file(write_yaml) -> None:
    write_yaml("policy.yaml", "lr: 0.1\noptim: {beta: 0.9, eps: 1.0e-8}\n")
    path = write_yaml(
        "main.yaml",
        """
        models:
          policy:
            num_cpu: 1
            model_config_file: policy.yaml
            model_args: {lr: 0.2, optim: {beta: 0.5}}
          reference:
            num_cpu: 1
            model_args: {path: /x}
        """,
    )
    config = load_config(path)
    assert config.models["policy"].model_args == {"lr": 0.2, "optim": {"beta": 0.5, "eps": 1.0e-8}}
    assert config.models["reference"].model_args == {"path": "/x"}


def test_model_config_file_of_a_config_built_in_code(write_yaml, tmp_path, monkeypatch) -> None:
    write_yaml("conf/policy.yaml", "lr: 0.3\n")
    config = Config(
        {"models": {"p": {"num_cpu": 1, "model_config_file": "policy.yaml"}}}, tmp_path / "conf"
    )
    assert config.models["p"].model_args == {"lr": 0.3}
    monkeypatch.chdir(tmp_path / "conf")  # without config_dir: the working directory
    assert init({"models": {"p": {"num_cpu": 1, "model_config_file": "policy.yaml"}}}).models[
        "p"
    ].model_args == {"lr": 0.3}
