"""The ready-made modules' shared base (`HFModule`): tokenizer, model, layout and dataset of
the reference and the trainer, and how a model with several ranks loads (chatlearn/hf/modules.py
describes the modules and their model_args)."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import torch

from chatlearn.actors.module import TorchModule, setup_allowance
from chatlearn.actors.placement import ModelResources
from chatlearn.algorithms.logps import DEFAULT_CHUNK_SIZE, SequenceLogps
from chatlearn.algorithms.token_budget import max_over_ranks
from chatlearn.config.errors import ConfigError
from chatlearn.hf.data import PROMPT_PLACEHOLDER, PreferenceCollator, PreferenceDataset
from chatlearn.hf.load_once import LoadOnce
from chatlearn.hf.load_turns import LoadTurns, stored_bytes
from chatlearn.hf.memory import return_freed_memory
from chatlearn.hf.model import (
    causal_lm_from_args,
    check_checkpoint_key,
    disable_dropout,
    embedding_rows,
    forwards_differ,
    loads_onto_device,
    locate_model_args,
    located_errors,
    model_arg,
    near_miss_warnings,
    validate_model_args,
)
from chatlearn.hf.packing import PackingOptions, packing_options, use_segment_attention
from chatlearn.hf.parallel import Layout
from chatlearn.hf.tokenizer import load_tokenizer

# The setup checks' warnings (`make gpu-check` fails an example run that logs one).
FULL_LOGITS_WARNING = "the log-probs come from the model's own forward instead"
DROPOUT_WARNING = "disable_dropout left randomness"
_DATA_KEYS = ("max_length", "max_prompt_length", "min_prompt_length", "prompt_template")
# Bytes a second a checkpoint is read at, for the time setup() may take beyond startup_timeout: a
# slow network file system's (a local NVMe disk reads GB/s), so that reading a 70B in bf16 (140
# GB, 23 min at this rate) is never taken for a hang, while a hang is still found.
CHECKPOINT_READ_RATE = 100 * 2**20


def _ending_load_turn(setup: Callable[..., None]) -> Callable[..., None]:
    """``setup`` that passes this rank's load turn on when it ends (also when it never built a
    network: another rank must not wait for ever). Not when it raised: the error stops the run
    (the coordinator stops every process on a start-up failure, the waiting ones too), where
    passing the turn on reported it only once every later rank of the host had loaded in turn.
    A setup that built the model but never its network (`build_network`) left the model of
    every rank but the first without weights (load_once): an error on every rank."""

    @functools.wraps(setup)
    def wrapped(self: HFModule, *args: Any, **kwargs: Any) -> None:
        depth = self.__dict__.get("_setup_depth", 0)  # a subclass's setup around its base's
        self.__dict__["_setup_depth"] = depth + 1
        try:
            setup(self, *args, **kwargs)
        except (RuntimeError, NotImplementedError) as failed:
            # torch's words for a meta tensor ("meta tensors", "device meta", "'Meta' backend")
            if self._load_once.builds_empty and re.search(r"\bmeta\b", str(failed), re.I):
                raise self._empty_model_error(failed) from failed
            raise
        finally:
            self.__dict__["_setup_depth"] = depth
        self._load_turns.done()
        if depth == 0:
            self._check_loaded()

    wrapped._ends_load_turn = True  # type: ignore[attr-defined]
    return wrapped


class HFModule(TorchModule):
    """Tokenizer, model, layout and dataset shared by the reference and the trainer."""

    tokenizer: Any
    model: Any
    layout: Layout
    packing: PackingOptions

    _load_turns: LoadTurns = LoadTurns(None)
    _load_once: LoadOnce = LoadOnce()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        setup = cls.__dict__.get("setup")
        if setup is not None and not getattr(setup, "_ends_load_turn", False):
            cls.setup = _ending_load_turn(setup)  # type: ignore[method-assign]

    def arg(self, key: str, default: Any = None) -> Any:
        value = self.model_args.get(key, default)
        return default if value is None else value

    def build_tokenizer(self) -> Any:
        with located_errors(self.model_args):  # a tokenizer it cannot use names model_path
            return load_tokenizer(self.model_args.get("model_path"))

    def build_model(self) -> Any:
        # setup's model on a rank other than the first of a group: on the meta device, its
        # weights from rank 0 once laid out (`build_network`; chatlearn/hf/load_once.py)
        empty = self._load_once.builds_empty
        layout = getattr(self, "layout", None)  # set by setup() before the first model
        # Sharded, the model stays in host memory: fully_shard moves each decoder layer and
        # then the root to the GPU and keeps this rank's shard, one unit whole on the GPU at
        # a time. Moved to the GPU whole, a model larger than one GPU could not be sharded.
        gpu = None
        if torch.cuda.is_available() and not empty and not (layout is not None and layout.sharded):
            gpu = this_device()
        with located_errors(self.model_args):  # a checkpoint from_pretrained cannot load
            # a checkpoint's weights read straight onto the GPU (no copy in host memory)
            model = causal_lm_from_args(self.model_args, self.tokenizer, empty=empty, device=gpu)
            self._load_once.agree(model, locate_model_args(self.model_args)[0])
        if gpu is not None:
            model = model.to(gpu)  # built from its config, or where it could not be read there
        packing = getattr(self, "packing", None)  # set by setup() after the first model
        if packing is not None and packing.segments:
            use_segment_attention(model)  # a further model attends like the first
        return model

    def build_layout(self) -> Layout:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        return Layout.from_args(
            self.model_args,
            world_size=self.data_parallel_size if distributed else 1,
            device_type="cuda" if torch.cuda.is_available() else "cpu",
        )

    def build_network(self, *, trainable: bool) -> Any:
        """`self.model` as the module that returns summed log-probs, wrapped for the layout."""
        chunk_size = int(self.arg("logps_chunk_size", DEFAULT_CHUNK_SIZE))
        # an empty model (load_once) computes nothing yet: rank 0's check decides for every rank
        empty = self._load_once.builds_empty
        network = SequenceLogps.from_causal_lm(self.model, chunk_size=chunk_size, check=not empty)
        self._load_once.share_check(network, self.model)
        if network.full_logits and self.data_parallel_rank == 0:
            vocab = int(self.model.get_output_embeddings().weight.shape[0])
            self._logger.warning(
                "%s: %s; " + FULL_LOGITS_WARNING + ", whose whole [rows, length, %d] logits "
                "take %d bytes per token in fp32 (%.3g GiB for 16 rows of 2,048 tokens), not "
                "logps_chunk_size tokens at a time",
                self.name,
                network.full_logits,
                vocab,
                4 * vocab,
                4 * vocab * 16 * 2048 / 2**30,
            )
        if network.full_logits and trainable:
            # The network's parameters are its body's and head's: what else the forward uses
            # would be neither trained, nor kept in step by DDP, nor sharded, nor saved.
            own = {id(p) for p in network.parameters()}
            outside = [n for n, p in self.model.named_parameters() if id(p) not in own]
            if outside:
                where, error = locate_model_args(self.model_args)
                raise error(
                    f"{where}.model_path",
                    f"{network.full_logits}, and it uses parameters outside its decoder and "
                    f"output head ({', '.join(outside[:3])}), which this trainer would leave "
                    "untrained",
                    "train a model whose logits are its head's output, or report its model_type",
                )
        # rank 0's weights (load_once), taken before the layout shards them
        sources = self._load_once.sources(network)
        device = this_device()
        # every rank holds rank 0's tensors before DDP's constructor, which need not send them
        in_sync = self._load_once.pending
        if not self.layout.sharded:
            # every rank's whole copy, before DDP's constructor checks them alike
            self._load_once.receive(
                network, sources, device=device, name=self.name, log=self._logger
            )
            # this rank's copy is on its GPU (`build_model`): the next one's turn, before DDP's
            # constructor, a collective of every rank (it checks and broadcasts the parameters),
            # which a rank still waiting for its turn would never join
            self._load_turns.done()
        with located_errors(self.model_args):  # e.g. parallel: none on several trainer ranks
            wrapped = self.layout.wrap(network, trainable=trainable, in_sync=in_sync)
        # sharded: each rank's shards, allocated by now (done above otherwise)
        self._load_once.receive(network, sources, device=device, name=self.name, log=self._logger)
        self._load_turns.done()  # this rank's copy is its shard: the next one's turn
        return wrapped

    def _check_loaded(self) -> None:
        """After the whole setup (a subclass's too): no model left without its weights. With
        load_once the ranks but 0 build the model on the meta device and receive rank 0's
        weights in `build_network`; a setup that built its network otherwise (or a second model
        with `build_model`) left them there, and rank 1 failed at its first forward on a meta
        tensor, naming nothing it could change."""
        empty = ""
        if self._load_once.active and self.rank != 0:
            for attr, value in sorted(vars(self).items()):
                if isinstance(value, torch.nn.Module):
                    empty = next(
                        (
                            f"self.{attr}: {name}"
                            for name, tensor in (*value.named_parameters(), *value.named_buffers())
                            if tensor.is_meta
                        ),
                        "",
                    )
                    if empty:
                        break
        if not (self._load_once.pending or empty):
            return
        where, error = locate_model_args(self.model_args)
        raise error(
            f"{where}.load_once",
            f"setup() ended with {empty or 'self.model'} without weights on rank "
            f"{self.rank if empty else '1 and up'} (load_once: rank 0 alone loads the model and "
            "sends the weights of build_network()'s network to the other ranks)",
            "build the network with self.build_network(trainable=...) in setup(), or set "
            "load_once: false (every rank loads the checkpoint)",
        )

    def _empty_model_error(self, failed: BaseException) -> ConfigError:
        """A setup that read the weights of this rank's model before `build_network` (with
        load_once they are on the meta device until then): its error said only "Tensor.item()
        cannot be called on meta tensors" (``resize_token_embeddings``' mean resizing), while
        rank 0 waited in the broadcast for ever."""
        where, error = locate_model_args(self.model_args)
        return error(
            f"{where}.load_once",
            f"setup() read the model's weights on rank {self.rank}, which has none until "
            "build_network() receives rank 0's (load_once: on the meta device until then): "
            + " ".join(str(failed).split())[:200],
            "pass mean_resizing=False to resize_token_embeddings, read other weights after "
            "build_network(), or set load_once: false (every rank loads the checkpoint)",
        )

    def check_args(self) -> None:
        # in the coordinator, before any process starts: what needs none of the model's files
        validate_model_args(self.model_args, files=False)
        if type(self).build_model is HFModule.build_model:
            check_checkpoint_key(self.model_args)

    def setup_allowance(self) -> tuple[float, str]:
        """Time to read ``model_path`` at `CHECKPOINT_READ_RATE`, beyond runtime.startup_timeout
        (60 s by default, which a checkpoint of more than ~6 GB took longer than to read from a
        slow disk: the run stopped with "did not become ready"), its ranks one after another
        when they load in turns. Sized on the coordinator's host: nothing where the checkpoint
        is on the model's hosts only."""
        path = self.model_args.get("model_path")
        size = stored_bytes(path) if path else 0
        if not size:
            return 0.0, ""
        reads = 1
        turns = self.model_args.get("load_in_turns") is not False  # true, or auto
        if self.model_args.get("load_once") is False and turns:
            resources = ModelResources.from_config(self.name, self.module_args)
            reads = resources.layout()[0]  # its processes, at most all on one host
        seconds = reads * size / CHECKPOINT_READ_RATE
        rate = CHECKPOINT_READ_RATE / 2**20
        times = f"{reads} times " if reads > 1 else ""
        return seconds, f"to read {path} {times}({size / 2**30:.3g} GiB at {rate:g} MiB/s)"

    def setup(self) -> None:
        # first: a model_path or setting these modules cannot use is a one-line ConfigError
        # naming its key, not a traceback from the tokenizer or the layout
        validate_model_args(self.model_args)
        if self.replica_id == 0 and self.rank == 0:  # every process reads the same args
            for line in near_miss_warnings(self.model_args):
                self._logger.warning("%s: %s", self.name, line)
            self._check_token_budget()
        return_freed_memory(model_arg(self.model_args, "malloc_mmap_threshold"))
        self.tokenizer = self.build_tokenizer()
        if self.tokenizer.eos_token_id is None:  # every response ends with it
            where, error = locate_model_args(self.model_args)
            raise error(
                f"{where}.model_path",
                "the tokenizer has no eos token, which ends every response",
                "set eos_token in the tokenizer's tokenizer_config.json",
            )
        self.layout = self.build_layout()
        with located_errors(self.model_args):  # before a model is loaded for nothing
            self.layout.check(trainable=self.trainable)
        if self.layout.parallel == "fsdp" and self.world_size == 1 and self.replica_id == 0:
            # An inference model's processes are replicas of zero_size processes each
            # (ChatLearn's rule): several replicas of one process shard nothing, as one does.
            if self.num_replica > 1:
                how = f"its processes are {self.num_replica} replicas of one process, each"
                fix = (
                    f"set models.{self.name}.zero_size to the number of processes to shard it "
                    "over (its ranks split each batch)"
                )
            else:
                how = "it has one process,"
                fix = (
                    f"give models.{self.name} more processes to shard it over (num_gpu, or "
                    "num_cpu with cpu_per_process)"
                )
            self._logger.warning(
                "%s: parallel: fsdp shards nothing here: %s with the whole model; %s",
                self.name,
                how,
                fix,
            )
        # rank 0 alone loads the model and sends it to the other ranks once they are laid out
        # (`build_network`; chatlearn/hf/load_once.py); or, with load_once: false, a host's
        # ranks load it one after another where their copies would not fit in its memory
        # together: the next rank once this one's layout took its copy over (load_turns.py)
        # the other ranks wait for rank 0's read as long as their setup may take (a subclass's
        # setup_allowance() read as the coordinator reads it: a number, or a pair with why)
        limit = float(self.runtime_args.startup_timeout) + setup_allowance(self)[0]
        self._load_once = LoadOnce.for_model(self.model_args, wait_limit=limit)
        if self._load_once.active:  # one rank loads: nothing to take turns at
            self._load_turns = LoadTurns(None)
            if self.model_args.get("load_in_turns") and self.rank == 0:
                self._logger.warning(
                    "%s: load_in_turns: true does nothing here: rank 0 alone loads the model "
                    "and sends it to the other ranks (load_once); set load_once: false for "
                    "every rank to load it, in turns",
                    self.name,
                )
        else:
            # turns bound the host's copies: none on CUDA where the weights are read onto the GPU
            on_gpu = torch.cuda.is_available()
            hands_over = self.layout.sharded or (on_gpu and not loads_onto_device())
            self._load_turns = LoadTurns.agree(
                self.model_args, self.name, self._logger, hands_over=hands_over
            )
        self._load_turns.wait()
        self.model = self.build_model()
        self._check_special_ids()
        if model_arg(self.model_args, "disable_dropout"):
            disable_dropout(self.model)
            # the trainer's rank 0 checks and warns (another rank's model may have no weights
            # yet: load_once). The reference runs in eval mode: no dropout there.
            if self.trainable and self.rank == 0 and forwards_differ(self.model):
                self._logger.warning(
                    "%s: " + DROPOUT_WARNING + " in %s (two train-mode forwards of the "
                    "same tokens differ): the policy will not compute what the reference does, "
                    "and the DPO loss will not start at ln 2 (0.6931) for equal weights",
                    self.name,
                    getattr(self.model.config, "model_type", type(self.model).__name__),
                )
        self._check_positions()
        self.packing = packing_options(self.model_args, self.model, log=self._log_packing)
        self.token_budget: int | None = model_arg(self.model_args, "max_tokens_per_micro_batch")

    def budget_options(self) -> dict[str, Any]:
        """`reference_outputs`' token-budget arguments: the budget and, for a sharded model
        (whose every forward is a collective), how the ranks agree on their number."""
        return {
            "max_tokens_per_micro_batch": self.token_budget,
            "agree": max_over_ranks if self.layout.sharded else None,
        }

    def _check_special_ids(self) -> None:
        """eos (which ends every response) and bos (which starts a prompt) are rows of the
        model's input embeddings. A tokenizer with added tokens (``<|im_end|>``) on a model whose
        embeddings were never resized failed the reference's first forward with an IndexError
        (a device-side assert on CUDA) that named neither."""
        rows = embedding_rows(self.model)
        if rows is None:
            return
        for name in ("eos", "bos"):
            token_id = getattr(self.tokenizer, f"{name}_token_id", None)
            if token_id is None or 0 <= token_id < rows:
                continue
            token = getattr(self.tokenizer, f"{name}_token", None)
            where, error = locate_model_args(self.model_args)
            path = self.model_args.get("model_path")
            tokenizer = f"the tokenizer in {str(path)!r}" if path else "the tokenizer"
            problem = (
                f"the {name} token {token!r} of {tokenizer} is id {token_id}, beyond the {rows} "
                "rows of the model's input embeddings"
            )
            if path:
                raise error(
                    f"{where}.model_path",
                    problem,
                    "resize the model's embeddings to its tokenizer and save it "
                    "(model.resize_token_embeddings(len(tokenizer)); model.save_pretrained(path)), "
                    "or use the tokenizer the model was trained with",
                )
            raise error(
                f"{where}.model_config.vocab_size",
                problem,
                f"remove vocab_size (the tokenizer's {len(self.tokenizer)} tokens are the default)"
                " or set it to at least that",
            )

    def _check_token_budget(self) -> None:
        """A ``max_tokens_per_micro_batch`` below a pair of the longest sequences (chosen and
        rejected of ``max_length`` tokens each): such a pair cannot be split, so it runs in a
        forward of its own over the budget, and the memory the budget was set to bound is
        exceeded at the first long pair, which was said nowhere."""
        budget = model_arg(self.model_args, "max_tokens_per_micro_batch")
        longest = 2 * int(model_arg(self.model_args, "max_length"))
        if budget is None or budget >= longest:
            return
        where, _ = locate_model_args(self.model_args)
        key = f"{where}.max_tokens_per_micro_batch"
        self._logger.warning(
            "%s: %s: %s: %d is below 2 × max_length (%d tokens: a pair of the longest chosen "
            "and rejected); a pair above %d tokens cannot be split and runs in a forward of its "
            "own, over the budget; set it to %d or more, or lower max_length",
            self.name,
            self.global_args.where(key),
            key,
            budget,
            longest,
            budget,
            longest,
        )

    def _check_positions(self) -> None:
        """``max_length`` within the positions the model has: beyond them a model with learned
        positions fails at its first long sample (an index error; a device assert on CUDA),
        and a rotary one extrapolates, which it was not trained to."""
        config = getattr(self.model, "config", None)
        limit = getattr(config, "max_position_embeddings", None) or getattr(
            config, "n_positions", None
        )
        max_length = int(model_arg(self.model_args, "max_length"))
        if not isinstance(limit, int) or max_length <= limit:
            return
        rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
        rotary = getattr(config, "rope_theta", None) is not None or isinstance(rope, dict)
        kind = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
        if rotary and kind not in (None, "default"):
            return  # scaled on purpose (linear, dynamic, yarn, ...)
        where, error = locate_model_args(self.model_args)
        problem = (
            f"{max_length} tokens, more than the {limit} positions of the model "
            f"({type(self.model).__name__})"
        )
        if not rotary:
            raise error(
                f"{where}.max_length",
                problem + ": its first longer sample would fail",
                f"set max_length to {limit} or less",
            )
        if self.replica_id == 0 and self.rank == 0:
            self._logger.warning(
                "%s: %s.max_length: %s; a rotary model extrapolates beyond them (set "
                "max_length to %d or less, or rope_scaling in the model's config)",
                self.name,
                where,
                problem,
                limit,
            )

    def _log_packing(self, message: str) -> None:
        if self.data_parallel_rank == 0:
            self._logger.info("%s: %s", self.name, message)

    def build_dataset(self, samples: list[Any], is_eval: bool = False) -> PreferenceDataset:
        # a null key is absent, its default (as validate_model_args reads it): None reached the
        # tokenizer and failed with a bare TypeError ("'<' not supported", "not iterable")
        options = {key: v for key in _DATA_KEYS if (v := self.model_args.get(key)) is not None}
        split = "eval" if is_eval else "training"
        try:
            dataset = PreferenceDataset(
                samples,
                self.tokenizer,
                split=split,
                embedding_rows=embedding_rows(getattr(self, "model", None)),
                **options,
            )
        except ConfigError:
            raise
        except ValueError as exc:  # the records' shape, a setting: one line, not a traceback
            raise ConfigError(
                " ".join(str(exc).split()),
                where=f"the {split} data set",
                fix="correct the data or the model_args it names",
            ) from None
        dataset.collate_fn = PreferenceCollator(self.pad_token_id)  # an id the model has
        summary = dataset.truncation_summary()
        if summary and self.replica_id == 0 and self.rank == 0:  # every replica builds it
            share = max(dataset.num_identical, dataset.num_duplicates) / max(1, len(dataset))
            # pairs that train an answer of nothing, the prompt or a human turn as an answer, or
            # without their system prompt: warned of always
            empty = (
                dataset.num_empty_responses
                + dataset.num_blank_responses
                + dataset.num_prompt_in_responses
                + dataset.num_turns_in_responses
                + dataset.num_unused_system
            )
            worth_a_warning = share > 0.01 or empty
            log = self._logger.warning if worth_a_warning else self._logger.info
            log("%s: %s data set: %s", self.name, "eval" if is_eval else "training", summary)
        template = options.get("prompt_template", PROMPT_PLACEHOLDER)
        if dataset.num_chat_records and template != PROMPT_PLACEHOLDER:
            self._warn_template_unused(dataset, samples, split)
        return dataset

    def _warn_template_unused(
        self, dataset: PreferenceDataset, samples: list[Any], split: str
    ) -> None:
        """Once (replica 0, rank 0): ``prompt_template`` is not applied to the data set's
        chat-format records, whose prompt is the tokenizer's chat template over the messages;
        it was passed over without a word, the template's instructions missing from training."""
        if self.replica_id != 0 or self.rank != 0:
            return
        where, _ = locate_model_args(self.model_args)
        key = f"{where}.prompt_template"
        # the data file: the records' own when they came here as loaded (in this process),
        # else the one ChatLearn's entry scripts read for this split
        path = getattr(samples, "path", None)
        path_key = "eval_data_path" if split == "eval" else "data_path"
        runtime = self.runtime_args
        if path is None and path_key in runtime and getattr(runtime, path_key, None):
            path = f"runtime.{path_key}: {getattr(runtime, path_key)}"
        source = f"{split} data set" + (f" ({path})" if path is not None else "")
        self._logger.warning(
            "%s: %s: %s: not applied to the %d chat-format records (message lists; "
            "the first: sample %d) of the %s: their prompt is the tokenizer's chat template over "
            "the messages; put the template's text into the messages (e.g. a system message), "
            "or give those records as strings",
            self.name,
            self.global_args.where(key),
            key,
            dataset.num_chat_records,
            dataset.first_chat_record,
            source,
        )

    @property
    def pad_token_id(self) -> int:
        """The id padding positions hold: the tokenizer's pad id where it is a row of the
        model's input embeddings, else eos (or 0). A [PAD] added to the tokenizer without
        resize_token_embeddings failed the padded forward with an IndexError; any valid id
        will do, as padding is masked and comes after every real token of its row, so under
        causal attention it changes no real token's log-prob."""
        known = self.__dict__.get("_pad_id")  # read per micro-batch: found once per model
        if known is not None:
            return int(known)
        pad = self.tokenizer.pad_token_id
        rows = embedding_rows(getattr(self, "model", None))
        if rows is None or pad is None or 0 <= pad < rows:
            found = int(pad or 0)
        else:
            eos = self.tokenizer.eos_token_id
            found = int(eos) if eos is not None and 0 <= eos < rows else 0
        if rows is not None:  # the model is built: its vocabulary does not change
            self.__dict__["_pad_id"] = found
        return found


def this_device() -> torch.device:
    """This process's GPU, else the CPU: where its model computes."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
