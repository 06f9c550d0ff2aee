"""init/get_args/set_args, the -c/--config flag, config built in code, and the wire form."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

import chatlearn.config as config_module
from chatlearn.config import (
    Config,
    ConfigError,
    ModelConfig,
    config_path_from_argv,
    get_args,
    init,
    set_args,
)

DPO_YAML = """
runtime_env:
  platform: local
models:
  reference:
    num_cpu: 1
    generation_batch_size: 4
  policy_trainer:
    num_cpu: 1
    trainable: true
    model_config_file: policy.yaml
runtime:
  num_episode: 2
  sample_per_episode: 16
  train_micro_batch_size: 2
  train_global_batch_size: 8
  colocation: ["reference,policy_trainer"]
  user_key: {nested: [1, 2.5, "x", null, true]}
"""


@pytest.fixture
def dpo_yaml(write_yaml) -> Path:
    write_yaml("policy.yaml", "hidden_size: 16\nlr: 1.0e-4\n")
    return write_yaml("dpo.yaml", DPO_YAML)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], None),
        (["-c", "a.yaml"], "a.yaml"),
        (["--config", "a.yaml"], "a.yaml"),
        (["--config=a.yaml"], "a.yaml"),
        (["-ca.yaml"], "a.yaml"),
        (["--lr", "0.1", "-c", "a.yaml", "--epochs", "3"], "a.yaml"),
        (["-c", "a.yaml", "-c", "b.yaml"], "b.yaml"),  # the last one wins, as with argparse
        (["--", "-c", "a.yaml"], None),  # after "--" everything belongs to the program
        (["-cuda"], None),  # a user's own single-dash flag is left alone
        (["--config-name", "x"], None),
    ],
)
def test_config_flag(argv: list[str], expected: str | None) -> None:
    assert config_path_from_argv(argv) == expected


@pytest.mark.parametrize("argv", [["-c"], ["--config", "--other"], ["--config="]])
def test_config_flag_without_a_file(argv: list[str]) -> None:
    with pytest.raises(ConfigError, match="command line"):
        config_path_from_argv(argv)


def test_init_reads_the_flag_and_leaves_user_flags(
    dpo_yaml: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = ["train.py", "--lr", "0.5", "-c", str(dpo_yaml), "--name", "run1"]
    monkeypatch.setattr(sys, "argv", argv)
    config = init()
    assert get_args() is config
    assert config.runtime_args.num_episode == 2
    assert sys.argv == argv  # untouched
    # the user's own argparse still works (it must ignore -c itself, as with ChatLearn)
    parser = argparse.ArgumentParser()
    parser.add_argument("--lr", type=float)
    parser.add_argument("--name")
    known, _ = parser.parse_known_args()
    assert (known.lr, known.name) == (0.5, "run1")


def test_init_without_flag_gives_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["train.py", "--epochs", "3"])
    config = init()
    assert config.models == {} and config.config_file is None
    assert config.runtime_args.sample_per_episode == 1000


def test_init_with_a_dict_or_config_or_path(dpo_yaml: Path) -> None:
    config = init(
        {
            "runtime": {"sample_per_episode": 8},
            "models": {"reference": {"num_cpu": 1}, "policy_trainer": {"num_gpu": 1}},
        }
    )
    assert get_args() is config and config.config_file is None
    assert config.model("policy_trainer").num_gpu == 1
    built = Config()
    built.add_model("reference", num_cpu=2)
    assert init(built) is built and get_args() is built
    from_path = init(str(dpo_yaml))
    assert from_path.models["policy_trainer"].model_args["hidden_size"] == 16
    with pytest.raises(ConfigError, match="init"):
        init(42)  # type: ignore[arg-type]


def test_a_node_of_a_multi_node_job_leaves_the_training_to_node_0(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """ChatLearn's multi-node jobs start the script on every node with RANK and WORLD_SIZE set;
    its init() lets node 0 drive and the others exit. Here each node ran the whole training
    on its own host, into the same output directory."""
    sections = {"models": {"reference": {"num_cpu": 1}}}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with caplog.at_level("WARNING"), pytest.raises(SystemExit) as info:
        init(sections)
    assert info.value.code == 0
    assert "RANK=1 of WORLD_SIZE=2 in the environment" in caplog.text
    assert "chatlearn launch --hostfile" in caplog.text
    caplog.clear()
    monkeypatch.setenv("RANK", "0")
    with caplog.at_level("WARNING"):
        assert init(sections) is get_args()
    assert "this run trains on this host alone" in caplog.text
    caplog.clear()
    # not a job of several nodes, or chatlearn launch's own coordinator: nothing said
    for env in ({"WORLD_SIZE": "1", "RANK": "0"}, {"WORLD_SIZE": "2", "CHATLEARN_LAUNCH": "1"}):
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        with caplog.at_level("WARNING"):
            init(sections)
        assert "WORLD_SIZE" not in caplog.text
        monkeypatch.delenv("CHATLEARN_LAUNCH", raising=False)
    # nor in an actor process, where RANK is its rank in its model (a script that calls
    # init() at its top level runs it there too)
    monkeypatch.setenv("WORLD_SIZE", "2")
    worker = type(sys)("worker")
    worker.__spec__ = type("Spec", (), {"name": "chatlearn.actors.worker"})()
    monkeypatch.setitem(sys.modules, "__main__", worker)
    with caplog.at_level("WARNING"):
        init(sections)
    assert "WORLD_SIZE" not in caplog.text


def test_get_args_before_init() -> None:
    with pytest.raises(ConfigError) as info:
        get_args()
    assert "chatlearn.init()" in str(info.value)


def test_set_args_accepts_config_or_wire_form(dpo_yaml: Path) -> None:
    config = config_module.load_config(dpo_yaml)
    set_args(config)
    assert get_args() is config
    set_args(config.to_dict())
    assert get_args() == config and get_args() is not config
    with pytest.raises(ConfigError):
        set_args("nope")  # type: ignore[arg-type]


def test_wire_form_round_trips_through_msgpack(dpo_yaml: Path) -> None:
    config = config_module.load_config(dpo_yaml)
    wire = msgpack.unpackb(msgpack.packb(config.to_dict()))
    copy = Config.from_dict(wire)
    assert copy == config
    assert copy.to_dict() == config.to_dict()
    assert copy.models["policy_trainer"].model_args == {"hidden_size": 16, "lr": 1.0e-4}
    assert copy.runtime_args.user_key == {"nested": [1, 2.5, "x", None, True]}
    assert copy.runtime_args.colocation == [["reference", "policy_trainer"]]
    # error locations travel along
    with pytest.raises(ConfigError) as info:
        copy.runtime_args.train_global_batch_size = 7
        copy.validate()
    assert info.value.where == "config built in code"


def test_wire_form_does_not_reread_model_files(dpo_yaml: Path) -> None:
    config = config_module.load_config(dpo_yaml)
    wire = config.to_dict()
    (dpo_yaml.parent / "policy.yaml").unlink()
    assert Config.from_dict(wire).models["policy_trainer"].model_args["lr"] == 1.0e-4


def test_code_changes_reach_the_wire_form(dpo_yaml: Path) -> None:
    config = config_module.load_config(dpo_yaml)
    config.runtime_args.num_episode = 7
    config.runtime_args.my_setting = "abc"
    config.models["reference"].generation_batch_size = 2
    config.models["policy_trainer"].model_args["lr"] = 0.5
    config.models["extra_model"] = ModelConfig(num_cpu=1)
    config.validate()
    copy = Config.from_dict(msgpack.unpackb(msgpack.packb(config.to_dict())))
    assert copy.runtime_args.num_episode == 7
    assert copy.runtime_args.my_setting == "abc"
    assert copy.models["reference"].generation_batch_size == 2
    assert copy.models["policy_trainer"].model_args["lr"] == 0.5
    assert copy.models["extra_model"].num_cpu == 1
    # the new model is attached: it sees the runtime's generation_batch_size
    assert copy.models["extra_model"].generation_batch_size == 2


def test_unshippable_values_are_rejected() -> None:
    config = Config()
    config.runtime_args.when = object()
    with pytest.raises(ConfigError) as info:
        config.validate()
    assert info.value.key == "runtime.when"
    config.runtime_args.when = {1: "a"}
    with pytest.raises(ConfigError, match="not a string"):
        config.to_dict()
    config.runtime_args.when = ("a", "b")  # tuples travel as lists
    assert config.to_dict()["runtime"]["when"] == ["a", "b"]


def test_rlhf_args_alias() -> None:
    config = Config()
    assert config.rlhf_args is config.runtime_args


def test_chatlearn_keys_without_effect_read_chatlearns_defaults(dpo_yaml: Path) -> None:
    """ChatLearn's config classes always have these attributes: a program that reads one
    (`self.module_args.offload_weights`, `runtime_args.data_rerank`) gets ChatLearn's value."""
    config = config_module.load_config(dpo_yaml)
    runtime, policy = config.runtime_args, config.models["policy_trainer"]
    assert (runtime.data_rerank, runtime.max_data_ckpt_nums, runtime.debug) == (True, None, False)
    assert runtime.stream_data_loader_type == "fixed" and runtime.get("max_relay_episode") == 0
    assert (policy.fsdp_size, policy.sp_size, policy.sync_frequency, policy.model_type) == (
        1,
        1,
        1,
        "",
    )
    assert policy.config_dir == config.config_dir == str(dpo_yaml.parent)
    # derived from free_memory, as ChatLearn's validation does (gradients: trainers only)
    assert (policy.offload_weights, policy.free_grad_buffers) == (False, False)
    for name in ("policy_trainer", "reference"):
        config.models[name].free_memory = True
    reference = config.models["reference"]
    assert (policy.offload_weights, policy.offload_optimizer_states) == (True, True)
    assert (reference.offload_weights, reference.free_grad_buffers) == (True, False)
    runtime.data_rerank = False  # a value given wins
    assert runtime.data_rerank is False
    with pytest.raises(AttributeError, match="runtime has no key 'data_reank'"):
        runtime.data_reank  # noqa: B018
    # and in the form shipped to the actors
    shipped = Config.from_dict(config.to_dict())
    assert shipped.models["policy_trainer"].free_grad_buffers is True
    assert shipped.models["policy_trainer"].config_dir == config.config_dir


def test_config_reaches_another_process(dpo_yaml: Path) -> None:
    """The actor side: a fresh interpreter installs the shipped config with set_args."""
    config = config_module.load_config(dpo_yaml)
    config.runtime_args.num_episode = 3
    code = (
        "import sys, json, msgpack\n"
        "from chatlearn.config import set_args, get_args\n"
        "set_args(msgpack.unpackb(sys.stdin.buffer.read()))\n"
        "args = get_args()\n"
        "print(json.dumps([args.runtime_args.num_episode,"
        " args.models['policy_trainer'].model_args, args.model('reference').forward_chunk_size]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        input=msgpack.packb(config.to_dict()),
        capture_output=True,
        timeout=60,
        check=True,
    )
    assert json.loads(result.stdout) == [3, {"hidden_size": 16, "lr": 1.0e-4}, 4]
