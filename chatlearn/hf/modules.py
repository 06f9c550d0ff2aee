"""Ready-made DPO modules for Hugging Face causal LMs: use them as they are, or subclass.

    models:
      reference:      {num_cpu: 1, model_config_file: model.yaml}
      policy_trainer: {num_cpu: 1, trainable: true, model_config_file: model.yaml}

``model_args`` (the model's ``model_config_file`` and/or inline ``model_args:``):

| key | default | meaning |
|---|---|---|
| model_path | None | local checkpoint directory (``from_pretrained``, never a download) |
| model_config | SMALL_LLAMA | config of a freshly built Llama-style model (no model_path) |
| seed | 0 | seed of the random init (both models must agree to start equal) |
| dtype | None | "float32", "bfloat16", ... (None: the checkpoint's) |
| max_length, max_prompt_length, prompt_template | 512, None, "{prompt}" | chatlearn.hf.data |
| beta, loss_type, label_smoothing, rpo_alpha | 0.1, "sigmoid", 0.0, None | the DPO objective |
| learning_rate, weight_decay, adam_betas, adam_eps | 1e-6, 0.0, [0.9, 0.999], 1e-8 | AdamW |
| warmup_steps, warmup_ratio, min_lr_ratio | 0, 0.0, 0.0 | linear warm-up then cosine decay |
| max_grad_norm | 1.0 | gradient clipping (None or 0: off) |
| gradient_checkpointing | False | recompute activations in backward |
| disable_dropout | True | the model's dropout off, as in TRL's DPO (a lora.dropout set applies) |
| parallel | "ddp" | "none", "ddp" or "fsdp" (FSDP2: shard per decoder layer, then the root) |
| hsdp | True | with fsdp across hosts: shard within a host, replicate across hosts |
| mixed_precision | "no" | "bf16" or "fp16" (CUDA only): low-precision compute, fp32 master state |
| lora, enable_lora | None, False | peft LoRA {r, alpha, dropout, target_modules}, defaults below |
| logps_chunk_size | 512 | response tokens per chunk of the log-prob computation (0: whole logits) |
| packing | on where exact | a micro-batch's sequences in one row, no padding (below) |
| prefix_sharing | on where exact | each pair as ``[prompt, chosen, rejected]``: the prompt once |
| max_tokens_per_row | None | with packing: start a new row past this many tokens (None: one) |
| max_tokens_per_micro_batch | None | at most this many tokens per forward (below; None: off) |
| save_hf_model, merge_lora | True, True | checkpoints hold an HF dir (LoRA: adapter + merged) |
| malloc_mmap_threshold | 0 | glibc: freed blocks above this size leave the process (0: off) |
| load_once | True | rank 0 loads model_path (or builds the model), the other ranks receive it |
| load_in_turns | None | with load_once false: a host's ranks load in turns (None: if needed) |

LoRA's defaults (``chatlearn.hf.lora``): r 16, alpha 32, dropout 0, target_modules "all-linear".

A subclass's ``setup`` with ``load_once`` (several ranks): from ``build_model`` until
``build_network`` the model of ranks 1 and up is on the meta device, without weights; what setup
does to the weights meanwhile (new tokens' rows) is done on rank 0 and sent with the rest, and
what reads a weight's value there fails on those ranks with the error of ``load_once``
(``resize_token_embeddings`` does with its default mean resizing: pass ``mean_resizing=False``).
A setup that ends without ``build_network`` (or with a second model from ``build_model``) stops
with that error too; ``load_once: false`` has every rank load.

The reference returns what the trainer needs — the pair tensors and its summed log-probs
(``chatlearn.algorithms.dpo.reference_outputs``) — since ChatLearn does not merge a module's
output with its input. The trainer accumulates gradients over the micro-batches of a step (the
gradient of the mean loss over every sample of the step, on all data-parallel ranks), steps the
optimizer once, and returns the standard DPO metrics, exact over micro-batches and ranks.
Several trainer ranks train data-parallel with torch's DDP (gloo on CPU, NCCL on GPU), or, with
``parallel: fsdp``, sharded with FSDP2 (``chatlearn.hf.parallel``). A sharded reference splits each
batch's rows over its ranks and gathers the log-probs. The reference ignores ``lora``: it is the
frozen base model. The trainer logs its ``memory_report()`` at setup.

Memory beyond the training state (``chatlearn bench memory`` measures it): with
``malloc_mmap_threshold: N`` (e.g. 131072) a module fixes glibc's mmap threshold at setup
(``chatlearn.hf.memory.return_freed_memory``), so the memory of freed tensors leaves the process
instead of piling up in its heaps (GiBs for a 0.5B model on CPU), at a cost in page faults (35-45%
of the CPU step of ``chatlearn bench dpo``'s small model; off by default); a trainer with tied
embeddings sums the head's and the embedding's gradients of that weight in place
(``chatlearn.hf.model.tied_gradient_in_place``); under FSDP2 the root's gathered parameters are
freed once the backward reaches the last decoder layer (``chatlearn.hf.parallel``).

Packing and prefix sharing (``chatlearn.algorithms.packing``) compute neither padding nor a pair's
prompt twice; the log-probs are those of the padded forward (to float rounding). They are on by
default where that is exact — ``sdpa``/``eager`` attention of Llama/Qwen2-style models without
sliding windows (``chatlearn.hf.packing``) — and otherwise off with one log line. On an ``sdpa``
model the packed forward attends by segments (``packed_attention: segments``, the default): one
unpadded row, no mask, each pair's branches through SDPA's causal kernel; every model the module
builds (``build_model``) attends the same way. ``packed_attention: mask`` gives each row a
``T × T`` mask whose attention costs ``T²``: then set ``max_tokens_per_row`` to about
``max_length`` for long sequences. The trainer adds ``tokens/real``
(neither padding nor a repeated prompt) and ``tokens/computed`` (what the forwards ran over) of the
step, summed over ranks, to its metrics.

A token budget: ChatLearn's micro-batches count samples, so ``train_micro_batch_size`` has to be
set for the longest pairs, and micro-batches of short ones use a fraction of what the device
could hold. ``max_tokens_per_micro_batch: N`` keeps the engine's batches (steps, loss
normalisation and counters stay ChatLearn's) and runs each step's pairs (trainer: every
micro-batch of the step pooled; reference: each order; evaluation: each batch) in forwards of
at most N tokens (``chatlearn.algorithms.token_budget``): with packing, a pair costs its real
tokens; padded, its group's rows times the longest (groups hold pairs of similar length); a
pair above N runs alone (setup warns when N is below 2 × max_length, where the longest do).
The gradient is the same whatever the grouping (to float rounding), so with the budget set, a
large ``train_micro_batch_size`` (up to the global batch) lets the budget alone decide how much
each forward holds: memory is bounded by N, and short pairs share forwards.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from chatlearn.actors.module import TorchModule, setup_allowance
from chatlearn.actors.placement import ModelResources
from chatlearn.algorithms import DPOMetrics, accumulation_loss, compute_dpo, concatenated_logps
from chatlearn.algorithms.collectives import collective_device
from chatlearn.algorithms.dpo import REF_CHOSEN_KEY, REF_REJECTED_KEY, reference_outputs
from chatlearn.algorithms.logps import DEFAULT_CHUNK_SIZE, SequenceLogps
from chatlearn.algorithms.packing import PAIR_KEYS
from chatlearn.algorithms.token_budget import max_over_ranks, regroup_step
from chatlearn.config.errors import ConfigError
from chatlearn.hf.checkpoint import export_hf, full_state_dict, load_sharded, save_sharded
from chatlearn.hf.data import PROMPT_PLACEHOLDER, PreferenceCollator, PreferenceDataset
from chatlearn.hf.load_once import LoadOnce
from chatlearn.hf.load_turns import LoadTurns, stored_bytes
from chatlearn.hf.lora import apply_lora, module_lora_settings
from chatlearn.hf.memory import (
    format_memory_report,
    memory_report,
    out_of_memory_message,
    return_freed_memory,
)
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
    tied_gradient_in_place,
    validate_model_args,
)
from chatlearn.hf.packing import PackingOptions, packing_options, use_segment_attention
from chatlearn.hf.parallel import (
    Layout,
    set_gradient_sync,
    trainable_parameters,
    unwrap,
    zero_grad,
)
from chatlearn.hf.tokenizer import load_tokenizer

# The setup checks' warnings (`make gpu-check` fails an example run that logs one).
FULL_LOGITS_WARNING = "the log-probs come from the model's own forward instead"
DROPOUT_WARNING = "disable_dropout left randomness"
_DATA_KEYS = ("max_length", "max_prompt_length", "min_prompt_length", "prompt_template")
SHARDED_DIR = "sharded"  # beside the rank directories: one DCP checkpoint for all ranks
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
    def wrapped(self: _HFModule, *args: Any, **kwargs: Any) -> None:
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


class _HFModule(TorchModule):
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
            gpu = _this_device()
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
        device = _this_device()
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
        if type(self).build_model is _HFModule.build_model:
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
            empty = dataset.num_empty_responses + dataset.num_blank_responses
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


class HFReference(_HFModule):
    """The frozen reference: per-pair summed response log-probs."""

    def reference_store_key(self) -> dict[str, Any]:
        """What changes this module's outputs beyond its weights and the samples' tokens: the
        precision, the packed / prefix-shared forward and the log-prob chunking (the reference
        store keys entries by it; engine/reference_store.py)."""
        return {
            "layout": repr(self.layout),
            "packing": repr(self.packing),
            "logps_chunk_size": int(self.arg("logps_chunk_size", DEFAULT_CHUNK_SIZE)),
            **_logits_key(unwrap(self.network)),
        }

    def setup(self) -> None:
        super().setup()
        self.model.eval()
        self.model.requires_grad_(False)
        self.network = self.build_network(trainable=False)

    def forward_step(self, data: dict[str, Any], iteration: int = 0) -> dict[str, torch.Tensor]:
        with self.layout.autocast():
            if not self.layout.sharded:
                return reference_outputs(
                    self.network,
                    data,
                    pad_token_id=self.pad_token_id,
                    **self.packing.kwargs(),
                    **self.budget_options(),
                )
            return self._sharded_forward(data)

    def _sharded_forward(self, data: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Each rank scores its share of the rows (every rank must run the sharded forward),
        then the shares are all-gathered so the rank that sends has them all."""
        rows = int(data["chosen_input_ids"].shape[0])
        world, rank = self.layout.world_size, self.data_parallel_rank
        share = -(-rows // world)
        lo, hi = min(rows, rank * share), min(rows, (rank + 1) * share)
        if hi == lo:  # fewer rows than ranks: this rank scores row 0 again, then drops it
            lo, hi = 0, min(1, rows)
        part = {
            f"{side}_{key}": data[f"{side}_{key}"][lo:hi]
            for side in ("chosen", "rejected")
            for key in PAIR_KEYS
        }
        local = reference_outputs(
            self.network,
            part,
            pad_token_id=self.pad_token_id,
            **self.packing.kwargs(),
            **self.budget_options(),
        )
        out = _pair_tensors(data)
        for key in (REF_CHOSEN_KEY, REF_REJECTED_KEY):
            out[key] = _gather_rows(local[key], share, rows, world)
        return out


def _lora_error(
    model_args: Mapping[str, Any], model: Any, lora: Mapping[str, Any], failed: ValueError
) -> Exception:
    """peft's refusal of the LoRA settings (NoMatchingPeftModuleError: no module of the model
    has a name of ``target_modules``) as the ConfigError of that key."""
    prefix, error = locate_model_args(model_args)
    section = model_args.get("lora")
    key = "enable_lora" if not isinstance(section, Mapping) else "lora"
    if isinstance(section, Mapping) and "target_modules" in section:
        key = "lora.target_modules"
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linear = sorted(
        {
            name.rpartition(".")[2]
            for name, module in model.named_modules()
            if name and module is not head and type(module).__name__ in ("Linear", "Conv1D")
        }
    )
    shown = ", ".join(linear[:8]) + (", ..." if len(linear) > 8 else "")
    targets, name = lora["target_modules"], type(model).__name__
    if type(failed).__name__ == "NoMatchingPeftModuleError" or "not found" in str(failed):
        problem = f"no module of {name} matches {targets!r}"
    else:
        problem = f"peft cannot adapt {targets!r} in {name}: {' '.join(str(failed).split())}"
    return error(
        f"{prefix}.{key}",
        problem,
        f"name modules it has (its linear layers: {shown or 'none'}), or all-linear",
    )


def _logits_key(network: Any) -> dict[str, str]:
    """How the log-probs' logits are made from the head's output, for the reference store: {}
    where nothing is done to it (the keys of such models stay as they were), so that entries
    written while a Gemma2/Cohere/Granite model's post-processing was skipped (wrong log-probs)
    are not found."""
    if network.full_logits:
        return {"logits": "model forward"}
    return {"logits": repr(network.post)} if network.post is not None else {}


def _pair_tensors(data: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {
        f"{side}_{key}": data[f"{side}_{key}"].cpu()
        for side in ("chosen", "rejected")
        for key in PAIR_KEYS
    }


def _this_device() -> torch.device:
    """This process's GPU, else the CPU: where its model computes."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _token_metrics(tokens: torch.Tensor) -> dict[str, float]:
    """The step's real and computed tokens summed over the data-parallel ranks."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        tokens = tokens.to(collective_device())
        dist.all_reduce(tokens)
    real, computed = tokens.tolist()
    return {"tokens/real": real, "tokens/computed": computed}


def _gather_rows(local: torch.Tensor, share: int, rows: int, world: int) -> torch.Tensor:
    """Rank r's rows [r·share, (r+1)·share) of a [rows] tensor, all-gathered (padded to share)."""
    padded = torch.zeros(share, dtype=local.dtype, device=collective_device())
    mine = min(share, max(0, rows - torch.distributed.get_rank() * share))
    padded[:mine] = local[:mine].to(padded.device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    return torch.cat(parts)[:rows].cpu()


class HFDPOTrainer(_HFModule):
    """The policy: one AdamW step per ``train_step`` on the DPO objective."""

    last_tokens: tuple[int, int] = (0, 0)

    def setup(self) -> None:
        super().setup()
        if self.arg("gradient_checkpointing", False):
            self.model.gradient_checkpointing_enable()
            self.model.config.use_cache = False
        lora = module_lora_settings(self)
        if lora is not None:
            try:
                self.model = apply_lora(self.model, lora, seed=int(self.arg("seed", 0)))
            except ValueError as failed:  # peft: target_modules matched no module of the model
                raise _lora_error(self.model_args, self.model, lora, failed) from None
        self._check_trainable_dtype()
        tied_gradient_in_place(self.model)
        self.model.train()
        self.network = self.build_network(trainable=True)
        self.optimizer = torch.optim.AdamW(
            list(trainable_parameters(self.network)), **self._optimizer_settings()
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.grad_scaler = self.layout.grad_scaler()
        if self.data_parallel_rank == 0:
            report = format_memory_report(self.memory_report(), self.layout.describe())
            self._logger.info("%s: %s; forward: %s", self.name, report, self.packing.describe())

    def _check_trainable_dtype(self) -> None:
        """No float16 parameter to train: AdamW's eps (1e-8) is 0 in float16, and its update of
        a zero second moment is 0/0. A float16 checkpoint (how many models are published)
        loaded with dtype unset (the checkpoint's) trained to a NaN loss from the second step,
        without a word. bfloat16 has float32's range; LoRA's adapters train in float32."""
        if not any(p.requires_grad and p.dtype == torch.float16 for p in self.model.parameters()):
            return
        where, error = locate_model_args(self.model_args)
        dtype = self.model_args.get("dtype")
        given = f"dtype: {dtype}" if dtype else "dtype unset: the checkpoint's"
        raise error(
            f"{where}.dtype",
            f"the trainer's parameters are float16 ({given}), which AdamW cannot train: its "
            "eps (1e-8) is 0 in float16, and the loss is NaN from the second step",
            "set dtype: float32 (with mixed_precision: bf16, or fp16 on CUDA, for low-precision "
            "compute) or bfloat16, or train LoRA adapters (they train in float32)",
        )

    def _optimizer_settings(self) -> dict[str, Any]:
        return {
            "lr": float(self.arg("learning_rate", 1e-6)),
            "weight_decay": float(self.arg("weight_decay", 0.0)),
            "betas": tuple(float(b) for b in self.arg("adam_betas", (0.9, 0.999))),
            "eps": float(self.arg("adam_eps", 1e-8)),
        }

    def _apply_optimizer_settings(self, built: list[dict[str, Any]]) -> None:
        """After a checkpoint load: each param group's learning rate, weight decay, betas and
        eps as this run built them (``built``: from the configuration, a subclass's groups
        included), not the checkpoint's (its groups and the scheduler's base rates held the
        values of the run that wrote it; lowering the rate after a loss spike is the usual
        reason to change it on resume), and the rate of the schedule's current step under this
        run's schedule. The moments and the step count stay the checkpoint's; nothing differs,
        nothing is touched (an exact resume stays exact)."""
        step = self.scheduler.last_epoch
        lambdas = getattr(self.scheduler, "lr_lambdas", None)  # LambdaLR's (ours: _lr_factor)
        groups = self.optimizer.param_groups
        changed: list[str] = []
        for index, (group, wanted) in enumerate(zip(groups, built, strict=False)):
            for key, value in wanted.items():
                if key in group and tuple(_flat(group[key])) != tuple(_flat(value)):
                    name = {"initial_lr": "learning_rate", "betas": "adam_betas"}.get(key, key)
                    changed.append(f"{name} {group[key]} -> {value}")
                    group[key] = value
            if lambdas is not None and "initial_lr" in group:
                rate = group["initial_lr"] * lambdas[index](step)
                if group["lr"] != rate:
                    changed.append(f"rate of step {step + 1} {group['lr']:.6g} -> {rate:.6g}")
                    group["lr"] = rate
        if not changed:
            return
        if hasattr(self.scheduler, "base_lrs"):
            self.scheduler.base_lrs = [group.get("initial_lr", group["lr"]) for group in groups]
            self.scheduler._last_lr = [group["lr"] for group in groups]
        if self.data_parallel_rank == 0:
            self._logger.warning(
                "%s: the checkpoint's optimizer settings differ from this run's; this run's "
                "apply from here on (the moments and schedule position are the checkpoint's): "
                "%s",
                self.name,
                "; ".join(dict.fromkeys(changed)),
            )

    def memory_report(self) -> dict[str, Any]:
        """This rank's parameter, gradient and optimizer-state bytes (``chatlearn.hf.memory``)."""
        return memory_report(self.network, self.optimizer)

    def total_steps(self) -> int:
        """Optimizer steps of the whole run (ChatLearn's trainer iteration formula)."""
        runtime = self.runtime_args
        per_pass = math.ceil(runtime.sample_per_episode / runtime.train_global_batch_size)
        return max(1, runtime.num_episode * runtime.num_training_epoch * per_pass)

    def _lr_factor(self, step: int) -> float:
        total = self.total_steps()
        warmup = int(self.arg("warmup_steps", 0))
        warmup = warmup or int(float(self.arg("warmup_ratio", 0.0)) * total)
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        floor = float(self.arg("min_lr_ratio", 0.0))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def _objective(self, micro_batch: dict[str, Any], network: Any = None) -> Any:
        """The micro-batch's DPOOutput; its (real, computed) token counts in `self.last_tokens`."""
        with self.layout.autocast():
            policy = concatenated_logps(
                self.network if network is None else network,
                micro_batch,
                pad_token_id=self.pad_token_id,
                **self.packing.kwargs(),
            )
        self.last_tokens = (policy.num_real_tokens, policy.num_computed_tokens)
        rpo_alpha = self.model_args.get("rpo_alpha")
        return compute_dpo(
            policy,
            micro_batch[REF_CHOSEN_KEY],
            micro_batch[REF_REJECTED_KEY],
            beta=float(self.arg("beta", 0.1)),
            loss_type=str(self.arg("loss_type", "sigmoid")),
            label_smoothing=float(self.arg("label_smoothing", 0.0)),
            rpo_alpha=None if rpo_alpha is None else float(rpo_alpha),
        )

    def train_step(self, data: list[dict[str, Any]], iteration: int = 0) -> dict[str, float]:
        try:
            return self._train_step(data)
        except torch.OutOfMemoryError as error:
            report = self.memory_report()
            raise torch.OutOfMemoryError(
                out_of_memory_message(error, report, self.layout.describe())
            ) from error

    def _train_step(self, data: list[dict[str, Any]]) -> dict[str, float]:
        dp = self.data_parallel_size
        num_local = sum(int(mb[REF_CHOSEN_KEY].shape[0]) for mb in data)
        metrics = DPOMetrics(with_nll=self.model_args.get("rpo_alpha") is not None)
        tokens = torch.zeros(2, dtype=torch.float64)  # (real, computed) of the step
        scaler = self.grad_scaler
        zero_grad(self.optimizer, self.network)
        if self.token_budget is not None:
            data = self._within_budget(data)
        for index, micro_batch in enumerate(data):
            # DDP all-reduces gradients once per step, on the last micro-batch's backward
            with set_gradient_sync(self.network, index == len(data) - 1 or dp == 1):
                out = self._objective(micro_batch)
                tokens += torch.tensor(self.last_tokens, dtype=torch.float64)
                loss = accumulation_loss(
                    out.losses, num_samples_global=num_local * dp, world_size=dp
                )
                (loss if scaler is None else scaler.scale(loss)).backward()
            metrics.update(out)
        result = metrics.all_reduce().compute()
        result.update(_token_metrics(tokens))
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        max_norm = self.arg("max_grad_norm", 1.0)
        if max_norm:
            params = list(trainable_parameters(self.network))
            norm = torch.nn.utils.clip_grad_norm_(params, float(max_norm))
            full = getattr(norm, "full_tensor", None)  # FSDP2: the norm of the whole gradient
            result["grad_norm"] = float(full() if callable(full) else norm)
        result["learning_rate"] = float(self.scheduler.get_last_lr()[0])
        if scaler is None:
            self.optimizer.step()
        else:
            scaler.step(self.optimizer)
            scaler.update()
        self.scheduler.step()
        return result

    def _within_budget(self, data: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The step's pairs regrouped into forwards of at most ``max_tokens_per_micro_batch``
        tokens (the same number on every rank of a sharded model)."""
        assert self.token_budget is not None
        return regroup_step(
            data,
            self.token_budget,
            packing=self.packing.packing,
            prefix_sharing=self.packing.prefix_sharing,
            agree=self.budget_options()["agree"],
        )

    def eval_step(self, data: dict[str, Any]) -> dict[str, float]:
        """DPO metrics of the current policy on one held-out batch (no collectives but FSDP2's
        parameter gathering, so every rank must evaluate the same number of batches)."""
        parts = [data] if self.token_budget is None else self._within_budget([data])
        metrics = DPOMetrics(with_nll=self.model_args.get("rpo_alpha") is not None)
        self.model.eval()
        try:
            with torch.no_grad():
                # no DDP hooks outside a train step; FSDP2's are needed (sharded parameters)
                network = self.network if self.layout.sharded else unwrap(self.network)
                for part in parts:
                    metrics.update(self._objective(part, network))
        finally:
            self.model.train()
        return metrics.compute()

    # -- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self, iteration: int) -> None:
        """TorchModule's exact-resume state (or, under FSDP2, a sharded
        ``torch.distributed.checkpoint`` of model and optimizer beside the rank directories,
        plus scheduler and RNG per rank), and an HF-loadable ``hf_model`` directory with the
        tokenizer written by rank 0: ``AutoModelForCausalLM.from_pretrained(<dir>/hf_model)``;
        with LoRA also ``hf_model/adapter`` (``PeftModel.from_pretrained``)."""
        if not self.layout.sharded:
            super().save_checkpoint(iteration)
        else:
            directory = self.checkpoint_dir(iteration)
            directory.mkdir(parents=True, exist_ok=True)
            save_sharded(directory.parent / SHARDED_DIR, self.network, self.optimizer)
            self._save_rank_state(directory)
        if self.arg("save_hf_model", True):
            self.export_hf_model(self.checkpoint_dir(iteration) / "hf_model")

    def _save_rank_state(self, directory: Any) -> None:
        from chatlearn.actors.module import save_rank_state

        save_rank_state(directory, {"scheduler": self.scheduler})

    def load_checkpoint(self, iteration: int) -> None:
        keys = ("initial_lr", "weight_decay", "betas", "eps")
        built = [{k: g[k] for k in keys if k in g} for g in self.optimizer.param_groups]
        if not self.layout.sharded:
            super().load_checkpoint(iteration)
        else:
            from chatlearn.actors.module import load_rank_state

            directory = self.checkpoint_dir(iteration)
            load_sharded(directory.parent / SHARDED_DIR, self.network, self.optimizer)
            load_rank_state(directory, {"scheduler": self.scheduler})
        self._apply_optimizer_settings(built)

    def export_hf_model(self, target: Any) -> None:
        """The policy as a Hugging Face directory (collective under FSDP2: call it on every
        rank; only rank 0 writes, from a state dict gathered parameter by parameter)."""
        state = full_state_dict(self.model, sharded=self.layout.sharded)
        if self.data_parallel_rank != 0:
            return
        with _quiet_progress_bars():  # a bar per save would clutter the run's log
            export_hf(
                self.model,
                state,
                target,
                tokenizer=self.tokenizer,
                merge_lora=bool(self.arg("merge_lora", True)),
            )


def _flat(value: Any) -> Iterator[float]:
    """A number, or the numbers of a tuple or list, as floats (betas are saved as lists)."""
    if isinstance(value, list | tuple):
        for item in value:
            yield float(item)
    else:
        yield float(value)


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
