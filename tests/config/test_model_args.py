"""Model arguments checked before the actors start (the config) and as they start (chatlearn.hf),
and the pieces of the one-line report: the hook `init()` installs and remote config errors."""

from __future__ import annotations

import sys

import pytest

from chatlearn.actors.errors import ActorError
from chatlearn.config import Config, ConfigError, init, load_config, set_args
from chatlearn.config.report import config_error_line, excepthook

MAIN = "models:\n  reference:\n    num_cpu: 1\n    model_config_file: model.yaml\n"


def model_error(write_yaml, model_yaml: str) -> ConfigError:
    write_yaml("model.yaml", model_yaml)
    with pytest.raises(ConfigError) as info:
        load_config(write_yaml("main.yaml", MAIN))
    return info.value


@pytest.mark.parametrize(
    "model_yaml",
    [
        "learning_rate: 1e-6\n",  # YAML 1.1 reads this as a string; float() does not mind
        "learning_rate: null\nmax_grad_norm: null\nadam_betas: [0.9, 0.95]\n",
        "model_config: {hidden_size: 96, num_attention_heads: 6, num_key_value_heads: 2}\n",
        "my_own_key: fast\nloss_type: my_own_loss\n",  # the module's business
    ],
)
def test_model_args_that_work_are_accepted(write_yaml, model_yaml: str) -> None:
    write_yaml("model.yaml", model_yaml)
    load_config(write_yaml("main.yaml", MAIN))


def test_inline_model_args_are_checked_where_written(write_yaml) -> None:
    path = write_yaml(
        "main.yaml", "models:\n  policy:\n    num_cpu: 1\n    model_args:\n      beta: zero\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.where.endswith("main.yaml:5")
    assert info.value.key == "models.policy.model_args.beta"


@pytest.mark.parametrize(
    ("model_yaml", "key", "problem"),
    [
        ("parallel: zero3\n", "parallel", "must be one of ddp, fsdp, none"),
        ("packing: sometimes\n", "packing", "expected true or false"),
        ("max_tokens_per_row: 0\n", "max_tokens_per_row", "must be ≥ 1"),
    ],
)
def test_layout_keys_are_checked_before_actors_start(
    write_yaml, model_yaml: str, key: str, problem: str
) -> None:
    write_yaml("model.yaml", model_yaml + "mixed_precision: no\n")  # YAML's `no` is false: fine
    with pytest.raises(ConfigError) as info:
        load_config(write_yaml("main.yaml", MAIN))
    assert info.value.key.endswith(f"model_args.{key}") and problem in str(info.value)
    assert info.value.where.endswith("model.yaml:1")


def test_model_args_set_in_code_are_checked() -> None:
    config = Config({"models": {"policy": {"num_cpu": 1}}})
    config.models["policy"].model_args["warmup_ratio"] = 2
    with pytest.raises(ConfigError, match="must be ≤ 1") as info:
        config.validate()
    assert info.value.key == "models.policy.model_args.warmup_ratio"


@pytest.mark.parametrize(
    ("model_yaml", "key", "words"),
    [
        # SMALL_LLAMA's hidden_size (192) is not written: only the module knows it
        ("model_config:\n  num_attention_heads: 5\n", "model_config.num_attention_heads", "192"),
        ("dtype: float33\n", "dtype", "unknown dtype"),
        ("loss_type: sigmod\n", "loss_type", "unknown loss type"),
        ("model_path: /nonexistent/checkpoint\n", "model_path", "not a directory"),
    ],
)
def test_hf_modules_reject_their_args_naming_file_and_key(
    write_yaml, model_yaml: str, key: str, words: str
) -> None:
    from chatlearn.hf.model import validate_model_args

    write_yaml("model.yaml", "seed: 0\n" + model_yaml)
    config = load_config(write_yaml("main.yaml", MAIN))
    set_args(config)  # as in an actor: the shipped config, with the files' lines
    with pytest.raises(ConfigError) as info:
        validate_model_args(config.models["reference"].model_args)
    assert info.value.where.endswith("model.yaml:2") or info.value.where.endswith("model.yaml:3")
    assert info.value.key == f"models.reference.model_args.{key}" and words in str(info.value)
    with pytest.raises(ConfigError) as unknown:  # args of no configured model: key only
        validate_model_args(dict(config.models["reference"].model_args))
    assert unknown.value.key == f"model_args.{key}" and unknown.value.where is None


def test_remote_config_error_is_one_line_other_remote_errors_are_not() -> None:
    context = {"model": "policy", "rank": 1, "method": "setup"}
    remote = ActorError(
        "ConfigError", "m.yaml:3: models.policy.x: bad\n  fix: set x: 1", "", context
    )
    assert config_error_line(remote) == (
        "m.yaml:3: models.policy.x: bad (fix: set x: 1) [model policy, rank 1, in setup]"
    )
    assert config_error_line(ActorError("ValueError", "bad", "", context)) is None
    assert config_error_line(ValueError("bad")) is None


def test_init_installs_the_hook_and_still_raises(
    tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[BaseException] = []
    monkeypatch.setattr(sys, "excepthook", lambda t, e, tb: seen.append(e))
    with pytest.raises(ConfigError):  # a script that catches ConfigError keeps working
        init(tmp_path / "missing.yaml")
    assert sys.excepthook is excepthook
    init(Config())
    assert sys.excepthook is excepthook  # installed once, chained to the hook before it
    other = RuntimeError("not a config error")
    sys.excepthook(RuntimeError, other, None)
    assert seen == [other]
    monkeypatch.delenv("CHATLEARN_DEBUG", raising=False)
    error = ConfigError("bad", where="a.yaml:1", key="runtime.x", fix="set x: 1")
    with pytest.raises(SystemExit) as stop:
        sys.excepthook(ConfigError, error, None)
    assert stop.value.code == 2 and seen == [other]
    assert capsys.readouterr().err == "a.yaml:1: runtime.x: bad (fix: set x: 1)\n"


def test_an_inline_model_arg_that_overrides_the_model_file_is_said_where_written(
    write_yaml,
) -> None:
    # the inline value wins over the model's file, and so does its place in an error
    write_yaml("model.yaml", "seed: 0\nlearning_rate: 3.0e-3\nlora: {r: 4}\n")
    write_yaml(
        "base.yaml", "models:\n  policy:\n    num_cpu: 1\n    model_config_file: model.yaml\n"
    )
    path = write_yaml(
        "main.yaml",
        "includes: [base.yaml]\nmodels:\n  policy:\n    model_args:\n"
        "      lora: {alpha: 8}\n      learning_rate: fast\n",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == "models.policy.model_args.learning_rate"
    assert info.value.where.endswith("main.yaml:6"), info.value.where
    assert "'fast'" in info.value.problem
    # keys only the file set keep the file's lines; a merged section's keys, each its own
    config = load_config(write_yaml("main.yaml", path.read_text().replace("fast", "1e-3")))
    where = config.where
    assert where("models.policy.model_args.seed").endswith("model.yaml:1")
    assert where("models.policy.model_args.lora.r").endswith("model.yaml:3")
    assert where("models.policy.model_args.lora.alpha").endswith("main.yaml:5")
    assert where("models.policy.model_args.learning_rate").endswith("main.yaml:6")


@pytest.mark.parametrize(
    ("model_yaml", "key", "problem"),
    [
        ('prompt_template: "Q: {question}"\n', "prompt_template", "has no {prompt}"),
        ("max_length: 64\nmin_prompt_length: 64\n", "min_prompt_length", "not below max_length"),
        ("min_prompt_length: 600\n", "min_prompt_length", "not below max_length (512)"),
    ],
)
def test_data_settings_are_checked_before_actors_start(
    write_yaml, model_yaml: str, key: str, problem: str
) -> None:
    # found at the first build_dataset, after both models had loaded, as a traceback
    error = model_error(write_yaml, model_yaml)
    assert error.key.endswith(f"model_args.{key}") and problem in str(error)
    assert error.where.endswith("model.yaml:" + str(model_yaml.count("\n")))
