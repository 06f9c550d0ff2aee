"""Settings the HF modules cannot use stop their setup() with a one-line ConfigError naming the
key, its file:line and what to change — not a 70-110 line traceback from the layout, the
packing options, peft or transformers (each failed in an actor with exit 1)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import chatlearn
from chatlearn.config import ConfigError, reset_args
from chatlearn.hf import byte_tokenizer

TINY_LLAMA = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 64,
    "vocab_size": 260,
}
TINY = "model_config: {hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1}\n"


@pytest.fixture(autouse=True)
def _clean_global_config() -> Iterator[None]:
    reset_args()
    yield
    reset_args()


def module_from_files(tmp_path: Path, model_yaml: str, *, trainer: bool = False) -> Any:
    """The reference (or the trainer) of a config read from files, both models' model args
    `model_yaml` in tmp_path/model.yaml (so messages name its lines)."""
    from chatlearn.hf.modules import HFDPOTrainer, HFReference

    (tmp_path / "model.yaml").write_text(model_yaml)
    (tmp_path / "cfg.yaml").write_text(
        "runtime: {num_episode: 1, sample_per_episode: 16}\n"
        "models:\n"
        "  reference: {num_cpu: 1, model_config_file: model.yaml}\n"
        "  policy: {num_cpu: 1, trainable: true, model_config_file: model.yaml}\n"
    )
    config = chatlearn.init(str(tmp_path / "cfg.yaml"))
    return HFDPOTrainer("policy", args=config) if trainer else HFReference("reference", args=config)


def setup_error(tmp_path: Path, model_yaml: str, *, trainer: bool = False) -> ConfigError:
    """The ConfigError of the reference's (or the trainer's) setup() with these model args."""
    module = module_from_files(tmp_path, model_yaml, trainer=trainer)
    with pytest.raises(ConfigError) as info:
        module.setup()
    error = info.value
    _, fix = str(error).split("\n")  # where: key: problem, then the fix
    assert fix.startswith("  fix: ") and error.fix, str(error)
    return error


def assert_located(error: ConfigError, tmp_path: Path, key: str, line: int, name: str) -> None:
    assert error.key == f"models.{name}.model_args.{key}", str(error)
    assert error.where == f"{tmp_path / 'model.yaml'}:{line}", str(error)


def save_checkpoint(directory: Path, config: object, *, tokenizer: object | None = None) -> str:
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)  # type: ignore[attr-defined]
    return str(directory)


def test_fp16_on_cpu(tmp_path: Path) -> None:
    error = setup_error(tmp_path, TINY + "mixed_precision: fp16\n")
    assert_located(error, tmp_path, "mixed_precision", 2, "reference")
    assert "needs CUDA" in error.problem and "bf16" in (error.fix or "")


def test_packing_on_a_model_it_is_not_exact_for(tmp_path: Path) -> None:
    from transformers import GPT2Config

    gpt2 = GPT2Config(n_positions=64, n_embd=16, n_layer=1, n_head=2, vocab_size=260)
    path = save_checkpoint(tmp_path / "gpt2", gpt2, tokenizer=byte_tokenizer())
    error = setup_error(tmp_path, f"model_path: {path}\nmax_length: 32\npacking: true\n")
    assert_located(error, tmp_path, "packing", 3, "reference")
    assert "'gpt2' is not verified" in error.problem and error.fix == "set packing: false"


@pytest.mark.parametrize("model_type", ["mistral", "qwen2"])
def test_prefix_sharing_on_a_sliding_window_model(tmp_path: Path, model_type: str) -> None:
    from transformers import MistralConfig, Qwen2Config

    sizes = {**TINY_LLAMA, "sliding_window": 16}
    config = (
        MistralConfig(**sizes)
        if model_type == "mistral"
        else Qwen2Config(**sizes, use_sliding_window=True, max_window_layers=0)
    )
    path = save_checkpoint(tmp_path / model_type, config, tokenizer=byte_tokenizer())
    model_yaml = f"model_path: {path}\nmax_length: 32\npacking: false\nprefix_sharing: true\n"
    error = setup_error(tmp_path, model_yaml)
    assert_located(error, tmp_path, "prefix_sharing", 4, "reference")
    assert "sliding-window" in error.problem and error.fix == "set prefix_sharing: false"


def test_no_parallel_wrapper_on_two_trainer_ranks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from chatlearn.actors.module import TorchModule

    # two data-parallel ranks of the trainer, as in an actor of a 2-process group
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(TorchModule, "data_parallel_size", property(lambda self: 2))
    error = setup_error(tmp_path, TINY + "parallel: none\n", trainer=True)
    assert_located(error, tmp_path, "parallel", 2, "policy")
    assert "cannot train on 2 ranks" in error.problem and "ddp" in (error.fix or "")


def test_lora_target_modules_the_model_does_not_have(tmp_path: Path) -> None:
    model_yaml = TINY + "lora:\n  r: 4\n  target_modules: [nonexistent_proj]\n"
    error = setup_error(tmp_path, model_yaml, trainer=True)
    assert_located(error, tmp_path, "lora.target_modules", 4, "policy")
    assert "nonexistent_proj" in error.problem and "q_proj" in (error.fix or "")


def test_a_tokenizer_without_pad_and_eos_tokens(tmp_path: Path) -> None:
    from transformers import LlamaConfig

    tokenizer = byte_tokenizer()
    tokenizer.pad_token = None
    tokenizer.eos_token = None
    llama = LlamaConfig(**TINY_LLAMA)
    path = save_checkpoint(tmp_path / "llama", llama, tokenizer=tokenizer)
    error = setup_error(tmp_path, f"seed: 0\nmodel_path: {path}\n")
    assert_located(error, tmp_path, "model_path", 2, "reference")
    assert "neither a pad nor an eos token" in error.problem and "pad_token" in (error.fix or "")


def test_a_model_path_without_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    error = setup_error(tmp_path, f"model_path: {tmp_path / 'empty'}\n")
    assert_located(error, tmp_path, "model_path", 1, "reference")
    assert "no Hugging Face checkpoint (no config.json)" in error.problem
    # a LoRA adapter (the adapter/ of a chatlearn checkpoint) is what save_pretrained wrote too
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    reset_args()
    error = setup_error(tmp_path, f"model_path: {tmp_path / 'adapter'}\n")
    assert_located(error, tmp_path, "model_path", 1, "reference")
    assert "holds a peft adapter (adapter_config.json), not a model" in error.problem
    assert "merge_and_unload" in (error.fix or "")
    # a LoRA run's periodic checkpoint's hf_model: the adapter and the tokenizer, no merged
    # weights (the run's last checkpoint has them; chatlearn export writes them from any)
    reset_args()
    error = setup_error(tmp_path, f"model_path: {tmp_path}\n")
    assert_located(error, tmp_path, "model_path", 1, "reference")
    assert "holds a LoRA adapter alone (adapter/)" in error.problem
    assert "chatlearn export" in (error.fix or "")


def test_a_model_path_without_tokenizer_files(tmp_path: Path) -> None:
    from transformers import LlamaConfig

    llama = LlamaConfig(**TINY_LLAMA)
    path = save_checkpoint(tmp_path / "llama", llama)  # the model alone
    error = setup_error(tmp_path, f"model_path: {path}\n")
    assert_located(error, tmp_path, "model_path", 1, "reference")
    assert "no tokenizer files" in error.problem and "save_pretrained" in (error.fix or "")


def test_a_checkpoint_from_pretrained_cannot_load(tmp_path: Path) -> None:
    # an architecture transformers lacks, custom code (auto_map), a weight file missing or
    # truncated: each was a 40-120 line traceback from transformers in the actor
    from transformers import LlamaConfig

    llama = LlamaConfig(**TINY_LLAMA)
    cases = {}
    path = Path(save_checkpoint(tmp_path / "unknown", llama, tokenizer=byte_tokenizer()))
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "frobnicator"}))
    cases[path] = "model type `frobnicator` but Transformers does not recognize"
    for name, auto_map in (
        ("remote", {"AutoConfig": "modeling.MineConfig", "AutoModelForCausalLM": "modeling.Mine"}),
        ("remote_model", {"AutoModelForCausalLM": "modeling.Mine"}),
    ):
        path = Path(save_checkpoint(tmp_path / name, llama, tokenizer=byte_tokenizer()))
        remote = {"model_type": "mine", "auto_map": auto_map}
        (path / "config.json").write_text(json.dumps({**config, **remote}))
        cases[path] = "code of its own (auto_map), which is never run here (no trust_remote_code)"
    path = Path(save_checkpoint(tmp_path / "truncated", llama, tokenizer=byte_tokenizer()))
    (path / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes()[:100])
    cases[path] = "does not load: Error while deserializing header"
    path = Path(save_checkpoint(tmp_path / "no_weights", llama, tokenizer=byte_tokenizer()))
    (path / "model.safetensors").unlink()
    cases[path] = "no file named model.safetensors"
    for path, problem in cases.items():
        reset_args()
        error = setup_error(tmp_path, f"seed: 0\nmodel_path: {path}\n")
        assert_located(error, tmp_path, "model_path", 2, "reference")
        assert error.problem.startswith(f"the model in {str(path)!r} does not load: ")
        assert problem in error.problem, error.problem


def test_a_float16_trainer(tmp_path: Path) -> None:
    # a float16 checkpoint (as many are published) with dtype unset trained in float16, where
    # AdamW's eps is 0: the loss was NaN from the second step, without a word
    from transformers import LlamaConfig

    path = save_checkpoint(
        tmp_path / "llama", LlamaConfig(**TINY_LLAMA, dtype="float16"), tokenizer=byte_tokenizer()
    )
    error = setup_error(tmp_path, f"seed: 0\nmodel_path: {path}\n", trainer=True)
    assert error.key == "models.policy.model_args.dtype", str(error)
    assert "float16 (dtype unset: the checkpoint's), which AdamW cannot train" in error.problem
    assert "dtype: float32" in (error.fix or "")
    reset_args()
    error = setup_error(tmp_path, TINY + "dtype: float16\n", trainer=True)
    assert_located(error, tmp_path, "dtype", 2, "policy")
    # the reference runs forward only; LoRA's adapters train in float32
    reset_args()
    module_from_files(tmp_path, TINY + "dtype: float16\n").setup()
    reset_args()
    module_from_files(tmp_path, TINY + "dtype: float16\nlora: {r: 2}\n", trainer=True).setup()


def test_a_mistyped_model_arg_is_said_where_it_was_written(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # `learnig_rate: 5.0e-4` trained at the default 1e-6 without a word; a key of the user's own
    # module (not near any of ours) is left alone
    typos = "learnig_rate: 5.0e-4\nmy_own_flag: 3\nbta: 0.2\n"
    module = module_from_files(tmp_path, TINY + typos)
    with caplog.at_level("WARNING"):
        module.setup()
    warned = [m for m in caplog.messages if "not a key the ready-made" in m]
    path = tmp_path / "model.yaml"
    assert warned == [
        f"reference: {path}:2: models.reference.model_args.learnig_rate: not a key the "
        "ready-made modules read, so learning_rate keeps its default; did you mean "
        "learning_rate? (a key your own module reads is fine as it is)",
        f"reference: {path}:4: models.reference.model_args.bta: not a key the ready-made modules "
        "read, so beta keeps its default; did you mean beta? (a key your own module reads is "
        "fine as it is)",
    ]


def test_chatlearns_deepspeed_example_keys_are_named_with_ours(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # chatlearn.DeepSpeedModule's error sends ChatLearn's HF DPO example to these modules; its
    # model config, kept as it was, trained a small model built from scratch in place of its
    # checkpoint (pretrain_or_model) and its prompts without their template, without a word
    ours = "pretrain_or_model: /data/qwen2-7b\nbf16: true\n"
    error = setup_error(tmp_path, TINY + ours)
    assert_located(error, tmp_path, "pretrain_or_model", 2, "reference")
    assert "a small model built from scratch" in error.problem
    assert error.fix == "rename it to model_path"
    reset_args()
    with pytest.raises(ConfigError, match="pretrain_or_model"):  # before any process starts
        module_from_files(tmp_path, TINY + ours).check_args()
    reset_args()
    # a subclass that builds its model itself may read the key: not the modules' business
    from chatlearn.hf.modules import HFReference

    class OwnModel(HFReference):
        def build_model(self) -> Any:
            raise NotImplementedError

    OwnModel("reference", args=module_from_files(tmp_path, TINY + ours).global_args).check_args()
    reset_args()
    kept = 'seed: 0\nmax_len: 64\ninput_template: "Q: {}\\nA:"\n'
    warned = _deepspeed_warnings(tmp_path, TINY + kept, caplog)
    path = tmp_path / "model.yaml"
    assert warned == [
        f"reference: {path}:3: models.reference.model_args.max_len: a key of ChatLearn's "
        "DeepSpeed DPO example, not read by the ready-made modules; write max_length instead",
        f"reference: {path}:4: models.reference.model_args.input_template: a key of "
        "ChatLearn's DeepSpeed DPO example, not read by the ready-made modules; write "
        "prompt_template (its {} written {prompt}) instead",
    ]
    assert not [m for m in caplog.messages if "did you mean" in m]  # max_len: said once
    reset_args()
    # set off, they ask for these modules' defaults: "write mixed_precision: bf16 instead"
    # turned on what the example had off
    off = "seed: 0\nbf16: false\nzero_stage: 0\n"
    warned = _deepspeed_warnings(tmp_path, TINY + off, caplog)
    assert [m.split("; ", 1)[1] for m in warned] == [
        "float32 compute is the default here (mixed_precision: no): remove it",
        "ZeRO stage 0 is plain data parallelism, the default here (parallel: ddp): remove it",
    ]


def _deepspeed_warnings(
    tmp_path: Path, model_file: str, caplog: pytest.LogCaptureFixture
) -> list[str]:
    """The warnings about ChatLearn's DeepSpeed-example keys of a setup with ``model_file``."""
    module = module_from_files(tmp_path, model_file)
    caplog.clear()
    with caplog.at_level("WARNING"):
        module.setup()
    return [m for m in caplog.messages if "ChatLearn's DeepSpeed" in m]


def test_an_eos_beyond_the_models_embeddings(tmp_path: Path) -> None:
    # an added <|im_end|> on a model never resized: the reference's first forward failed with
    # a 140-line IndexError (a device-side assert on CUDA) naming neither
    from transformers import LlamaConfig

    tokenizer = byte_tokenizer()
    tokenizer.add_special_tokens({"eos_token": "<|im_end|>"})
    path = save_checkpoint(
        tmp_path / "llama", LlamaConfig(**{**TINY_LLAMA, "vocab_size": 259}), tokenizer=tokenizer
    )
    error = setup_error(tmp_path, f"seed: 0\nmodel_path: {path}\n")
    assert_located(error, tmp_path, "model_path", 2, "reference")
    assert error.problem == (
        f"the eos token '<|im_end|>' of the tokenizer in {path!r} is id 259, beyond the 259 "
        "rows of the model's input embeddings"
    )
    assert "resize_token_embeddings(len(tokenizer))" in (error.fix or "")
    # a built model whose model_config sets a vocab_size too small for the tokenizer
    error = setup_error(tmp_path, "model_config: {num_hidden_layers: 1, vocab_size: 258}\n")
    assert error.key == "models.reference.model_args.model_config.vocab_size", str(error)
    assert "eos token '</s>' of the tokenizer is id 258, beyond the 258 rows" in error.problem


def test_a_record_with_a_token_beyond_the_models_embeddings(tmp_path: Path) -> None:
    # an added token in a record's text on a model never resized: the same IndexError, from
    # the reference's forward, naming no record; now the record's file:line
    from transformers import LlamaConfig

    from chatlearn.actors.errors import ActorError
    from chatlearn.engine.sample_errors import located_sample_error
    from chatlearn.hf import load_preference_data

    tokenizer = byte_tokenizer()
    tokenizer.add_tokens(["<|im_start|>"])  # id 259
    path = save_checkpoint(
        tmp_path / "llama", LlamaConfig(**{**TINY_LLAMA, "vocab_size": 259}), tokenizer=tokenizer
    )
    data = tmp_path / "d.jsonl"
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    data.write_text(f"{json.dumps(good)}\n{json.dumps({**good, 'rejected': 'b<|im_start|>'})}\n")
    reference = module_from_files(tmp_path, f"model_path: {path}\n")
    reference.setup()
    records = load_preference_data(data)
    assert len(reference.build_dataset(records[:1])) == 1
    with pytest.raises(ConfigError) as info:
        reference.build_dataset(records)
    assert info.value.one_line().startswith(
        "sample 1 of the training data set ({'prompt': 'q', 'chosen': 'a', 'rejected': "
        "'b<|im_start|>'}): its rejected tokenizes to id 259 ('<|im_start|>'), beyond the 259 "
        "rows of the model's input embeddings"
    )
    remote = ActorError("chatlearn.config.errors.ConfigError", str(info.value))
    located = located_sample_error(remote, {"training": records.origin})
    assert isinstance(located, ConfigError) and located.where == f"{data}:2", str(located)
    assert "resize_token_embeddings" in (located.fix or "")


def test_a_prompt_template_is_said_not_to_apply_to_chat_records(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # a chat-format record's prompt is the chat template's rendering: prompt_template was
    # passed over without a word, its instructions missing from every prompt trained on
    from transformers import LlamaConfig

    from chatlearn.hf import load_preference_data

    tokenizer = byte_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    path = save_checkpoint(tmp_path / "llama", LlamaConfig(**TINY_LLAMA), tokenizer=tokenizer)
    data = tmp_path / "chat.jsonl"
    chat = {"prompt": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b"}
    plain = {"prompt": "hi", "chosen": "a", "rejected": "b"}
    data.write_text("".join(json.dumps(r) + "\n" for r in (plain, chat, chat)))
    reference = module_from_files(
        tmp_path, f"model_path: {path}\nprompt_template: 'Q: {{prompt}} A:'\n"
    )
    reference.setup()
    with caplog.at_level(logging.WARNING):
        reference.build_dataset(load_preference_data(data))
        # as sent to a replica: a plain list, named by the file ChatLearn's scripts read
        reference.runtime_args.eval_data_path = "held_out.jsonl"
        reference.build_dataset([plain, chat], True)
        reference.build_dataset([plain])  # no chat record: nothing to say
    lines = [r.getMessage() for r in caplog.records if "prompt_template" in r.getMessage()]
    assert len(lines) == 2, lines
    assert lines[0].startswith(
        f"reference: {tmp_path / 'model.yaml'}:2: models.reference.model_args.prompt_template: "
        "not applied to the 2 chat-format records (message lists; the first: sample 1) of the "
        f"training data set ({data}): their prompt is the tokenizer's chat template"
    ), lines[0]
    assert (
        "the first: sample 1) of the eval data set (runtime.eval_data_path: held_out.jsonl)"
        in (lines[1])
    )


def test_null_data_keys_are_their_defaults_in_the_data_set(tmp_path: Path) -> None:
    # `prompt_template:` or `max_length:` left empty (null, which every model arg reads as
    # absent) reached the tokenizer: build_dataset failed with a bare TypeError
    reference = module_from_files(
        tmp_path, f"{TINY}prompt_template:\nmax_length:\nmin_prompt_length:\n"
    )
    reference.setup()
    dataset = reference.build_dataset([{"prompt": "hi", "chosen": "a", "rejected": "b"}])
    assert len(dataset) == 1 and dataset.pair_tokenizer.prompt_template == "{prompt}"


def test_a_whole_number_written_as_a_float_is_a_whole_number_in_the_data_set(
    tmp_path: Path,
) -> None:
    # `max_prompt_length: 1.6e1` (a float in YAML, as ChatLearn reads it) or "3.2e1" in quotes
    # passed as whole numbers and reached the tokenizer as floats: build_dataset failed with
    # "slice indices must be integers", naming no key
    reference = module_from_files(
        tmp_path, f"{TINY}max_length: '3.2e1'\nmax_prompt_length: 1.6e1\nmin_prompt_length: 4.0\n"
    )
    args = reference.model_args
    assert (args["max_length"], args["max_prompt_length"], args["min_prompt_length"]) == (32, 16, 4)
    assert all(type(args[key]) is int for key in ("max_length", "max_prompt_length"))
    reference.setup()
    dataset = reference.build_dataset([{"prompt": "p" * 40, "chosen": "c" * 40, "rejected": "r"}])
    assert len(dataset) == 1 and dataset.num_truncated_prompts == 1


@pytest.mark.parametrize(("budget", "warned"), [(40, True), (64, False)])
def test_a_token_budget_below_a_pair_of_the_longest_sequences_is_said_at_setup(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, budget: int, warned: bool
) -> None:
    # a pair above max_tokens_per_micro_batch runs in a forward of its own: a budget below
    # 2 × max_length let the longest pairs run over it, the memory bound broken without a word
    trainer = module_from_files(
        tmp_path, f"{TINY}max_length: 32\nmax_tokens_per_micro_batch: {budget}\n", trainer=True
    )
    with caplog.at_level(logging.WARNING):
        trainer.setup()
    lines = [r.getMessage() for r in caplog.records if "max_tokens_per" in r.getMessage()]
    assert len(lines) == warned, lines
    if warned:
        assert lines[0] == (
            f"policy: {tmp_path / 'model.yaml'}:3: models.policy.model_args."
            "max_tokens_per_micro_batch: 40 is below 2 × max_length (64 tokens: a pair of the "
            "longest chosen and rejected); a pair above 40 tokens cannot be split and runs in a "
            "forward of its own, over the budget; set it to 64 or more, or lower max_length"
        )
