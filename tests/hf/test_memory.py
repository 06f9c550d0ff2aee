"""Memory beyond the training state: tied embeddings' gradients summed in place, glibc giving
freed tensors back to the system, and the option that controls it.

(FSDP2's early reshard of the root and its in-place reduce-scatter run in test_layouts.py, on
two gloo processes.)
"""

from __future__ import annotations

import contextlib
import copy
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import torch

from chatlearn.algorithms.logps import SequenceLogps
from chatlearn.config.errors import ConfigError
from chatlearn.hf import build_causal_lm
from chatlearn.hf.lora import apply_lora
from chatlearn.hf.memory import return_freed_memory
from chatlearn.hf.model import TiedHeadLinear, model_arg, tied_gradient_in_place

VOCAB, HIDDEN = 8192, 32
TIED = {
    "hidden_size": HIDDEN,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB,
    "tie_word_embeddings": True,
}


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, VOCAB, (2, 24), generator=generator)
    loss_mask = torch.zeros_like(input_ids)
    loss_mask[:, 10:] = 1
    return input_ids, torch.ones_like(input_ids), loss_mask


def _backward(model: Any, chunk_size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Log-probs, gradients, and how many weight-sized buffers the backward allocated."""
    from torch.profiler import ProfilerActivity, profile

    model.zero_grad(set_to_none=True)
    network = SequenceLogps.from_causal_lm(model, chunk_size=chunk_size)
    logps, _ = network(*_batch())
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        logps.sum().backward()
    weight_bytes = VOCAB * HIDDEN * 4
    sizes = [
        event.nbytes()
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.nbytes() >= weight_bytes
    ]
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logps.detach(), grads, len(sizes)


@pytest.mark.parametrize("chunk_size", [4, 0])
def test_tied_gradients_are_summed_in_place_with_identical_results(chunk_size: int) -> None:
    plain = build_causal_lm(TIED, seed=0)
    tied = copy.deepcopy(plain)
    assert tied_gradient_in_place(tied)
    assert type(tied.lm_head) is TiedHeadLinear
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    logps, grads, buffers = _backward(plain, chunk_size)
    tied_logps, tied_grads, tied_buffers = _backward(tied, chunk_size)
    assert torch.equal(logps, tied_logps)
    assert grads.keys() == tied_grads.keys()
    assert all(torch.equal(grads[name], tied_grads[name]) for name in grads)
    # plain: the head's gradient, the embedding's, and their sum; in place: no sum
    assert tied_buffers == buffers - 1, (buffers, tied_buffers)


def test_tied_gradient_in_place_leaves_other_models_alone() -> None:
    untied = build_causal_lm({**TIED, "tie_word_embeddings": False}, seed=0)
    assert not tied_gradient_in_place(untied)
    assert type(untied.lm_head) is torch.nn.Linear
    frozen = build_causal_lm(TIED, seed=0).requires_grad_(False)
    assert not tied_gradient_in_place(frozen)
    lora = apply_lora(build_causal_lm(TIED, seed=0), {"r": 2, "alpha": 4, "dropout": 0.0,
                                                      "target_modules": ["q_proj"]})  # fmt: skip
    assert not tied_gradient_in_place(lora)  # the base (and its tied weight) is frozen


def test_tied_head_under_autocast_is_the_plain_head() -> None:
    plain = build_causal_lm(TIED, seed=0)
    tied = copy.deepcopy(plain)
    tied_gradient_in_place(tied)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts inside F.linear
        logps, grads, _ = _backward(plain, 4)
        tied_logps, tied_grads, _ = _backward(tied, 4)
    assert torch.equal(logps, tied_logps)
    assert all(torch.equal(grads[name], tied_grads[name]) for name in grads)


_RSS_SCRIPT = """
import sys, torch
from chatlearn.hf.memory import return_freed_memory

def rss():
    with open("/proc/self/status") as status:
        return next(int(l.split()[1]) for l in status if l.startswith("VmRSS:")) * 1024

applied = return_freed_memory(int(sys.argv[1]))
# freeing a 24 MiB block makes glibc's dynamic threshold 24 MiB: 4 MiB blocks then come from its
# heap, where freeing every other one leaves holes that the heap cannot give back
big = torch.ones(24 << 18); del big
before = rss()
blocks = [torch.ones(1 << 20) for _ in range(48)]  # 4 MiB each
del blocks[::2]
kept = 24 * 4
print(applied, (rss() - before) / 2**20 - kept)
"""


def _rss_growth(threshold: int) -> tuple[bool, float]:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_RSS_SCRIPT), str(threshold)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    applied, growth = done.stdout.split()
    return applied == "True", float(growth)


@pytest.mark.timeout(120)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc")
def test_freed_tensors_leave_the_process() -> None:
    applied, growth = _rss_growth(128 * 1024)
    assert applied
    assert growth < 16, growth  # beyond the blocks still held: 96 MiB allocated and freed
    kept, default_growth = _rss_growth(0)  # glibc's own dynamic threshold
    assert not kept
    assert default_growth > 64, default_growth  # what the option is for


def test_mmap_threshold_option() -> None:
    assert model_arg({}, "malloc_mmap_threshold") == 0  # off unless asked: it costs page faults
    assert model_arg({"malloc_mmap_threshold": 131072}, "malloc_mmap_threshold") == 131072
    assert model_arg({"malloc_mmap_threshold": 0}, "malloc_mmap_threshold") == 0
    assert not return_freed_memory(0)
    for bad in (-1, "128k", 1 << 30, True):
        with pytest.raises(ConfigError, match="malloc_mmap_threshold"):
            model_arg({"malloc_mmap_threshold": bad}, "malloc_mmap_threshold")
    assert model_arg({}, "max_tokens_per_micro_batch") is None
    with pytest.raises(ConfigError, match="max_tokens_per_micro_batch"):
        model_arg({"max_tokens_per_micro_batch": 0}, "max_tokens_per_micro_batch")


def test_ddp_holds_no_gradients_beyond_the_report() -> None:
    # DDP kept its all-reduce buckets beside the gradients: 20 B/param where the report, the
    # start-up log and the README said 16. Its gradients are now views of the buckets, so the
    # report's gradient bytes (their storages) are all it holds for them.
    import torch.distributed as dist

    from chatlearn.hf.memory import memory_report
    from chatlearn.hf.parallel import Layout, zero_grad

    network = SequenceLogps.from_causal_lm(build_causal_lm(TIED, seed=0), chunk_size=4)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ddp = Layout("ddp", world_size=2).wrap(network, trainable=True)  # one rank will do
        optimizer = torch.optim.AdamW(ddp.parameters())
        for _ in range(2):  # DDP rebuilds its buckets in the first step
            zero_grad(optimizer, ddp)
            for sync in (False, True):  # micro-batches, as the trainer accumulates them
                with contextlib.nullcontext() if sync else ddp.no_sync():
                    logps, _ = ddp(*_batch())
                    logps.sum().backward()
                grads = (p.grad.untyped_storage() for p in ddp.parameters())
                storages = {storage.data_ptr(): storage.nbytes() for storage in grads}
                if not sync:
                    accumulated_in = storages.keys()
            optimizer.step()
        report = memory_report(ddp, optimizer)
        # zero-filled copies of DDP's buckets: their number and sizes
        buckets = [b.buffer() for b in ddp.reducer._get_zeros_like_grad_buckets()]
    finally:
        dist.destroy_process_group()
    assert sorted(storages.values()) == sorted(b.nbytes for b in buckets)
    assert report["grad_bytes"] == sum(b.nbytes for b in buckets)
    # nor gradients beside the buckets while a step accumulates its micro-batches
    assert accumulated_in == storages.keys()


def test_fsdp2_keeps_the_root_for_a_lora_adapted_embedding() -> None:
    # LoRA on embed_tokens under parallel: fsdp failed the first backward ("setStorage: ...
    # out of bounds for storage of size 0"): the root was resharded when the backward passed the
    # last layer, yet the adapter's backward needs its lora_embedding_B after that; peft reads
    # the adapter's parameters without calling their ParameterDict, so no hook saw them run
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from chatlearn.hf.parallel import _fully_shard

    lora = {"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["embed_tokens", "q_proj"]}
    model = apply_lora(build_causal_lm({**TIED, "vocab_size": 256}, seed=0), lora)
    batch = [t.remainder(256) for t in _batch()]
    reference = SequenceLogps.from_causal_lm(copy.deepcopy(model), chunk_size=4)
    reference(*batch)[0].sum().backward()
    expected = {n: p.grad for n, p in reference.body.named_parameters() if p.grad is not None}
    network = SequenceLogps.from_causal_lm(model, chunk_size=4)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        _fully_shard(network, init_device_mesh("cpu", (1,)), MixedPrecisionPolicy(), trainable=True)
        network(*batch)[0].sum().backward()
        grads = {
            name: param.grad.full_tensor()
            for name, param in network.body.named_parameters()
            if param.grad is not None
        }
    finally:
        dist.destroy_process_group()
    assert grads.keys() == expected.keys() and any("lora_embedding_B" in k for k in grads)
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name], grad, msg=name)
