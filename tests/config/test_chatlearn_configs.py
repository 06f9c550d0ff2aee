"""ChatLearn's own DPO config trees load unchanged (issue 16): numbers, duplicate keys,
`_args_dict`, `output_dir/exp_name`, and unknown keys logged once with their file:line.

The trees in `chatlearn_dpo/` reproduce the shape of ChatLearn's llama2 and qwen2 Megatron DPO
configs (see its README), including the duplicate key each of them has.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from chatlearn.config import Config, ConfigError, load_config
from chatlearn.config.loader import ConfigLoader

TREES = Path(__file__).parent / "chatlearn_dpo"


@pytest.fixture
def run_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The variables a ChatLearn run script exports before `python train_dpo.py -c dpo.yaml`."""
    monkeypatch.delenv("CHATLEARN_STRICT_CONFIG", raising=False)
    monkeypatch.setenv("output_dir", str(tmp_path / "out"))
    monkeypatch.setenv("data_path", str(tmp_path / "data.jsonl"))
    return tmp_path


def load(tree: str, caplog: pytest.LogCaptureFixture) -> Config:
    with caplog.at_level(logging.WARNING, logger="chatlearn.config"):
        return load_config(TREES / tree / "dpo.yaml")


def test_llama2_tree_loads_unchanged(run_env: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = load("llama2", caplog)
    policy = config.model("policy")
    # the last of the duplicate keys wins, as in ChatLearn; the warning names both places
    assert policy.model_args["recompute_granularity"] == "full"
    duplicate = [r.getMessage() for r in caplog.records if "duplicate key" in r.getMessage()]
    assert len(duplicate) == 1, caplog.text
    assert "ppo_policy.yaml:16: duplicate key recompute_granularity" in duplicate[0]
    assert "also set at " in duplicate[0] and "ppo_policy.yaml:13" in duplicate[0]
    # scientific notation is a number, also from a ${name:default}
    assert policy.model_args["learning_rate"] == pytest.approx(5e-3)
    assert policy.model_args["min_lr"] == pytest.approx(1e-9)
    assert policy.model_args["lr"] == pytest.approx(5e-7)
    assert policy.tensor_model_parallel_size == 8  # read from the included base.yaml
    assert config.runtime_args.colocation == [["policy", "reference"]]
    assert config.runtime_args.output_dir == str(run_env / "out" / "chatlearn")


def test_qwen2_tree_loads_unchanged(run_env: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = load("qwen2", caplog)
    trainer = config.model("policy_trainer").model_args
    assert trainer["learning_rate"] == pytest.approx(2e-6)  # the second (last) learning_rate
    assert "policy_trainer.yaml:12: duplicate key learning_rate" in caplog.text
    assert "policy_trainer.yaml:5" in caplog.text
    numbers = {k: trainer[k] for k in ("min_lr", "weight_decay", "adam_eps", "dpo_beta")}
    assert numbers == {"min_lr": 5e-7, "weight_decay": 0.1, "adam_eps": 1e-8, "dpo_beta": -0.1}
    assert trainer["rotary_base"] == 1e6 and trainer["train_iters"] == 1000
    assert config.runtime_args.save_episode_interval == 1000  # ${...:1e3} on an int key
    assert config.runtime_args.output_dir == str(run_env / "out" / "qwen2_dpo")


def test_strict_mode_keeps_the_duplicate_key_error(
    run_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHATLEARN_STRICT_CONFIG", "1")
    with pytest.raises(ConfigError) as info:
        load_config(TREES / "qwen2" / "dpo.yaml")
    assert info.value.where.endswith("policy_trainer.yaml:12")
    assert "policy_trainer.yaml:5" in info.value.problem
    assert "CHATLEARN_STRICT_CONFIG" in info.value.fix


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("5e-3", 5e-3),
        ("1e5", 1e5),
        ("-1E-4", -1e-4),
        ("+2e+3", 2e3),
        ("1.0e5", 1e5),
        (".5e3", 500.0),
        (".5", 0.5),
        ("1_000", 1000),
        ("3.0e-3", 3e-3),
        ("1e", "1e"),
        ("e5", "e5"),
        ("5e-3x", "5e-3x"),
        ("'5e-3'", "5e-3"),  # quoted: a string here; a key that takes a number reads it (below)
    ],
)
def test_numbers_as_chatlearn_reads_them(text: str, value: object) -> None:
    loaded = yaml.load(f"key: {text}\n", ConfigLoader)["key"]
    assert loaded == value and type(loaded) is type(value)


def test_the_number_rule_is_not_global() -> None:
    assert yaml.safe_load("key: 5e-3") == {"key": "5e-3"}  # PyYAML's own loaders are unchanged


def test_quoted_numbers_are_read_as_numbers_where_the_key_takes_one(write_yaml) -> None:
    # ChatLearn reads every string of its files that looks like a number as one; here
    # `learning_rate: "1e-5"` stayed the string "1e-5" in model_args (a module's optimizer then
    # failed on it) and `num_episode: "2"` was an error
    write_yaml("model.yaml", 'learning_rate: "1e-5"\nmax_length: "64"\nmy_key: "7"\n')
    path = write_yaml(
        "main.yaml",
        """
        models:
          policy: {num_cpu: "1", trainable: true, model_config_file: model.yaml}
        runtime:
          num_episode: "2"
          heartbeat_timeout: "30"
          exp_name: "2024"
        """,
    )
    config = load_config(path)
    runtime, policy = config.runtime_args, config.model("policy")
    assert runtime.num_episode == 2 and type(runtime.num_episode) is int
    assert runtime.heartbeat_timeout == 30.0 and runtime.exp_name == "2024"
    assert policy.num_cpu == 1 and type(policy.num_cpu) is int
    assert policy.model_args["learning_rate"] == 1e-5 and policy.model_args["max_length"] == 64
    assert policy.model_args["my_key"] == "7"  # a module's own key: its business


def test_quoted_and_float_written_lora_numbers_are_its_numbers() -> None:
    # the nested lora section's numbers too: `r: "16"` was "expected a whole number" and
    # `r: 1.6e1` (a float in YAML as ChatLearn reads it) the same
    from chatlearn.config.model_args import lora_request

    def error(key: str, problem: str, fix: str) -> Exception:
        return ValueError(f"{key}: {problem}")

    lora = {"r": "16", "alpha": "32", "dropout": "0.05"}
    settings = lora_request({"lora": lora}, "model_args", error)
    assert settings is not None
    assert (settings["r"], settings["alpha"], settings["dropout"]) == (16, 32.0, 0.05)
    assert type(settings["r"]) is int
    settings = lora_request({"lora": {"r": 1.6e1}}, "model_args", error)
    assert settings is not None and settings["r"] == 16 and type(settings["r"]) is int
    with pytest.raises(ValueError, match="model_args.lora.r"):
        lora_request({"lora": {"r": "sixteen"}}, "model_args", error)


@pytest.mark.parametrize(
    ("where", "line", "problem"),
    [
        ("main.yaml:2", 'runtime:\n  num_episode: "many"\n', "got the string 'many'"),
        ("main.yaml:2", 'runtime:\n  num_episode: "2.5"\n', "expected a whole number, got 2.5"),
        ("model.yaml:1", "models:\n  p: {num_cpu: 1, model_config_file: model.yaml}\n", "'fast'"),
    ],
)
def test_a_quoted_non_number_is_the_keys_one_line_error(
    write_yaml, where: str, line: str, problem: str
) -> None:
    write_yaml("model.yaml", 'learning_rate: "fast"\n')
    path = write_yaml("main.yaml", line)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.where is not None and info.value.where.endswith(where), info.value
    assert problem in info.value.problem


def test_args_dict_is_a_live_view(write_yaml) -> None:
    path = write_yaml(
        "main.yaml",
        """
        models:
          policy: {num_cpu: 1, trainable: true, my_model_key: 3}
        runtime:
          data_path: /data/train.jsonl
          my_key: 7
        """,
    )
    config = load_config(path)
    view = config.runtime_args._args_dict
    assert view["data_path"] == "/data/train.jsonl" and view["my_key"] == 7
    assert view["num_episode"] == 5000  # known keys with their effective values
    assert "my_key" in view and "absent" not in view
    view["num_episode"] = 3  # writes go through the checks of attribute assignment
    assert config.runtime_args.num_episode == 3
    with pytest.raises(ConfigError):
        view["num_episode"] = "many"
    with pytest.raises(KeyError):
        view["absent"]
    assert config.model("policy")._args_dict["my_model_key"] == 3
    assert config.env_args._args_dict["env_vars"] == {}


def test_unknown_keys_are_warned_once_with_their_place(
    write_yaml, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_yaml(
        "main.yaml",
        """
        models:
          policy:
            num_cpu: 1
            trainable: true
            enable_lora: true
            offload_weights: true
        runtime:
          num_episod: 3
          my_key: 7
          eval_data_path: /data/eval.jsonl
          training_data_num_limit: 100
        """,
    )
    with caplog.at_level(logging.WARNING, logger="chatlearn.config"):
        config = load_config(path)
        load_config(path).validate()  # built again: no second warning
    assert config.runtime_args.my_key == 7  # kept, not an error
    lines = caplog.text.splitlines()
    assert sum("runtime.my_key" in line for line in lines) == 1
    assert "main.yaml:9: runtime.my_key: not a known key" in caplog.text
    assert "main.yaml:8: runtime.num_episod" in caplog.text and "did you mean num_episode" in (
        caplog.text
    )
    assert "main.yaml:5: models.policy.enable_lora: not read here" in caplog.text
    assert "models.policy.offload_weights: a ChatLearn setting that has no effect" in caplog.text
    # keys that ChatLearn's entry scripts read (train_dpo.py's data limits): no warning
    assert "eval_data_path" not in caplog.text and "training_data_num_limit" not in caplog.text


def test_max_data_ckpt_nums_names_the_key_that_keeps_checkpoints_here(
    write_yaml, caplog: pytest.LogCaptureFixture
) -> None:
    # ChatLearn keeps every checkpoint unless max_data_ckpt_nums says otherwise; here
    # save_keep_last (default 3) prunes them, so "no effect" alone would lose checkpoints
    path = write_yaml("main.yaml", "runtime:\n  max_data_ckpt_nums: 5\n")
    with caplog.at_level(logging.WARNING, logger="chatlearn.config"):
        load_config(path)
    (line,) = [r.getMessage() for r in caplog.records if "max_data_ckpt_nums" in r.getMessage()]
    assert "main.yaml:2: runtime.max_data_ckpt_nums:" in line and "\n" not in line
    assert "set runtime.save_keep_last instead" in line and "0 keeps all" in line


def test_query_key_is_warned_as_not_read(write_yaml, caplog: pytest.LogCaptureFixture) -> None:
    # ChatLearn's configs carry query_key but no code of ChatLearn's or ours reads it: set to
    # name the data's prompt field, it was passed over without a word
    path = write_yaml("main.yaml", "runtime:\n  query_key: question\n")
    with caplog.at_level(logging.WARNING, logger="chatlearn.config"):
        config = load_config(path)
    assert config.runtime_args.get("query_key") == "question"  # kept, as every unknown key
    (line,) = [r.getMessage() for r in caplog.records if "query_key" in r.getMessage()]
    assert "main.yaml:2: runtime.query_key: a ChatLearn setting not read here" in line
    assert "'prompt' key whatever query_key says" in line and "\n" not in line
    # ChatLearn's default, which every config of its carries: no line for it
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="chatlearn.config"):
        load_config(write_yaml("default.yaml", "runtime:\n  query_key: query\n"))
    assert not [r for r in caplog.records if "query_key" in r.getMessage()]


def test_chatlearn_sub_configs_read_by_attribute_with_its_defaults(write_yaml) -> None:
    # ChatLearn's trainers read self.module_args.lora.enable_lora (and batch_generation) of
    # every model; a models.<name>.lora section given in the file fills in over the defaults
    path = write_yaml(
        "main.yaml",
        """
        models:
          policy:
            num_cpu: 1
            trainable: true
            lora:
              lora_dim: 16
          reference:
            num_cpu: 1
        """,
    )
    config = load_config(path)
    policy, reference = config.model("policy"), config.model("reference")
    assert policy.lora.lora_dim == 16 and policy.lora.enable_lora is False
    assert policy.lora["lora_dropout"] == 0.0
    assert reference.lora.enable_lora is False and reference.batch_generation.ranking is False
    with pytest.raises(AttributeError, match="models.reference.lora has no key 'rank'"):
        reference.lora.rank  # noqa: B018
