"""How the Hugging Face modules lay a model out over its processes: DDP or FSDP2, mixed precision.

    layout = Layout.from_args(model_args, world_size=2, device_type="cpu")
    network = layout.wrap(SequenceLogps.from_causal_lm(model), trainable=True)
    with layout.autocast():
        logps, num_tokens = network(input_ids, attention_mask, loss_mask)

- ``parallel: ddp`` (default): every rank holds the whole model; gradients are all-reduced (one
  process: nothing to wrap).
- ``parallel: fsdp``: ``torch.distributed.fsdp.fully_shard`` on every decoder layer, then on the
  root (the ``SequenceLogps`` wrapper, so its pre-forward hook gathers the embeddings, norm and
  head), over the model's own process group (gloo on CPU, NCCL on CUDA). When the model's ranks
  span hosts (``LOCAL_WORLD_SIZE`` < world size, as ``chatlearn launch`` sets it), parameters are
  sharded within a host and replicated across hosts (HSDP, a 2-D device mesh); ``hsdp: false``
  shards over all ranks instead.
- ``mixed_precision: bf16|fp16``: compute in the low precision, keep fp32 master weights,
  optimizer state and gradient reduction: FSDP2's ``MixedPrecisionPolicy`` under FSDP, autocast
  otherwise. fp16 needs a loss scaler (``GradScaler``) and so CUDA.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from chatlearn.config.errors import ConfigError, ValueProblem
from chatlearn.config.model_args import mixed_precision
from chatlearn.hf.model import locate_model_args

PARALLEL_MODES = ("none", "ddp", "fsdp")
_COMPUTE_DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True, slots=True)
class Layout:
    """A model's parallel layout and precision on its `world_size` processes."""

    parallel: str = "ddp"
    mixed_precision: str = "no"
    world_size: int = 1
    device_type: str = "cpu"
    num_hosts: int = 1  # > 1: HSDP (shard within a host, replicate across hosts)

    @classmethod
    def from_args(
        cls, model_args: Mapping[str, Any], *, world_size: int, device_type: str
    ) -> Layout:
        """The layout ``model_args`` ask for; a setting it cannot have is the ConfigError of its
        key (with its file:line for a model of the process-wide config)."""
        parallel = str(model_args.get("parallel") or "ddp").lower()
        if parallel not in PARALLEL_MODES:
            raise _error(
                model_args,
                "parallel",
                f"must be one of {', '.join(PARALLEL_MODES)}, not {parallel!r}",
                "set parallel: ddp (a whole model per rank) or fsdp (sharded)",
            )
        try:
            precision = mixed_precision(model_args.get("mixed_precision"))
        except ValueProblem as problem:
            raise _error(model_args, "mixed_precision", problem.problem, problem.fix) from None
        if precision == "fp16" and device_type != "cuda":
            raise _error(
                model_args,
                "mixed_precision",
                "fp16 needs a loss scaler, which needs CUDA",
                "on CPU use mixed_precision: bf16 (or no)",
            )
        hosts = _num_hosts(world_size) if model_args.get("hsdp", True) else 1
        return cls(parallel, precision, world_size, device_type, hosts if parallel == "fsdp" else 1)

    @property
    def sharded(self) -> bool:
        return self.parallel == "fsdp" and self.world_size > 1

    @property
    def compute_dtype(self) -> torch.dtype | None:
        return _COMPUTE_DTYPES[self.mixed_precision]

    def describe(self) -> str:
        if self.sharded:
            how = f"FSDP2 over {self.world_size} ranks"
            if self.num_hosts > 1:
                how += f" (HSDP: {self.num_hosts} hosts × {self.world_size // self.num_hosts})"
        elif self.parallel == "ddp" and self.world_size > 1:
            how = f"DDP over {self.world_size} ranks"
        else:
            how = "one process"
        return f"{how}, mixed precision {self.mixed_precision}, {self.device_type}"

    # -- wrapping --------------------------------------------------------------------------
    def wrap(self, network: nn.Module, *, trainable: bool, in_sync: bool = False) -> nn.Module:
        """`network` sharded (FSDP2, in place) or DDP-wrapped as the layout says. ``in_sync``:
        every rank holds rank 0's parameters and buffers already, of shapes agreed (load_once),
        so DDP need not check and broadcast them all again."""
        if self.sharded:
            _fully_shard(network, self._mesh(), self._mp_policy(), trainable=trainable)
            return network
        self.check(trainable=trainable)
        if trainable and self.parallel != "none" and self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            cuda = self.device_type == "cuda"
            device_ids = [torch.cuda.current_device()] if cuda else None
            # The gradients are views of DDP's all-reduce buckets, not a second gradient-sized
            # copy beside them (20 B/param, not 16; `zero_grad` keeps them views).
            options: dict[str, Any] = {"device_ids": device_ids, "gradient_as_bucket_view": True}
            if in_sync and _ddp_takes("init_sync"):
                options["init_sync"] = False
            return DistributedDataParallel(network, **options)
        return network

    def check(self, *, trainable: bool) -> None:
        """The ConfigError of a layout that cannot run this model (before it is built)."""
        if trainable and self.parallel == "none" and self.world_size > 1:
            # the layout has no model args: the modules locate the key (`located_errors`)
            raise ConfigError(
                f"none cannot train on {self.world_size} ranks (their gradients would never meet)",
                key="model_args.parallel",
                fix="use parallel: ddp or fsdp, or one process",
            )

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Low-precision compute outside FSDP2 (whose policy casts the parameters itself)."""
        dtype = self.compute_dtype
        if dtype is None or self.sharded:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=dtype)

    def grad_scaler(self) -> Any:
        """fp16's loss scaler (None otherwise). Under FSDP2 ranks hold different gradient shards,
        so the scaler that agrees on infs across ranks is the sharded one."""
        if self.mixed_precision != "fp16":
            return None
        if self.sharded:
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            return ShardedGradScaler("cuda")
        return torch.amp.GradScaler("cuda")

    def _mesh(self) -> Any:
        from torch.distributed.device_mesh import init_device_mesh

        if self.num_hosts > 1:
            shape = (self.num_hosts, self.world_size // self.num_hosts)
            return init_device_mesh(self.device_type, shape, mesh_dim_names=("replicate", "shard"))
        return init_device_mesh(self.device_type, (self.world_size,), mesh_dim_names=("shard",))

    def _mp_policy(self) -> Any:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        # fp32 reduction: gradients are averaged over ranks at full precision
        return MixedPrecisionPolicy(param_dtype=self.compute_dtype, reduce_dtype=torch.float32)


def _error(model_args: Mapping[str, Any], key: str, problem: str, fix: str) -> ConfigError:
    prefix, error = locate_model_args(model_args)
    return error(f"{prefix}.{key}", problem, fix)


def _ddp_takes(argument: str) -> bool:
    """Whether this torch's DDP constructor takes `argument` (``init_sync``: torch 2.4 on)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    return argument in inspect.signature(DistributedDataParallel.__init__).parameters


def _num_hosts(world_size: int) -> int:
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size) or world_size)
    if 0 < local < world_size and world_size % local == 0:
        return world_size // local
    return 1


def decoder_layers(network: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: Hugging Face names their classes in
    `_no_split_modules` (e.g. `LlamaDecoderLayer`)."""
    names: set[str] = set()
    for module in network.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return [m for m in network.modules() if type(m).__name__ in names]


def _fully_shard(network: nn.Module, mesh: Any, mp_policy: Any, *, trainable: bool) -> None:
    from torch.distributed.fsdp import fully_shard

    layers = decoder_layers(network)
    if not layers:
        raise ValueError(
            f"parallel: fsdp found no decoder layers in {type(network).__name__} "
            "(no `_no_split_modules`); use parallel: ddp for this model"
        )
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp_policy)
    # The root keeps its parameters gathered between forward and backward when training (they
    # are needed again at once); a forward-only reference frees them too.
    fully_shard(
        network, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=None if trainable else True
    )
    if trainable:
        reshard_root_after_last_layer(network, layers)
        comm = gloo_reduce_scatter() if mesh.device_type == "cpu" else None
        if comm is not None and hasattr(network, "set_custom_reduce_scatter"):
            for module in (*layers, network):
                module.set_custom_reduce_scatter(comm)  # type: ignore[operator]


def gloo_reduce_scatter() -> Any:
    """FSDP2's gradient reduce-scatter for gloo without gloo's copy of the input (None where
    this torch has no custom reduce-scatter).

    gloo reduce-scatters a flat buffer by all-reducing a copy of it and keeping this rank's
    chunk: a second buffer of the whole unit's gradients (0.5 GiB for the root of Qwen2.5-0.5B,
    whose tied embedding is a quarter of the model). FSDP2's input buffer is its own temporary,
    so this all-reduces it in place and copies the chunk out: the same sums, the same traffic.
    """
    import torch.distributed as dist

    try:  # a private API (torch >= 2.8); without it, gloo's own reduce-scatter is used
        from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter
    except ImportError:
        return None

    class InPlaceReduceScatter(ReduceScatter):
        def allocate(self, size: Any, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
            return torch.empty(*size, dtype=dtype, device=device)

        def __call__(
            self,
            output_tensor: torch.Tensor,
            input_tensor: torch.Tensor,
            group: Any,
            op: Any,
            async_op: bool = False,
        ) -> None:
            dist.all_reduce(input_tensor, op=op, group=group)
            chunks = input_tensor.view(dist.get_world_size(group), -1)
            output_tensor.copy_(chunks[dist.get_rank(group)])

    return InPlaceReduceScatter()


def reshard_root_after_last_layer(network: nn.Module, layers: list[nn.Module]) -> None:
    """Free the FSDP2 root's gathered parameters once the backward has passed the last layer.

    The root holds what is outside the decoder layers: the embeddings, the final norm, the output
    head (one weight when tied: 152k × 896 floats, 0.5 GiB, for Qwen2.5-0.5B). FSDP2 keeps them
    gathered for the whole backward and frees them only after reduce-scattering their gradients at
    its end, yet they are last needed when the gradient reaches the last layer's output: the head
    and the final norm have run their backward by then, and an embedding's backward reads only the
    token ids. So a gradient hook on the last layer's output reshards the root there, for the
    whole backward through the layers; its gradients are kept and reduce-scattered as before.

    Only when no other root module with parameters runs before the last layer (a norm right
    after the embedding, as in Bloom, needs its weight in a later backward), checked each forward.
    """
    try:  # private; where missing, the root stays gathered to the backward's end as before
        from torch._C import _current_graph_task_id
    except ImportError:
        return

    inside = {id(p) for layer in layers for p in layer.parameters()}
    modules = dict(network.named_modules())
    early: dict[int, nn.Module] = {}
    for name, module in modules.items():
        if isinstance(module, nn.Embedding) or all(
            id(p) in inside for p in module.parameters(recurse=False)
        ):
            continue
        while isinstance(module, nn.ParameterDict | nn.ParameterList) and name:
            # never called: its parameters are read by the module holding it (peft's LoRA
            # embedding reads lora_embedding_A/B, whose backward needs B, before the layers)
            name = name.rpartition(".")[0]
            module = modules[name]
        early[id(module)] = module
    last = layers[-1]
    state = {"last_layer_ran": False, "unsafe": False}

    def start(*_: Any) -> None:
        state.update(last_layer_ran=False, unsafe=False)

    def root_module_runs(*_: Any) -> None:
        if not state["last_layer_ran"]:
            state["unsafe"] = True

    def reshard(grad: torch.Tensor) -> torch.Tensor:
        network.reshard()  # type: ignore[operator]
        return grad

    def last_layer_ran(module: nn.Module, args: Any, output: Any) -> None:
        state["last_layer_ran"] = True
        hidden = output[0] if isinstance(output, tuple) else output
        in_backward = _current_graph_task_id() != -1  # recomputed by gradient checkpointing
        if (
            not state["unsafe"]
            and not in_backward
            and isinstance(hidden, torch.Tensor)
            and hidden.requires_grad
        ):
            hidden.register_hook(reshard)

    network.register_forward_pre_hook(start)
    for module in early.values():
        module.register_forward_pre_hook(root_module_runs)
    # before FSDP2's own post-forward hook, so that this gradient hook runs before the one FSDP2
    # puts on the same output to gather the last layer (and prefetch the next) for its backward
    last.register_forward_hook(last_layer_ran, prepend=True)


def set_gradient_sync(network: nn.Module, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    """DDP's `no_sync()` for a micro-batch that is not the last of a step; FSDP2 reduce-scatters
    every micro-batch (accumulating unsharded gradients would cost the memory it saves)."""
    no_sync = getattr(network, "no_sync", None)
    if enabled or not callable(no_sync):
        return contextlib.nullcontext()
    return no_sync()


def zero_grad(optimizer: torch.optim.Optimizer, network: nn.Module) -> None:
    """The gradients zeroed before a step. DDP's are views of its all-reduce buckets, which it
    holds all run: zeroed in place they stay views. Set to None, the next backward would make
    new ones beside the buckets (for the micro-batches under `no_sync`; copied into the buckets
    at the last), and the process keep both: 1212 MiB resident, not 1057, for a 42.5M-parameter
    model. Elsewhere they are set to None: nothing holds their memory between steps."""
    optimizer.zero_grad(set_to_none=unwrap(network) is network)


def unwrap(network: nn.Module) -> nn.Module:
    """The module under a DDP wrapper (FSDP2 shards in place: the same object)."""
    return getattr(network, "module", network)


def trainable_parameters(network: nn.Module) -> Iterator[nn.Parameter]:
    return (p for p in network.parameters() if p.requires_grad)
