"""`HFDPOTrainer`: the DPO objective, AdamW with warm-up and cosine decay, checkpoints and the
Hugging Face export (chatlearn/hf/modules.py describes the modules and their model_args)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from chatlearn.algorithms import DPOMetrics, accumulation_loss, compute_dpo, concatenated_logps
from chatlearn.algorithms.collectives import collective_device
from chatlearn.algorithms.dpo import REF_CHOSEN_KEY, REF_REJECTED_KEY
from chatlearn.algorithms.token_budget import regroup_step
from chatlearn.hf.base import HFModule
from chatlearn.hf.checkpoint import (
    cast_state,
    export_hf,
    export_holds_state,
    frozen_digest,
    full_state_dict,
    load_exported_state,
    load_optimizer_state,
    load_sharded,
    optimizer_share,
    quiet_progress_bars,
    safetensors_files,
    save_sharded,
    trainable_state,
)
from chatlearn.hf.lora import apply_lora, is_peft_model, module_lora_settings
from chatlearn.hf.memory import (
    format_memory_report,
    memory_report,
    out_of_memory_message,
    storage_bytes,
)
from chatlearn.hf.model import locate_model_args, tied_gradient_in_place
from chatlearn.hf.parallel import set_gradient_sync, trainable_parameters, unwrap, zero_grad

SHARDED_DIR = "sharded"  # beside the rank directories: one DCP checkpoint for all ranks
ADAPTERS_FILE = "adapters.pt"  # a LoRA trainer's: its adapters and its base's digest


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


def _token_metrics(tokens: torch.Tensor) -> dict[str, float]:
    """The step's real and computed tokens summed over the data-parallel ranks."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        tokens = tokens.to(collective_device())
        dist.all_reduce(tokens)
    real, computed = tokens.tolist()
    return {"tokens/real": real, "tokens/computed": computed}


class HFDPOTrainer(HFModule):
    """The policy: one AdamW step per ``train_step`` on the DPO objective."""

    last_tokens: tuple[int, int] = (0, 0)
    _frozen_digest: str | None = None

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
        """The exact-resume state, and an HF-loadable ``hf_model`` directory with the tokenizer
        written by rank 0: ``AutoModelForCausalLM.from_pretrained(<dir>/hf_model)``; with LoRA
        also ``hf_model/adapter`` (``PeftModel.from_pretrained``). Where that export is heavy
        and not the resume state, only at the run's end and on request (`_final_save`): under
        FSDP2 ``hf_model`` itself, with LoRA its merged weights (periodic checkpoints hold the
        adapter alone).

        Every rank writes its RNG and scheduler states. The model and the optimizer state are
        written once: under FSDP2 as one sharded ``torch.distributed.checkpoint`` beside the rank
        directories (every rank its shards); otherwise (one process, or DDP, whose ranks hold
        the same weights and moments) the weights by rank 0, in ``hf_model`` where that holds
        them exactly (``model.pt`` where it does not, ``save_hf_model: false``; with LoRA the
        adapters, ``adapters.pt``), and the optimizer's moments in shares, one a rank, balanced
        by bytes with rank 0's weights (``optimizer_share``); every rank reads them all back.
        For a 7B model over 8 DDP ranks that is 84 GB written and hashed at a save, not 700,
        and at most 28 GB by any one rank."""
        directory = self.checkpoint_dir(iteration)
        directory.mkdir(parents=True, exist_ok=True)
        if self.layout.sharded:
            save_sharded(directory.parent / SHARDED_DIR, self.network, self.optimizer)
        exported = directory / "hf_model"
        final = self._final_save()
        if self.arg("save_hf_model", True) and (final or self._export_is_state()):
            # collective under FSDP2; rank 0 writes
            self.export_hf_model(exported, merged=final)
        if not self.layout.sharded and self.data_parallel_rank == 0:
            if is_peft_model(self.model):
                # the adapters; the frozen base is what setup builds again, checked at a resume
                adapters = {"state": trainable_state(self.model), "base": self._base_digest()}
                torch.save(adapters, directory / ADAPTERS_FILE)
            elif not export_holds_state(exported, self.model):
                torch.save(self.model.state_dict(), directory / "model.pt")
        if not self.layout.sharded:
            # the moments in shares written in parallel, balanced by bytes with the weights
            # rank 0 writes besides
            ranks = self.layout.world_size
            if ranks == 1:
                torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")
            else:
                weights = 0 if is_peft_model(self.model) else storage_bytes(self.model.parameters())
                share = optimizer_share(self.optimizer, self.data_parallel_rank, ranks, weights)
                torch.save(share, directory / "optimizer.pt")
        self._save_rank_state(directory)

    def _final_save(self) -> bool:
        """Whether this save is the run's end's or one asked for (``engine.save_checkpoint()``,
        or the module's own call), which write the whole HF export. The others (periodic, and a
        graceful stop's, whose time ``stop_timeout`` bounds) write only what the resume needs
        besides: where ``hf_model`` holds the weights (one process, DDP) it is written at every
        save, but under FSDP2, whose sharded checkpoint holds them, it would gather the whole
        model on rank 0 and write it from that one process (a 7B model's 14-28 GB: a minute or
        more, every GPU idle), and a LoRA model's merged weights are the whole model too, for
        adapters of a few MB. ``chatlearn export`` writes the whole export of any checkpoint
        afterwards (chatlearn/hf/export.py)."""
        return self.checkpoint_reason in (None, "end", "request")

    def final_checkpoint_extra_bytes(self) -> int:
        """What the run's last save writes on this rank beyond a periodic one: the export its
        periodic saves leave out (`_final_save`), written by rank 0: under FSDP2 or in
        ``export_dtype`` the whole model, with LoRA the merged weights (the base's size; a 70B
        base's 140 GB in bf16, for periodic checkpoints of a few MB), in the export's dtype."""
        if self._final_save() or self.data_parallel_rank != 0:
            return 0
        if not self.arg("save_hf_model", True):
            return 0
        lora = is_peft_model(self.model)
        if lora and not self.arg("merge_lora", True):
            return 0
        if not lora and self._export_is_state():
            return 0  # its periodic saves write the export as well
        dtype = self.export_dtype

        def written(param: Any) -> int:  # global sizes (a DTensor's numel is the whole's)
            cast = dtype is not None and param.is_floating_point()
            return param.numel() * (dtype.itemsize if cast else param.element_size())

        return sum(
            written(p)
            for name, p in self.model.named_parameters()
            if not (lora and "lora_" in name)
        )

    @property
    def export_dtype(self) -> Any:
        """The dtype of the HF export's floating weights (``export_dtype``; None: the weights'
        own, e.g. the fp32 master weights of mixed precision)."""
        from chatlearn.hf.model import resolve_dtype

        dtype = resolve_dtype(self.arg("export_dtype"))
        own = {p.dtype for p in self.model.parameters() if p.is_floating_point()}
        return None if dtype is None or own == {dtype} else dtype

    def _export_is_state(self) -> bool:
        """Whether ``hf_model`` holds the resume's weights (written at every save): one process
        or DDP, in the weights' own dtype. Under FSDP2 the sharded checkpoint holds them; in
        another ``export_dtype`` ``model.pt`` does, and the export, as under FSDP2, is written
        at the run's end and on request."""
        return not self.layout.sharded and self.export_dtype is None

    def _base_digest(self) -> str:
        """`frozen_digest` of the LoRA model's base, hashed once a process: it never changes."""
        if self._frozen_digest is None:
            self._frozen_digest = frozen_digest(self.model)
        return self._frozen_digest

    def _save_rank_state(self, directory: Any) -> None:
        from chatlearn.actors.module import save_rank_state

        save_rank_state(directory, self._rank_state())

    def _rank_state(self) -> dict[str, Any]:
        """What every rank saves of its own beside its RNG states: the learning-rate schedule,
        and with fp16 the loss scaler (its scale and the steps since it last grew: a resume
        that started it at 65536 again skipped steps until it had backed off once more)."""
        state: dict[str, Any] = {"scheduler": self.scheduler}
        if self.grad_scaler is not None:
            state["grad_scaler"] = self.grad_scaler
        return state

    def load_checkpoint(self, iteration: int) -> None:
        from chatlearn.actors.module import load_rank_state

        keys = ("initial_lr", "weight_decay", "betas", "eps")
        built = [{k: g[k] for k in keys if k in g} for g in self.optimizer.param_groups]
        directory = self.checkpoint_dir(iteration)
        if not directory.is_dir():
            raise FileNotFoundError(f"{self.name}: no checkpoint directory {directory}")
        if self.layout.sharded:
            load_sharded(directory.parent / SHARDED_DIR, self.network, self.optimizer)
        else:
            self._load_replicated(directory)
        load_rank_state(directory, self._rank_state(), logger=self._logger)
        self._apply_optimizer_settings(built)

    def _load_replicated(self, directory: Any) -> None:
        """Weights and optimizer state of a one-process or DDP trainer: this rank's own files
        where a checkpoint has them (as every rank wrote them before), else rank 0's."""
        first = directory.parent / "rank_0"
        for source in dict.fromkeys((directory, first)):  # rank 0's own directory once
            if (source / "model.pt").is_file():
                state = torch.load(source / "model.pt", map_location="cpu", weights_only=True)
                self.model.load_state_dict(state)
                break
            if is_peft_model(self.model) and (source / ADAPTERS_FILE).is_file():
                self._load_adapters(source / ADAPTERS_FILE)
                break
            if not is_peft_model(self.model) and safetensors_files(source / "hf_model"):
                load_exported_state(source / "hf_model", self.model)
                break
        else:
            raise FileNotFoundError(
                f"{self.name}: the checkpoint has no weights: no model.pt, {ADAPTERS_FILE} or "
                f"hf_model in {first}"
            )
        optimizer = directory / "optimizer.pt"
        if not optimizer.is_file():
            optimizer = first / "optimizer.pt"
        if not optimizer.is_file():
            raise FileNotFoundError(f"{self.name}: the checkpoint has no {optimizer}")
        self.optimizer.load_state_dict(load_optimizer_state(optimizer))

    def _load_adapters(self, path: Any) -> None:
        """A LoRA checkpoint's adapters onto the base this run's setup built, which must be
        the one they were trained on (another model_path, or another seed for a base built
        from model_config, would have resumed without a word on weights never trained)."""
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved["base"] != self._base_digest():
            given = self.model_args.get("model_path")
            key = "model_path" if given else "seed"
            base = f"model_path {given}" if given else "the seed's random initialisation"
            where, error = locate_model_args(self.model_args)
            raise error(
                f"{where}.{key}",
                f"the checkpoint's LoRA adapters ({path}) were trained on other base weights "
                f"than this run's ({base}): resumed, they would train on a base they never saw",
                "resume with the base model the run was started with, or start a new run "
                "(another output_dir, or enable_resume_training: false)",
            )
        missing, unexpected = self.model.load_state_dict(saved["state"], strict=False)
        untrained = sorted(set(missing) & set(trainable_state(self.model)))
        if unexpected or untrained:
            raise ValueError(
                f"{path} holds other adapters than this model's (unexpected: "
                f"{sorted(unexpected)[:3]}, missing: {untrained[:3]})"
            )

    def export_hf_model(self, target: Any, *, merged: bool = True) -> None:
        """The policy as a Hugging Face directory (collective under FSDP2: call it on every
        rank; only rank 0 writes, from a state dict gathered parameter by parameter).
        ``merged``: with LoRA, the merged weights too (as ``merge_lora`` says); without them
        an unsharded model's adapter is written from the adapters' tensors alone."""
        if self.data_parallel_rank != 0 and not self.layout.sharded:
            return  # a replica: rank 0 has the same weights (no copy of them to host memory)
        lora = is_peft_model(self.model)
        if lora and not merged and not self.layout.sharded:  # not the base, onto the host
            state = {k: v.detach().cpu() for k, v in trainable_state(self.model).items()}
        else:
            state = full_state_dict(self.model, sharded=self.layout.sharded)
        if self.data_parallel_rank != 0:
            return
        dtype = self.export_dtype
        if not (lora and merged):  # merged weights: merged, then cast (by export_hf)
            state = cast_state(state, dtype, in_place=True)  # one full copy at most
        with quiet_progress_bars():  # a bar per save would clutter the run's log
            export_hf(
                self.model,
                state,
                target,
                tokenizer=self.tokenizer,
                merge_lora=merged and bool(self.arg("merge_lora", True)),
                dtype=dtype,
            )


def _flat(value: Any) -> Iterator[float]:
    """A number, or the numbers of a tuple or list, as floats (betas are saved as lists)."""
    if isinstance(value, list | tuple):
        for item in value:
            yield float(item)
    else:
        yield float(value)
