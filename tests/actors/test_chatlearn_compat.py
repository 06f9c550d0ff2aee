"""ChatLearn programs run unchanged (issue 16): the module helpers ChatLearn's modules call, the
constructor signatures the runtime accepts, and a ChatLearn-style DPO program end to end in real
processes (`chatlearn_program/`: `_args_dict`, `learning_rate: 5e-3`, a duplicate key,
`self.tensor_model_parallel_size()`, `__init__`-less and `__init__(self, name)` modules, put/get
across models, `output_dir/exp_name`)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import actors_testlib as lib
import pytest
import torch

import chatlearn
from chatlearn.actors import BaseModule, TorchModule
from chatlearn.actors.module import ParallelSize, construct_module
from chatlearn.actors.storage import RunStorage, StorageUnavailableError
from chatlearn.actors.timers import Timers
from chatlearn.config import reset_args, set_args

PROGRAM = Path(__file__).resolve().parent / "chatlearn_program"


@pytest.fixture
def config():
    cfg = lib.make_config(
        {
            "reference": {"num_gpu": 4, "tensor_model_parallel_size": 2},
            "policy": {"num_gpu": 4, "gpu_per_process": 1, "trainable": True},
            "cpu_model": {"num_cpu": 2, "cpu_per_process": 1, "trainable": True},
        },
        {"train_micro_batch_size": 1, "train_global_batch_size": 8},
    )
    set_args(cfg)
    yield cfg
    reset_args()


def test_parallel_sizes_are_callable_ints(config) -> None:
    reference = BaseModule("reference", config)
    assert reference.tensor_model_parallel_size() == 2 == reference.tensor_model_parallel_size
    assert reference.pipeline_model_parallel_size() == 1
    assert reference.expert_model_parallel_size() == 1
    size = reference.tensor_model_parallel_size
    assert isinstance(size, int) and type(size()) is int and size * 3 == 6
    assert isinstance(ParallelSize(4), int) and ParallelSize(4)() == 4


def test_device_and_data_parallel_helpers(config) -> None:
    reference = BaseModule("reference", config)
    assert (reference.total_gpu, reference.gpu_per_process) == (4, 1)
    assert reference.num_replica == 2 and reference.num_gpu_per_replica == 2  # tp 2
    policy = TorchModule("policy", config)
    assert policy.num_replica == 1 and policy.num_gpu_per_replica == 4  # dp inside
    policy._rank, policy._world_size = 3, 4  # what the runtime sets in the actor
    assert (policy.get_data_parallel_rank(), policy.get_data_parallel_size()) == (3, 4)
    cpu = BaseModule("cpu_model", config)
    assert (cpu.total_gpu, cpu.num_gpu_per_replica) == (0, 0)
    assert reference.config_dir == config.config_dir


def test_timers() -> None:
    timers = Timers()
    timers("step").start()
    timers("step").stop()
    timers("step").start()
    assert timers("step").running
    with pytest.raises(RuntimeError, match="already running"):
        timers("step").start()
    timers("step").stop()
    assert timers("step").elapsed(reset=False) > 0
    text = timers.log()
    assert isinstance(text, str) and text.startswith("step: ") and text.endswith(" ms")
    # ChatLearn's return_dict gives the text and the dict (an unpacking of a dict of two timers
    # would bind their names without a word)
    assert timers.log(["step"], return_dict=True) == ("step: 0.00 ms", {"step": 0.0})
    with pytest.raises(RuntimeError, match="not started"):
        timers("other").stop()


def test_run_storage_round_trip(tmp_path: Path) -> None:
    storage, other = RunStorage(tmp_path), RunStorage(tmp_path)  # e.g. two models' processes
    value = {"t": torch.arange(6.0).view(2, 3), "n": [1, (2, "x")], "s": "text"}
    storage.put("a/../key with spaces", value)
    got = other.get("a/../key with spaces")
    assert torch.equal(got["t"], value["t"]) and got["n"] == [1, (2, "x")] and got["s"] == "text"
    storage.put("a/../key with spaces", 7)
    assert other.get("a/../key with spaces") == 7  # replaced whole
    with pytest.raises(KeyError, match="nothing was put under 'absent'"):
        other.get("absent")
    assert [p.name for p in (tmp_path / "storage").iterdir() if p.suffix == ".tmp"] == []


def test_put_get_on_the_template_say_where_they_work(config) -> None:
    with pytest.raises(StorageUnavailableError, match="put/get share values through"):
        BaseModule("reference", config).put("k", 1)


class NoInit(BaseModule):
    pass


class GuideInit(BaseModule):
    def __init__(self, name):
        super().__init__(name)
        self.built = True


class FullInit(BaseModule):
    def __init__(self, name, args=None, replica_id=0):
        super().__init__(name, args, replica_id)


class ExtraArg(BaseModule):
    def __init__(self, name, model_path):
        super().__init__(name)


class ForgotSuper(BaseModule):
    def __init__(self, name):
        self.name = name


@pytest.mark.parametrize("klass", [NoInit, GuideInit, FullInit])
def test_constructor_signatures_the_runtime_accepts(config, klass: type) -> None:
    module = construct_module(klass, "reference", config, 1)
    assert module.name == "reference" and module.replica_id == 1
    assert module.global_args is config and module.tensor_model_parallel_size() == 2


@pytest.mark.parametrize(
    ("klass", "problem"),
    [
        (ExtraArg, r"ExtraArg.__init__\(name, model_path\) cannot be called as"),
        (ForgotSuper, "ForgotSuper.__init__ did not call BaseModule.__init__"),
    ],
)
def test_a_wrong_constructor_says_which_signature_is_expected(
    config, klass: type, problem: str
) -> None:
    with pytest.raises(TypeError, match=problem) as info:
        construct_module(klass, "reference", config, 0)
    assert "def __init__(self, name, args=None, replica_id=0)" in str(info.value)


@pytest.mark.timeout(60)
def test_a_chatlearn_style_program_runs_unchanged(tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"x": [i, 1.0, -i, 0.5]}) + "\n" for i in range(8)))
    result = tmp_path / "result.json"
    env = {**os.environ, "data_path": str(data), "output_dir": str(tmp_path / "out")}
    env.pop("CHATLEARN_STRICT_CONFIG", None)
    proc = subprocess.run(
        [sys.executable, str(PROGRAM / "train_dpo.py"), "-c", str(PROGRAM / "dpo.yaml"),
         str(result)],
        env=env,
        capture_output=True,
        text=True,
        timeout=50,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    output_dir = tmp_path / "out" / "chatlearn"  # output_dir/exp_name, as ChatLearn
    summary = json.loads(result.read_text())
    assert summary["output_dir"] == str(output_dir)
    # the engine's timers and logging_summary(), as ChatLearn's
    assert summary["summary"]["steps"] == 4 and summary["summary"]["learn"] > 0
    assert "summary at iteration 4: learn " in proc.stderr
    records = [json.loads(line) for line in (output_dir / "report.jsonl").read_text().splitlines()]
    init, setup, validated, got, *episodes = records
    assert setup["event"] == "setup" and setup["pid"] != summary["coordinator_pid"]
    # ChatLearn's hooks around setup(): init() before, validate() after, in the model's process
    assert init == {"event": "init", "pid": setup["pid"]}
    assert validated == {"event": "validate", "optimizer": True}
    assert got["validated"] == {"model": True}  # the reference's, after its setup()
    assert (setup["tp"], setup["pp"], setup["dp"]) == (1, 1, [0, 1])
    assert setup["lr"] == pytest.approx(5e-3)  # the last of the duplicate learning_rate keys
    assert setup["gpus"] == [0, 1, 0] and setup["config_dir"] == str(PROGRAM)
    assert setup["output_dir"] == str(output_dir)
    assert setup["lora"] == [False, False] and setup["lora_dim"] == 8  # ChatLearn's defaults
    assert setup["ranking"] is False
    assert setup["active"] is True and setup["active_lora"] is False  # get_args()'s
    # what train_step appended to _metric_list: the mean of each key, prefixed, in the step's
    # metrics (ChatLearn logs them per episode)
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    train = [r for r in map(json.loads, lines) if r["kind"] == "train"]
    assert [r["train/reward_score"] for r in train] == [0.5, 1.5, 2.5, 3.5]
    assert all(r["train/n"] == 2.0 for r in train)  # micro-batches per step (4 / 2)
    assert got["event"] == "get" and got["reference"]["rank"] == 0
    assert got["reference"]["pid"] not in (setup["pid"], summary["coordinator_pid"])
    assert [e["steps"] for e in episodes] == [2, 4]  # 8 samples / global batch 4, 2 episodes
    # ChatLearn counts an episode's samples when it ends (runtime_args.consumed_samples)
    assert [e["consumed_samples"] for e in episodes] == [8, 16]
    assert all(e["timed"] == ["train_step"] for e in episodes)
    # the config's oddities were reported, not fatal
    assert "policy_trainer.yaml:7: duplicate key learning_rate" in proc.stderr
    assert "runtime.debug: a ChatLearn setting that has no effect" in proc.stderr
    assert "never awaited" not in proc.stderr  # engine.stop() called without an event loop


def test_chatlearn_names_this_runtime_lacks_say_so_on_import() -> None:
    with pytest.raises(ImportError, match="Evaluator is not provided.*set_eval_dataset.*eval_step"):
        from chatlearn import Evaluator  # noqa: F401
    # ChatLearn's engine method: not an AttributeError that names nothing to use instead
    with pytest.raises(NotImplementedError, match="set_evaluator.*set_eval_dataset"):
        chatlearn.DPOEngine.set_evaluator(None, object())  # type: ignore[arg-type]
    with pytest.raises(ImportError, match="OnlineDPOEngine is not provided.*DPOEngine"):
        from chatlearn import OnlineDPOEngine  # noqa: F401
    # the base class of ChatLearn's Hugging Face DPO example
    with pytest.raises(ImportError, match="DeepSpeedModule is not provided.*HFDPOTrainer"):
        from chatlearn import DeepSpeedModule  # noqa: F401
    # where that error sends ("chatlearn.hf's HFReference and HFDPOTrainer") imports as it reads
    from chatlearn.hf import HFDPOTrainer, HFReference
    from chatlearn.hf.modules import HFDPOTrainer as Trainer
    from chatlearn.hf.modules import HFReference as Reference

    assert (HFDPOTrainer, HFReference) == (Trainer, Reference)
    with pytest.raises(AttributeError):  # a plain typo stays a plain error
        _ = chatlearn.DPOEngin  # type: ignore[attr-defined]


def test_chatlearn_engine_attributes_and_methods(config) -> None:
    # each was a bare AttributeError
    reference, policy = BaseModule("reference", config), TorchModule("policy", config)
    engine = chatlearn.DPOEngine(reference, policy)
    assert engine.runtime_args is config.runtime_args
    assert engine.get_model("policy") is policy and engine.get_model("reference") is reference
    with pytest.raises(KeyError, match="'trainer'.*'reference', 'policy'"):
        engine.get_model("trainer")
    assert engine.evaluator is None  # as on ChatLearn's DPOEngine without set_evaluator
    refusals = {
        "set_relay_sample_manager": (lambda buffers: [],),
        "set_relay_sample_fn": (lambda buffers: [],),
        "set_parameter_sync": (policy, reference),
        "set_trainer": (object(),),
        "set_environment": (object(),),
    }
    for method, arguments in refusals.items():
        with pytest.raises(NotImplementedError) as info:
            getattr(engine, method)(*arguments)
        message = str(info.value)
        assert message.startswith(f"engine.{method}() is not provided") and "\n" not in message
    # ChatLearn asserts one dataset here and points to set_multiple_datasets
    with pytest.raises(ValueError, match="set_multiple_datasets"):
        engine.set_dataset([["a"], ["b"]])
    assert engine.set_dataset(iter([{"prompt": "a"}])) is engine


def test_chatlearn_utils_that_modules_import() -> None:
    from chatlearn import logger
    from chatlearn.utils import to_device
    from chatlearn.utils.logger import log_rank_0

    batch = {"x": torch.ones(2), "rows": [torch.zeros(1), "text"], "pair": (torch.ones(1), 3)}
    moved = to_device("meta", batch)
    assert moved is batch and batch["x"].device.type == "meta"  # dicts in place, as ChatLearn's
    assert batch["rows"][0].device.type == "meta" and batch["rows"][1] == "text"
    assert isinstance(batch["pair"], tuple) and batch["pair"][1] == 3
    assert logger.name == "ChatLearn"
    log_rank_0("hello")


def test_chatlearn_module_attributes_and_example_imports(config) -> None:
    # ChatLearn's BaseModule.__init__ names; each was a bare AttributeError
    reference = BaseModule("reference", config)
    assert reference._num_gpu_per_replica == reference.num_gpu_per_replica == 2
    assert reference._runtime_args is reference.runtime_args is config.runtime_args
    assert reference.get_runtime_args() is config.runtime_args
    with pytest.raises(NotImplementedError, match="num_layers.*not provided.*parameter sync"):
        reference.num_layers()
    with pytest.raises(ImportError, match="VLLMModule is not provided.*forward_step"):
        from chatlearn import VLLMModule  # noqa: F401
    # imports of ChatLearn's example models: the small helper works, the rest say so
    from chatlearn.utils.utils import listdict_to_dictlist

    rows = [{"ids": [1, 2], "n": 1}, {"ids": [3], "n": 2}]
    assert listdict_to_dictlist(rows) == {"ids": [1, 2, 3], "n": [1, 2]}
    assert listdict_to_dictlist(rows, list_extend=False) == {"ids": [[1, 2], [3]], "n": [1, 2]}
    assert rows[0]["ids"] == [1, 2]  # the input is left as it was
    # ChatLearn's Megatron example tokenizes its prompts with it (examples/megatron/data)
    from chatlearn.utils.utils import multi_thread_data_processing

    def encode(prompt, prefix, width):
        return f"{prefix}{prompt:0{width}d}"

    prompts = list(range(10))
    expected = [f"p{i:03d}" for i in prompts]
    assert multi_thread_data_processing(4, prompts, encode, ["p", 3]) == expected  # 3, 3, 3, 1
    assert multi_thread_data_processing(32, prompts[:2], encode, ("p", 3)) == expected[:2]
    assert multi_thread_data_processing(4, [], encode, ["p", 3]) == []
    with pytest.raises(ValueError, match="num_threads must be a positive number"):
        multi_thread_data_processing(0, prompts, encode, ["p", 3])
    with pytest.raises(ValueError, match="Unknown format code"):
        multi_thread_data_processing(2, ["a", "b", "c"], encode, ["p", 3])
    with pytest.raises(ImportError, match="megatron_utils is not provided.*load_pretrained_model"):
        from chatlearn.utils.megatron_utils import load_checkpoint  # noqa: F401
    with pytest.raises(ImportError, match="chatlearn.models.megatron is not provided.*Megatron"):
        from chatlearn.models.megatron.lora import convert_layer_to_lora  # noqa: F401
    with pytest.raises(ImportError, match=r"^chatlearn.models.vllm_module is not provided"):
        importlib.import_module("chatlearn.models.vllm_module")
    # the module classes under the paths of ChatLearn's API reference: the same classes (each
    # was the ImportError above)
    from chatlearn.models.base_module import BaseModule as Base
    from chatlearn.models.megatron_module import MegatronModule
    from chatlearn.models.torch_module import TorchModule as Torch

    assert (Base, Torch, MegatronModule) == (BaseModule, TorchModule, chatlearn.MegatronModule)
    # ChatLearn's runtime and data modules: each was a bare ModuleNotFoundError
    with pytest.raises(ImportError, match="chatlearn.runtime is not provided.*DPOEngine from"):
        from chatlearn.runtime.trainer import Trainer  # noqa: F401
    with pytest.raises(ImportError, match="chatlearn.runtime is not provided"):
        from chatlearn.runtime.engine import Engine  # noqa: F401
    with pytest.raises(ImportError, match="chatlearn.data is not provided.*relay"):
        from chatlearn.data.data import RelaySampleManager  # noqa: F401
    with pytest.raises(ImportError, match="future is not provided.*no Ray"):
        from chatlearn.utils import future  # noqa: F401


def test_more_of_chatlearns_module_helpers() -> None:
    cfg = lib.make_config(
        {"reference": {"num_cpu": 1}, "policy": {"num_cpu": 1, "trainable": True}},
        {"colocation": ["reference,policy"]},  # ChatLearn writes groups as "a,b"
    )
    set_args(cfg)
    try:
        policy = TorchModule("policy", cfg)
        policy._rank = 1
        assert policy.get_rank() == 1 and policy.is_colocate is True
        policy.set_colocate(False)
        assert policy.is_colocate is False and policy.parameter_sync_frequency == 1
        alone = lib.make_config({"reference": {"num_cpu": 1}, "policy": {"num_cpu": 1}})
        assert BaseModule("reference", alone).is_colocate is False
        assert policy.total_cpu == 1 and policy.is_master_node() is False  # not in an actor
        policy._runtime_dir = Path("/run/x")  # what the runtime sets on the coordinator's host
        assert policy.is_master_node() is True
    finally:
        reset_args()
