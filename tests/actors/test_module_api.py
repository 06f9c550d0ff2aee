"""ChatLearn's module API on the template (coordinator) side, the iteration rule, and loading."""

from __future__ import annotations

import logging
import sys
import textwrap
import types

import actors_testlib as lib
import pytest

from chatlearn.actors import BaseModule, ModuleError, TorchModule
from chatlearn.actors.loader import MAIN_ALIAS, ClassRef, load_object
from chatlearn.actors.module import invoke, resume_loads_checkpoint
from chatlearn.config import ConfigError, reset_args, set_args


@pytest.fixture
def config():
    cfg = lib.make_config(
        {
            "reference": {"num_gpu": 2, "model_args": {"hidden": 8}},
            "policy": {"num_cpu": 2, "cpu_per_process": 1, "trainable": True},
        },
        {"train_micro_batch_size": 1, "train_global_batch_size": 2, "seed": 7},
    )
    yield cfg
    reset_args()


def test_template_attributes(config):
    ref = BaseModule("reference", config)
    assert ref.name == "reference" and ref.global_args is config and ref.replica_id == 0
    assert ref.model_args == {"hidden": 8}
    assert ref.runtime_args.seed == 7 and ref.module_args.num_gpu == 2
    assert ref.trainable is False and ref.num_replica == 2
    assert ref._logger.name == "ChatLearn-reference" and isinstance(ref._logger, logging.Logger)
    assert (ref._iteration, ref._train_iteration, ref._episode_id) == (0, 0, 0)
    assert ref.resume_training is False
    assert (ref.rank, ref.world_size, ref.data_parallel_rank, ref.data_parallel_size) == (
        0,
        1,
        0,
        1,
    )
    assert ref.is_last_rank()
    pol = TorchModule("policy", config, replica_id=0)
    assert pol.trainable is True and pol.num_replica == 1
    pol._rank, pol._world_size = 0, 2  # what the runtime sets in the actor
    assert not pol.is_last_rank() and (pol.data_parallel_rank, pol.data_parallel_size) == (0, 2)


def test_constructor_reads_the_global_config_and_names_unknown_models(config):
    set_args(config)
    assert BaseModule("policy").global_args is config
    with pytest.raises(ConfigError, match="no model named 'polcy'"):
        BaseModule("polcy")


def test_padding_config_error_and_peak_memory(config):
    module = BaseModule("reference", config)
    module.add_padding_config("input_ids", 3)
    module.add_padding_config("mask", padding_value=1.0, padding_type="left")
    assert module.padding_config() == {
        "input_ids": {"padding_value": 3, "padding_type": "right"},
        "mask": {"padding_value": 1.0, "padding_type": "left"},
    }
    with pytest.raises(ValueError, match="'right' or 'left'"):
        module.add_padding_config("x", padding_type="middle")
    with pytest.raises(ModuleError, match="reference: out of data"):
        module.error("out of data")
    assert 0 < module.peak_memory() < 1024  # GiB of this process
    assert TorchModule("policy", config).peak_memory() > 0


class Steps(BaseModule):
    def forward_step(self, data, iteration):
        return ("fwd", data, iteration)

    def train_step(self, data):  # does not declare iteration
        return ("train", data)

    def save_checkpoint(self, iteration):
        return ("save", iteration)

    def load_checkpoint(self):  # no iteration either
        return "load"


def test_iteration_is_passed_only_if_declared(config):
    module = Steps("reference", config)
    assert invoke(module, "forward_step", [{"a": 1}]) == ("fwd", {"a": 1}, 0)
    assert invoke(module, "forward_step", [{"a": 1}], {"iteration": 5}) == ("fwd", {"a": 1}, 5)
    assert invoke(module, "forward_step", [{"a": 1}, 9]) == ("fwd", {"a": 1}, 9)  # positional
    assert module._iteration == 3
    assert invoke(module, "train_step", [[1, 2]], {"iteration": 4}) == ("train", [1, 2])
    assert module._train_iteration == 1
    assert invoke(module, "save_checkpoint", [], {"iteration": 12}) == ("save", 12)
    assert invoke(module, "save_checkpoint", [13]) == ("save", 13)
    assert invoke(module, "load_checkpoint", [], {"iteration": 12}) == "load"
    invoke(module, "_set_runtime_state", [], {"episode_id": 2, "iteration": 40})
    assert (module._episode_id, module._iteration) == (2, 40)
    with pytest.raises(AttributeError):
        invoke(module, "__class__")


class Counters(BaseModule):
    """Reads the counters inside its steps instead of declaring ``iteration``."""

    def forward_step(self, data):
        return self._iteration

    def train_step(self, data):
        return self._train_iteration


def test_counters_inside_the_steps_are_chatlearns(config):
    # ChatLearn's decorator advances _train_iteration before calling train_step (inside the
    # first step it is 1) and _iteration after forward_step (inside the first call it is 0)
    module = Counters("reference", config)
    assert [invoke(module, "forward_step", [{}]) for _ in range(2)] == [0, 1]
    assert [invoke(module, "train_step", [[]]) for _ in range(2)] == [1, 2]
    assert (module._iteration, module._train_iteration) == (2, 2)
    invoke(module, "_set_runtime_state", [], {"train_iteration": 8})  # a resumed trainer
    assert invoke(module, "train_step", [[]], {"iteration": 8}) == 9


class OwnNames(BaseModule):
    def save_checkpoint(self, step):
        return ("save", step)

    def load_checkpoint(self, it, strict=True):
        return ("load", it, strict)


def test_checkpoint_iteration_is_passed_by_position(config):
    """ChatLearn's engine calls save_checkpoint(iteration) by position, so the parameter may
    have any name."""
    module = OwnNames("reference", config)
    assert invoke(module, "save_checkpoint", [], {"iteration": 12}) == ("save", 12)
    assert invoke(module, "load_checkpoint", [], {"iteration": 7}) == ("load", 7, True)


class SaveOnly(TorchModule):
    def save_checkpoint(self, iteration):
        (self.checkpoint_dir(iteration) / "state.json").write_text("{}")


class SaveCallingSuper(TorchModule):
    def save_checkpoint(self, iteration):
        super().save_checkpoint(iteration)


def test_resume_loads_only_checkpoints_the_module_can_load(config, tmp_path):
    """ChatLearn's rule: a module's own load_checkpoint, or TorchModule's files, else skip."""
    written = tmp_path / "written"
    written.mkdir()
    (written / "model.pt").write_bytes(b"")
    empty = tmp_path / "empty"
    empty.mkdir()
    # TorchModule's own load: only where its save wrote the files (default or via super())
    assert resume_loads_checkpoint(SaveCallingSuper("policy", config), written)
    assert resume_loads_checkpoint(TorchModule("policy", config), written)
    assert not resume_loads_checkpoint(SaveOnly("policy", config), empty)
    (empty / "rng.pt").write_bytes(b"")  # a TorchModule without self.model saves the RNGs
    assert resume_loads_checkpoint(SaveOnly("policy", config), empty)
    # a module's own load_checkpoint is always called; BaseModule's no-op never
    assert resume_loads_checkpoint(Steps("reference", config), tmp_path / "missing")
    assert not resume_loads_checkpoint(BaseModule("reference", config), written)


def test_class_refs():
    assert ClassRef.of(lib.Recorder) == ClassRef("actors_testlib", "Recorder")
    assert ClassRef.parse("actors_testlib:EchoService").load() is lib.EchoService
    assert load_object("actors_testlib.EchoService") is lib.EchoService

    class Local(BaseModule):
        pass

    with pytest.raises(ValueError, match="inside a function"):
        ClassRef.of(Local)
    with pytest.raises(ImportError, match="NoSuchClass"):
        ClassRef("actors_testlib", "NoSuchClass").load()
    with pytest.raises(ValueError, match="package.module:Class"):
        ClassRef.parse("nodots")


def test_a_main_without_a_file_is_refused_in_the_coordinator(monkeypatch):
    # a script read from stdin (`python - < train.py`) has __file__ "<stdin>": its classes were
    # sent to the actors, which failed after starting with "cannot load the script <cwd>/<stdin>"
    for file in ("<stdin>", None):
        main = types.ModuleType("__main__")
        if file is not None:
            main.__file__ = file
        monkeypatch.setitem(sys.modules, "__main__", main)
        klass = type("FromStdin", (BaseModule,), {"__module__": "__main__"})
        with pytest.raises(ValueError, match="FromStdin is defined in an interactive session"):
            ClassRef.of(klass)


def test_main_script_runs_under_another_name_without_its_main_block(tmp_path):
    script = tmp_path / "user_script.py"
    marker = tmp_path / "marker"
    script.write_text(
        textwrap.dedent(
            f"""
            from chatlearn.actors import BaseModule

            class FromScript(BaseModule):
                pass

            SEEN_NAME = __name__

            if __name__ == "__main__":
                open({str(marker)!r}, "w").write("ran")
            """
        )
    )
    try:
        klass = ClassRef(MAIN_ALIAS, "FromScript", str(script)).load()
        assert klass.__name__ == "FromScript" and klass.__module__ == MAIN_ALIAS
        assert sys.modules[MAIN_ALIAS].SEEN_NAME == MAIN_ALIAS
        assert not marker.exists()
    finally:
        sys.modules.pop(MAIN_ALIAS, None)
        if str(tmp_path) in sys.path:
            sys.path.remove(str(tmp_path))


class Offloading(TorchModule):
    def setup(self):
        import torch

        self.model = torch.nn.Linear(3, 2)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.1)


def test_offload_and_onload_on_cpu_change_nothing(config):
    """On CPU there is nothing to move (device moves are measured by `make gpu-check`): the
    calls leave the same tensors in place and training goes on."""
    import torch

    module = Offloading("policy", config)
    module.setup()
    module.model(torch.ones(1, 3)).sum().backward()
    module.optimizer.step()
    before = [p.data.data_ptr() for p in module.model.parameters()]
    module.offload()
    assert module._offloaded == []
    module.onload()
    assert [p.data.data_ptr() for p in module.model.parameters()] == before
    module.model(torch.ones(1, 3)).sum().backward()
    module.optimizer.step()


class WithMemoryHooks(TorchModule):
    """Keeps its memory with ChatLearn's hooks (as its FSDP and Megatron modules do)."""

    def setup(self):
        self.calls = []

    def offload_weights(self):
        self.calls.append("offload_weights")

    def onload_weights(self):
        self.calls.append("onload_weights")

    def free_grad_buffers(self):
        self.calls.append("free_grad_buffers")

    def build_grad_buffers(self):
        self.calls.append("build_grad_buffers")

    def offload_optimizer_states(self):
        super().offload_optimizer_states()  # BaseModule has them all, as ChatLearn's
        self.calls.append("offload_optimizer_states")

    def onload_optimizer_states(self):
        self.calls.append("onload_optimizer_states")


def test_offload_and_onload_call_chatlearns_memory_hooks_a_module_defines():
    """ChatLearn's TorchModule.offload()/onload() call these hooks; a module that defines them
    had them never called here (only `self.model` was moved), so with free_memory its memory
    stayed where it was. They run in ChatLearn's order, each where its flag is set."""
    cfg = lib.make_config(
        {
            "reference": {"num_cpu": 1, "free_memory": True},
            "policy": {"num_cpu": 1, "trainable": True, "free_memory": True},
        },
        {"train_micro_batch_size": 1, "train_global_batch_size": 1},
    )
    try:
        policy = WithMemoryHooks("policy", cfg)
        policy.setup()
        policy.offload()
        policy.onload()
        assert policy.calls == [
            "free_grad_buffers",
            "offload_optimizer_states",
            "offload_weights",
            "onload_weights",
            "build_grad_buffers",
            "onload_optimizer_states",
        ]
        reference = WithMemoryHooks("reference", cfg)  # not trainable: its weights only
        reference.setup()
        reference.offload()
        reference.onload()
        assert reference.calls == ["offload_weights", "onload_weights"]
    finally:
        reset_args()


def test_memory_hooks_bring_back_only_what_they_took_away():
    """The engine onloads a reference at its first turn (and a restarted process), never
    offloaded: its onload hooks ran with nothing to bring back, where the move of `self.model`
    brings back nothing; an offload() twice called the hooks twice."""
    cfg = lib.make_config({"reference": {"num_cpu": 1, "free_memory": True}})
    try:
        reference = WithMemoryHooks("reference", cfg)
        reference.setup()
        reference.onload()
        assert reference.calls == []
        reference.offload()
        reference.offload()
        reference.onload()
        reference.onload()
        assert reference.calls == ["offload_weights", "onload_weights"]
    finally:
        reset_args()


def test_setup_allowance_in_its_forms_and_junk_named_in_one_line(config):
    # seconds alone or with why; a pair of the wrong size was "not enough values to unpack" from
    # the runtime's launch, and numpy's seconds (np.float32, a size computed with numpy) were
    # refused as "not ... seconds"
    import numpy as np

    from chatlearn.actors.module import setup_allowance

    def allowing(value):
        module = BaseModule("reference", config)
        module.setup_allowance = lambda: value
        return module

    assert setup_allowance(BaseModule("reference", config)) == (0.0, "")
    assert setup_allowance(allowing(600)) == (600.0, "")
    assert setup_allowance(allowing((np.int64(60), "to read it"))) == (60.0, "to read it")
    assert setup_allowance(allowing(np.float32(1.5))) == (1.5, "")
    for junk in ((600,), (1, "a", "b"), None, -1, float("nan"), "600", [600, "why"]):
        with pytest.raises(TypeError, match=r"^BaseModule.setup_allowance\(\) must give"):
            setup_allowance(allowing(junk))
