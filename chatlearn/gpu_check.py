"""`make gpu-check` (`chatlearn gpu-check`): verify every CUDA path of the project on this machine.

Run it on a machine with NVIDIA GPUs (a rented one will do: clone, ``make gpu-check``); nothing is
downloaded (models are built from configs), it takes a few minutes at most, prints one line per
check with its figure, and exits 1 if any check failed:

    PASS  gpu                      1 × NVIDIA L4 (sm 8.9, bf16), torch 2.x, CUDA 12.x
    PASS  actors pinned to GPUs    reference on GPU 0, policy_trainer on GPU 0 (colocated)
    ...

Checks (``chatlearn.gpu_probe`` is the module the actors run):

- ``gpu``: torch sees the GPUs;
- ``actors pinned to GPUs``: each actor process sees and uses the GPU its placement gave it (the
  same one for the colocated reference and trainer on a 1-GPU machine; distinct GPUs for the
  trainer's ranks);
- ``CUDA tensor ref → trainer``: a CUDA tensor returned by the reference actor is staged through
  pinned host memory by the codec, arrives intact, and the trainer actor moves it onto its GPU;
- ``NCCL group`` (≥ 2 GPUs): the trainer's 2 processes all-reduce over NCCL;
- ``DPO example``: ``examples/dpo/train_dpo.py`` on the GPU (reference and trainer on one GPU;
  with 2 GPUs the trainer in DDP over both, over NCCL, its gradients views of DDP's buckets, its
  rank 0's weights broadcast to rank 1), ``mixed_precision: bf16``, both models read from a
  local checkpoint straight onto their GPU (``device_map``; the reference in bf16), a few
  steps, loss falling, a checkpoint written at the end; every example's setup checks (the
  chunked log-probs against the model's own, dropout off) must pass on the GPU, not fall back;
  The run then goes on for one more episode from that checkpoint: the weights read back from
  its ``hf_model`` onto the GPU (with 2 GPUs the AdamW moments merged from both ranks' shares);
- ``DPO example LoRA fp16``: the same with ``dpo_lora.yaml``'s adapters on the policy and
  ``mixed_precision: fp16`` (its loss scaler, CUDA only), a checkpoint each episode: the
  periodic one holds the adapter alone, the final one the adapter and the merged weights;
  resumed the same way (the adapters onto the base on the GPU,
  its digest hashed from the GPU's tensors, the loss scaler's state);
- ``DPO example FSDP2 bf16`` (≥ 2 GPUs): the same with the trainer sharded over 2 GPUs
  (``parallel: fsdp``, ``mixed_precision: bf16``, NCCL, a sharded checkpoint; both models built
  in host memory and moved to the GPUs by ``fully_shard`` as they are sharded), both from a local
  checkpoint of the example's model: the trainer's ranks loading it in turns (``load_in_turns``:
  its plan agreed and its turns passed over NCCL), the reference sharded over the GPUs too, its
  rank 0 loading it and broadcasting it into both ranks' shards over NCCL (``load_once``), with
  ``runtime.reference_store`` (its fingerprint and lookups agreed over NCCL), evaluating 33
  held-out pairs (an uneven split: as many forwards on both ranks), both models in forwards of
  at most 64 tokens (``max_tokens_per_micro_batch``: the ranks agree on their number over NCCL);
  ``chatlearn export`` of its final checkpoint from the shards alone (written from the GPUs'
  DTensors, read on the CPU without a process group) equals the export the trainer gathered;
- ``DPO example LoRA FSDP2 fp16`` (≥ 2 GPUs): the LoRA run sharded over 2 GPUs with fp16 (the
  sharded loss scaler), adapters on every linear layer and the embeddings (FSDP2 keeps its root
  gathered for those), the adapter and merged weights consolidated from the shards;
- ``Megatron example``: ``examples/megatron/train_dpo.py`` on the GPU with megatron-core's own
  CUDA code (not the CPU compatibility layer), tensor parallel over 2 GPUs when there are 2;
- ``packed attention``: packed, prefix-shared log-probs and gradients of a small Llama with
  grouped-query heads on the GPU (fp32), by segment attention and by the block mask, equal the
  padded forward's;
- ``bench dpo`` and ``bench memory``: both benchmarks, short, with their models on the GPU.

Without a GPU it says so in one line and exits 0 at once: the check for one reads ``/proc`` and
``/dev`` only (torch is imported after it).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

BUDGET_SECONDS = 300.0  # the whole check on a GPU machine
PAYLOAD_BYTES = 64 * 2**20
OFFLOAD_HIDDEN = 4096  # two 4096² layers, their gradients and AdamW state: 0.5 GiB
REPO = Path(__file__).resolve().parent.parent  # the checkout (make installs it editable)


def no_gpu_reason() -> str | None:
    """Why this machine has no usable NVIDIA GPU, from cheap checks only (None: it may have)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU"
    if sys.platform.startswith("linux"):
        if not (os.path.exists("/proc/driver/nvidia") or os.path.exists("/dev/nvidia0")):
            return "no NVIDIA driver: neither /proc/driver/nvidia nor /dev/nvidia0 exists"
    elif sys.platform != "win32":
        return f"no CUDA on {sys.platform}"
    return None


@dataclass(slots=True, kw_only=True)
class CheckResult:
    name: str
    passed: bool
    figure: str


class CheckFailed(Exception):
    """A check's own verdict: what it found instead of what it expected."""


class Deadline:
    """The time left of ``BUDGET_SECONDS``; subprocess checks get at most that as timeout."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self, at_most: float) -> float:
        left = self.end - time.monotonic()
        if left <= 1:
            raise CheckFailed("out of time (the whole check is limited to 5 minutes)")
        return min(at_most, left)


def run_check(name: str, check: Callable[[], str]) -> CheckResult:
    """Run one check, print its PASS/FAIL line at once and return it."""
    started = time.monotonic()
    try:
        figure, passed = check(), True
    except Exception as error:  # any failure is this check's FAIL line, the others still run
        lines = str(error).strip().splitlines() or [type(error).__name__]
        figure, passed = f"{type(error).__name__}: {lines[-1]}"[:300], False
    seconds = time.monotonic() - started
    line = f"{'PASS' if passed else 'FAIL'}  {name:<26} {figure}  ({seconds:.0f}s)"
    click.echo(line)
    sys.stdout.flush()
    return CheckResult(name=name, passed=passed, figure=figure)


# -- the checks ------------------------------------------------------------------------------
def check_gpu() -> str:
    import torch

    if not torch.cuda.is_available():
        raise CheckFailed(
            f"the NVIDIA driver is there but torch {torch.__version__} sees no GPU "
            "(a CPU build of torch? install a CUDA build)"
        )
    count = torch.cuda.device_count()
    names = sorted({torch.cuda.get_device_name(i) for i in range(count)})
    major, minor = torch.cuda.get_device_capability(0)
    bf16 = ", bf16" if torch.cuda.is_bf16_supported() else ", no bf16"
    return (
        f"{count} × {' / '.join(names)} (sm {major}.{minor}{bf16}), torch {torch.__version__}, "
        f"CUDA {torch.version.cuda}, NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}"
    )


def check_packed_attention(device: str = "cuda") -> str:
    """Segment and masked attention of packed, prefix-shared pairs against the padded forward
    on ``device`` (fp32): log-probs and gradients within 1e-4 (TF32 is turned off for it)."""
    import torch

    from chatlearn.algorithms import concatenated_logps
    from chatlearn.hf import build_causal_lm
    from chatlearn.hf.data import PreferenceCollator
    from chatlearn.hf.packing import use_segment_attention

    config = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
    }
    gen = torch.Generator().manual_seed(0)
    items = []
    for _ in range(6):  # prompts of 1-40 tokens, responses of 1-60
        prompt = torch.randint(3, 200, (int(torch.randint(1, 41, (1,), generator=gen)),))
        item = {}
        for side in ("chosen", "rejected"):
            response = torch.randint(3, 200, (int(torch.randint(1, 61, (1,), generator=gen)),))
            item[f"{side}_input_ids"] = torch.cat([prompt, response])
            loss = torch.zeros(len(item[f"{side}_input_ids"]), dtype=torch.long)
            loss[len(prompt) :] = 1
            item[f"{side}_loss_mask"] = loss
        items.append(item)
    batch = PreferenceCollator(0)(items)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        model = build_causal_lm(config, vocab_size=200, seed=0, dtype="float32").to(device)
        model.config._attn_implementation = "sdpa"

        def run(**options: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
            model.zero_grad(set_to_none=True)
            out = concatenated_logps(model, batch, **options)
            logps = torch.cat([out.chosen, out.rejected])
            weights = torch.linspace(-1.0, 2.0, logps.shape[0], device=logps.device)
            (logps * weights).sum().backward()
            grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
            return logps.detach(), grads

        want, want_grads = run()
        worst = 0.0
        for attention in ("mask", "segments"):
            if attention == "segments" and not use_segment_attention(model):
                raise CheckFailed("segment attention could not be enabled for an sdpa model")
            got, grads = run(packing=True, prefix_sharing=True)
            for a, b in zip([got, *grads], [want, *want_grads], strict=True):
                worst = max(worst, float((a - b).abs().max()))
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=attention)
        return f"segments and mask equal the padded forward (max |Δ| {worst:.1e}) on {device}"
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def probe_config(num_gpus: int) -> dict[str, Any]:
    """Reference on 1 GPU; trainer on 2 GPUs when there are 2 (an NCCL group), else 1. They
    share GPUs (colocation) unless there are enough for all three processes."""
    trainer_gpus = 2 if num_gpus >= 2 else 1
    colocated = num_gpus < 1 + trainer_gpus
    return {
        "models": {
            "reference": {"num_gpu": 1},
            "policy_trainer": {"num_gpu": trainer_gpus, "trainable": True},
        },
        "runtime": {
            "colocation": [["reference", "policy_trainer"]] if colocated else [],
            # not used (no training), but the config must be one a trainer of that size can run
            "train_micro_batch_size": 1,
            "train_global_batch_size": trainer_gpus,
            "sample_per_episode": trainer_gpus,
        },
    }


def host_gpu_uuid(host_gpu: int) -> str:
    """The UUID of GPU ``host_gpu`` in the placement's numbering (this process's
    ``CUDA_VISIBLE_DEVICES`` entries, or torch's indices when it is not set)."""
    import torch

    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")]
    index = host_gpu
    if all(v.isdigit() for v in visible if v) and str(host_gpu) in visible:
        index = visible.index(str(host_gpu))
    return str(torch.cuda.get_device_properties(index).uuid)


def check_placement(
    where: dict[str, list[dict[str, Any]]],
    colocated: bool,
    *,
    uuid_of: Callable[[int], str] = host_gpu_uuid,
) -> str:
    """Each process uses its assigned GPU; colocated models share, trainer ranks do not."""
    for model, ranks in where.items():
        for info in ranks:
            if not info["allocated_on_cuda"]:
                raise CheckFailed(f"{model} rank {info['rank']} could not allocate on CUDA")
            expected = uuid_of(info["assigned"][0])
            if info["uuid"] != expected:
                raise CheckFailed(
                    f"{model} rank {info['rank']} runs on GPU {info['uuid']}, placement gave "
                    f"host GPU {info['assigned'][0]} ({expected})"
                )
    trainer = [info["uuid"] for info in where["policy_trainer"]]
    if len(set(trainer)) != len(trainer):
        raise CheckFailed("the trainer's ranks share a GPU")
    reference = where["reference"][0]["uuid"]
    if colocated and reference not in trainer:
        raise CheckFailed("colocated reference and trainer are on different GPUs")
    if not colocated and reference in trainer:
        raise CheckFailed("reference and trainer share a GPU though they were not colocated")

    def gpus(model: str) -> str:
        return ",".join(str(info["assigned"][0]) for info in where[model])

    how = "colocated" if colocated else "disjoint"
    return f"reference on GPU {gpus('reference')}, trainer on GPU {gpus('policy_trainer')} ({how})"


async def _probe_actors(num_gpus: int) -> dict[str, Any]:
    """Start the probe actors and run the placement, transfer and NCCL checks on them."""
    import chatlearn
    from chatlearn.config import reset_args
    from chatlearn.engine.engine import Engine
    from chatlearn.gpu_probe import GPUProbe

    config = probe_config(num_gpus)
    colocated = bool(config["runtime"]["colocation"])
    chatlearn.init(config)
    results: dict[str, Any] = {}
    try:
        async with Engine(GPUProbe("reference"), GPUProbe("policy_trainer")) as engine:
            where = {}
            for model in ("reference", "policy_trainer"):
                group = engine.group(model)
                infos = await group.call_all("where")
                for handle, info in zip(group, infos, strict=True):
                    info["assigned"] = list(handle.info.get("gpus") or [])
                where[model] = infos
            results["placement"] = lambda: check_placement(where, colocated)
            reference, trainer = engine.group("reference"), engine.group("policy_trainer")
            sent = await reference.call(0, "cuda_payload", PAYLOAD_BYTES)
            received = await trainer.call(0, "checksum", sent["tensor"])
            results["transfer"] = lambda: check_transfer(sent, received)
            if num_gpus >= 2:
                reduced = await trainer.call_all("all_reduce_check", PAYLOAD_BYTES)
                results["nccl"] = lambda: check_nccl(reduced)
            offload = await trainer.call(0, "offload_check", OFFLOAD_HIDDEN)
            results["offload"] = lambda: check_offload(offload)
    finally:
        reset_args()
    return results


def check_transfer(sent: dict[str, Any], received: dict[str, Any]) -> str:
    from chatlearn.gpu_probe import payload

    expected = payload(PAYLOAD_BYTES)
    tensor = sent["tensor"]
    if not sent["device"].startswith("cuda"):
        raise CheckFailed(f"the reference's tensor was on {sent['device']}, not CUDA")
    if not sent["staged_pinned"]:
        raise CheckFailed("codec staging buffer is not pinned memory")
    if not (
        sent["staged_equal"] and tensor.device.type == "cpu" and bool((tensor == expected).all())
    ):
        raise CheckFailed("the tensor changed on its way from the reference")
    if not received["device"].startswith("cuda") or received["sum"] != int(expected.sum()):
        raise CheckFailed(f"the trainer got {received} instead of the payload on CUDA")
    return (
        f"{PAYLOAD_BYTES >> 20} MiB {sent['device']} → pinned host at "
        f"{sent['staging_gb_per_s']:.1f} GB/s → trainer {received['device']}, intact"
    )


def check_offload(result: dict[str, Any]) -> str:
    """``free_memory``'s offload()/onload() on CUDA: the device memory of the model and its
    optimizer state is released (at least 90 % of it) and comes back with the same weights."""
    loaded, offloaded, onloaded = result["loaded"], result["offloaded"], result["onloaded"]
    if loaded <= 0:
        raise CheckFailed("the model allocated nothing on the GPU")
    if offloaded > 0.1 * loaded:
        raise CheckFailed(f"offload() left {offloaded >> 20} MiB of {loaded >> 20} MiB on the GPU")
    if not (result["weights_equal"] and result["on_device"]) or onloaded < 0.9 * loaded:
        raise CheckFailed(f"onload() did not bring the model back intact: {result}")
    return f"{loaded >> 20} MiB on the GPU → {offloaded >> 20} MiB offloaded → back, intact"


def check_nccl(reduced: list[dict[str, Any]]) -> str:
    for result in reduced:
        if result["backend"] != "nccl":
            raise CheckFailed(f"the trainer's process group uses {result['backend']}, not nccl")
        if not result["correct"]:
            raise CheckFailed("all-reduce gave a wrong sum")
    bandwidth = min(r["bus_gb_per_s"] for r in reduced)
    world = reduced[0]["world_size"]
    return f"all-reduce of {PAYLOAD_BYTES >> 20} MiB over {world} GPUs, {bandwidth:.1f} GB/s bus"


def example_config(
    workdir: Path,
    trainer: dict[str, Any],
    reference: dict[str, Any],
    colocated: bool,
    extra_runtime: dict[str, Any] | None = None,
) -> Path:
    """``examples/dpo/dpo.yaml`` with the given model resources (and extra ``model_args``) and
    ``extra_runtime`` keys, written into ``workdir``; data paths made absolute."""
    import yaml

    example = REPO / "examples" / "dpo"
    if not (example / "train_dpo.py").exists():
        raise CheckFailed(f"{example} not found: run this from a checkout of the project")
    config = yaml.safe_load((example / "dpo.yaml").read_text())
    model_file = str(example / "model.yaml")
    config["models"] = {
        "reference": {**reference, "model_config_file": model_file},
        "policy_trainer": {**trainer, "trainable": True, "model_config_file": model_file},
    }
    runtime = config["runtime"]
    for key in ("data_path", "eval_data_path"):
        runtime[key] = str(example / runtime[key])
    runtime["colocation"] = [["reference", "policy_trainer"]] if colocated else []
    runtime.update(extra_runtime or {})
    path = workdir / "dpo_gpu_check.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def example_checkpoint(directory: Path) -> Path:
    """The example's model (``examples/dpo/model.yaml``'s config and seed: the weights the
    policy starts from) saved as a local Hugging Face checkpoint with its tokenizer."""
    import yaml

    from chatlearn.hf.model import causal_lm_from_args
    from chatlearn.hf.tokenizer import load_tokenizer

    example = yaml.safe_load((REPO / "examples" / "dpo" / "model.yaml").read_text())
    args = {"model_config": example["model_config"], "seed": example["seed"]}
    tokenizer = load_tokenizer(None)
    causal_lm_from_args(args, tokenizer).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def lora_model_args() -> dict[str, Any]:
    """The policy's model_args of ``examples/dpo/dpo_lora.yaml`` (the adapters and their
    learning rate)."""
    import yaml

    config = yaml.safe_load((REPO / "examples" / "dpo" / "dpo_lora.yaml").read_text())
    return dict(config["models"]["policy_trainer"]["model_args"])


# The example Llama's linear layers and its embeddings: adapters on the embeddings are read
# before the decoder layers from a ParameterDict no hook sees, and FSDP2 must keep its root
# gathered through the backward for them (chatlearn/hf/parallel.py)
LORA_FSDP_TARGETS = [
    *("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "embed_tokens",
]


def lora_gpu_model_args(*, fsdp: bool) -> dict[str, Any]:
    """The LoRA checks' policy model_args: ``dpo_lora.yaml``'s adapters with fp16 mixed
    precision, whose loss scaler exists on CUDA only (``GradScaler``; under FSDP2
    ``ShardedGradScaler``, the ranks holding different gradient shards). ``fsdp``: sharded over
    the trainer's GPUs, with adapters on the embeddings too (`LORA_FSDP_TARGETS`). At
    dpo_lora.yaml's learning rate (1e-3): over these 24 steps on the CPU (fp32) the loss's mean
    fell by 0.028 (`loss_fell` asks for 0.02)."""
    args = {**lora_model_args(), "mixed_precision": "fp16"}
    if fsdp:
        args["parallel"] = "fsdp"
        args["lora"] = {**args["lora"], "target_modules": list(LORA_FSDP_TARGETS)}
    return args


def check_lora_export(workdir: Path) -> str:
    """The final checkpoint of a LoRA run holds the adapter (peft) and the merged weights (HF),
    the latter folded from the GPU's tensors; a periodic one before it (if any) the adapter
    alone, copied from the GPU's adapter tensors."""
    exports = sorted(workdir.glob("output/**/hf_model"))
    if not exports:
        raise CheckFailed("no hf_model directory in the checkpoints")
    for export in exports:
        if not (export / "adapter" / "adapter_model.safetensors").is_file():
            raise CheckFailed(f"no adapter in {export}")
    last = exports[-1]
    if not (last / "config.json").is_file():
        raise CheckFailed(f"no merged model in {last}")
    periodic = [e for e in exports[:-1] if (e / "config.json").exists()]
    if periodic:
        raise CheckFailed(f"merged weights in a periodic checkpoint: {periodic[0]}")
    if len(exports) > 1:
        return f"adapter in {len(exports)} checkpoints, merged weights in the last"
    return "adapter and merged weights exported"


def check_sharded_export(workdir: Path, model: str = "policy_trainer") -> str:
    """`chatlearn export` of the run's final checkpoint from its shards alone (a copy without
    the ``hf_model`` the run's end wrote) equals that ``hf_model``, tensor for tensor."""
    import shutil

    from safetensors.torch import load_file

    from chatlearn.hf.export import export_checkpoint

    saved = sorted(workdir.glob("output/*/checkpoints/iter_*"), key=lambda p: p.name)
    if not saved:
        raise CheckFailed("no checkpoint was written")
    gathered = saved[-1] / model / "rank_0" / "hf_model"
    if not (gathered / "config.json").is_file():
        raise CheckFailed(f"the final checkpoint {saved[-1].name} has no hf_model")
    shards = workdir / "shards" / "checkpoints" / saved[-1].name
    shutil.copytree(saved[-1], shards, ignore=lambda d, names: {"hf_model"} & set(names))
    manifest = json.loads((shards / "MANIFEST.json").read_text())  # as a periodic one's
    held = f"{model}/rank_0/hf_model/"
    manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith(held)}
    (shards / "MANIFEST.json").write_text(json.dumps(manifest))
    written = export_checkpoint(shards, workdir / "shards" / "export")
    files = sorted(p.name for p in gathered.glob("*.safetensors"))
    if sorted(p.name for p in written.glob("*.safetensors")) != files or not files:
        raise CheckFailed(f"the export from the shards holds other files than {gathered}")
    count = 0
    for name in files:
        ours, theirs = load_file(written / name), load_file(gathered / name)
        if sorted(ours) != sorted(theirs):
            raise CheckFailed(f"{name}: the export from the shards holds other tensors")
        for key, tensor in ours.items():
            if tensor.dtype != theirs[key].dtype or not tensor.equal(theirs[key]):
                raise CheckFailed(f"{key}: the export from the shards differs from the trainer's")
        count += len(ours)
    return f"chatlearn export from the shards = the trainer's export ({count} tensors)"


def run_example(
    config: Path,
    workdir: Path,
    timeout: float,
    *,
    stored: bool = False,
    episodes: int = 2,
    said: Sequence[str] = (),
    save_every: int | None = None,
) -> str:
    """The DPO example for ``episodes`` episodes (12 steps each): its loss must fall; a
    checkpoint at the end (and every ``save_every`` episodes). ``stored``: the run has a
    reference store, which must have computed and kept samples. ``said``: what its log must
    say."""
    done = _example_process(config, workdir, timeout, episodes, save_every)
    fell = loss_fell(workdir, by=0.02)
    for words in said:
        if words not in done.stderr:
            raise CheckFailed(f"the log does not say {words!r}")
    if "checkpoint" not in done.stdout:
        raise CheckFailed("no checkpoint was written at the end")
    # the modules' setup checks, on the GPU's kernels (TF32, bf16): the example's Llama must
    # pass both (chatlearn/algorithms/logps.py, chatlearn/hf/model.py)
    from chatlearn.hf.modules import DROPOUT_WARNING, FULL_LOGITS_WARNING

    for warned in (FULL_LOGITS_WARNING, DROPOUT_WARNING):
        if warned in done.stderr:
            line = next(line for line in done.stderr.splitlines() if warned in line)
            raise CheckFailed(f"a setup check failed on the GPU: {line.strip()}")
    throughput = re.search(r"throughput\s+([\d.]+) samples/s", done.stdout)
    rate = f", {throughput.group(1)} samples/s" if throughput else ""
    store = ""
    if stored:
        counts = re.search(r"reference store: (\d+) samples served, (\d+) computed", done.stderr)
        if counts is None or int(counts.group(2)) == 0:
            raise CheckFailed("the reference store computed and kept no sample")
        store = f", reference store kept {counts.group(2)} samples"
    return f"{fell}{rate}, checkpoint written{store}"


def _example_process(
    config: Path, workdir: Path, timeout: float, episodes: int, save_every: int | None = None
) -> subprocess.CompletedProcess[str]:
    """The DPO example run for ``episodes`` episodes, a checkpoint at the end (and every
    ``save_every`` episodes); it must exit 0."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "NUM_EPISODE": str(episodes),
        "SAVE_EPISODE_INTERVAL": str(save_every or episodes),
        "OUTPUT_DIR": str(workdir / "output"),
    }
    command = [sys.executable, "-m", "examples.dpo.train_dpo", "-c", str(config)]
    done = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        raise CheckFailed(f"exit code {done.returncode}: {_last_line(done.stderr)}")
    return done


def resume_example(config: Path, workdir: Path, timeout: float, *, episodes: int = 2) -> str:
    """The run of `run_example` (``episodes`` episodes) continued for one more: it must resume
    from its final checkpoint and train that episode."""
    done = _example_process(config, workdir, timeout, episodes + 1)
    return resumed(done.stdout + done.stderr, episodes + 1)


def resumed(log: str, episodes: int) -> str:
    """What a run's log says of its resume from a checkpoint and of its last episode."""
    found = re.search(r"resuming from \S*(iter_\d+): iteration (\d+)", log)
    if found is None:
        raise CheckFailed("the run did not resume from its checkpoint")
    if f"episode {episodes}/{episodes} done" not in log:
        raise CheckFailed(f"episode {episodes} was not trained after the resume")
    return f"resumed from {found.group(1)} (iteration {found.group(2)})"


def megatron_config(
    workdir: Path, reference: dict[str, Any], policy: dict[str, Any], colocated: bool
) -> Path:
    """``examples/megatron/configs/dpo.yaml`` with the given model resources and parallel sizes,
    written into ``workdir``."""
    import yaml

    configs = REPO / "examples" / "megatron" / "configs"
    if not (configs / "dpo.yaml").exists():
        raise CheckFailed(f"{configs} not found: run this from a checkout of the project")
    config = yaml.safe_load((configs / "dpo.yaml").read_text())
    for name, resources in (("reference", reference), ("ppo_policy", policy)):
        model = {
            k: v for k, v in config["models"][name].items() if not k.startswith(("num_", "cpu_"))
        }
        model["model_config_file"] = str(configs / model["model_config_file"])
        config["models"][name] = {**model, **resources}
    config["runtime"]["colocation"] = [["reference", "ppo_policy"]] if colocated else []
    config["runtime"]["output_dir"] = str(workdir / "output")
    path = workdir / "megatron_gpu_check.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_megatron_example(config: Path, workdir: Path, timeout: float) -> str:
    """The Megatron example for 10 episodes (40 steps of a tiny GPTModel): its loss (from
    metrics.jsonl) must fall. Single steps are noisy (0.69 ± 0.03 over the first 12 on CPU), so
    the mean of the last 8 is compared with the mean of the first 4 (0.70 -> 0.57 on CPU)."""
    command = [sys.executable, "examples/megatron/train_dpo.py", "-c", str(config)]
    env = {**os.environ, "num_episode": "10"}
    done = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        raise CheckFailed(f"exit code {done.returncode}: {_last_line(done.stderr)}")
    return loss_fell(workdir, by=0.03)


def loss_fell(workdir: Path, *, by: float) -> str:
    """The training loss of the run under ``workdir/output`` (its metrics.jsonl) fell by ``by``.
    Single steps are noisy (0.69 ± 0.03 over the first 12 of the Megatron example on CPU; a LoRA
    run's last step alone ended above its first minus 0.02 on the CPU where its mean fell), so
    the mean of the last 8 steps is compared with the mean of the first 4."""
    losses = [
        float(record["loss"])
        for path in sorted(workdir.glob("output/**/metrics.jsonl"))
        for record in map(json.loads, path.read_text().splitlines())
        if record.get("kind") == "train"
    ]
    if len(losses) < 12:
        raise CheckFailed(f"only {len(losses)} training steps in metrics.jsonl")
    first, last = sum(losses[:4]) / 4, sum(losses[-8:]) / 8
    if not last < first - by:
        raise CheckFailed(f"loss did not fall: mean {first:.4f} (first 4) -> {last:.4f} (last 8)")
    return f"loss {first:.4f} -> {last:.4f} (means of the first 4 / last 8 of {len(losses)} steps)"


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][-240:] if lines else "(no output)"


def run_bench(args: list[str], timeout: float) -> dict[str, Any]:
    command = [sys.executable, "-m", "chatlearn.cli", "bench", *args, "--json"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise CheckFailed(f"exit code {done.returncode}: {_last_line(done.stderr)}")
    return dict(json.loads(done.stdout))


def check_bench_dpo(timeout: float) -> str:
    args = ["dpo", "--device", "cuda", "--steps", "6", "--warmup", "2", "--no-second-epoch"]
    result = run_bench(args, timeout)
    for key in ("single_process_samples_per_s", "pipelined_samples_per_s"):
        if not result[key] > 0:
            raise CheckFailed(f"{key} is {result[key]}")
    return (
        f"(a) {result['single_process_samples_per_s']:.0f}, (b) "
        f"{result['pipelined_samples_per_s']:.0f}, (c) {result['train_only_samples_per_s']:.0f} "
        f"samples/s, b/a {result['ratio_pipelined_vs_single']:.2f}"
    )


def check_bench_memory(timeout: float) -> str:
    result = run_bench(["memory", "--device", "cuda", "--steps", "2", "--warmup", "2"], timeout)
    if not result["layouts"]:
        raise CheckFailed(f"no layout ran: {result['skipped']}")
    parts = []
    for name, figures in result["layouts"].items():
        if not (figures["trainer_peak_torch_bytes"] > 0 and figures["samples_per_s"] > 0):
            raise CheckFailed(f"{name}: no memory or throughput figure")
        gib = figures["trainer_peak_torch_bytes"] / 2**30
        parts.append(f"{name} {gib:.2f} GiB {figures['tokens_per_s']:.0f} tok/s")
    parts += [f"{key} {value:.2f}" for key, value in result["ratios"].items()]
    parts += [f"{name} skipped ({reason})" for name, reason in result["skipped"].items()]
    return f"{result['num_parameters'] / 1e6:.0f}M params: " + ", ".join(parts)


# -- the command -----------------------------------------------------------------------------
def run_checks() -> list[CheckResult]:
    from chatlearn.transport import run

    deadline = Deadline(BUDGET_SECONDS)
    results = [run_check("gpu", check_gpu)]
    if not results[0].passed:
        return results
    import torch

    num_gpus = torch.cuda.device_count()
    probes: dict[str, Callable[[], str]] = {}

    def start_probes() -> str:
        import asyncio

        probes.update(run(asyncio.wait_for(_probe_actors(num_gpus), deadline.left(90))))
        return f"started on {num_gpus} GPU(s)"

    results.append(run_check("probe actors", start_probes))
    for key, name in (
        ("placement", "actors pinned to GPUs"),
        ("transfer", "CUDA tensor ref → trainer"),
        ("nccl", "NCCL group"),
        ("offload", "free_memory offload/onload"),
    ):
        if key in probes:
            results.append(run_check(name, probes[key]))

    with tempfile.TemporaryDirectory(prefix="chatlearn-gpu-check-") as tmp:
        workdir = Path(tmp)

        def example() -> str:
            # both models read a local checkpoint of the policy's first weights straight onto
            # their GPU (device_map): with 2 GPUs the trainer runs DDP over them, its rank 0
            # reading and broadcasting over NCCL (load_once), the reference 2 replicas
            gpus = min(num_gpus, 2)
            checkpoint = example_checkpoint(workdir / "one" / "model")
            trainer_args = {"mixed_precision": "bf16", "model_path": str(checkpoint)}
            trainer = {"num_gpu": gpus, "model_args": trainer_args}
            reference_args = {"dtype": "bfloat16", "model_path": str(checkpoint)}
            reference = {"num_gpu": gpus, "model_args": reference_args}
            config = example_config(workdir / "one", trainer, reference, True)
            figures = run_example(config, workdir / "one", deadline.left(90))
            return f"{figures}, {resume_example(config, workdir / 'one', deadline.left(60))}"

        def example_fsdp() -> str:
            # both from a local checkpoint of the policy's first weights: the trainer's 2 ranks
            # each load it, in turns; the reference's rank 0 loads it and sends it to rank 1
            # (load_once, the default: NCCL broadcasts into FSDP2's shards)
            checkpoint = example_checkpoint(workdir / "fsdp" / "model")
            trainer_args = {
                "parallel": "fsdp",
                "mixed_precision": "bf16",
                "model_path": str(checkpoint),
                "load_once": False,
                "load_in_turns": True,
                # forwards of at most 2 × max_length tokens: the ranks agree on how many each
                # step takes over NCCL (token_budget.max_over_ranks), or FSDP2's collectives hang
                "max_tokens_per_micro_batch": 64,
            }
            trainer = {"num_gpu": 2, "model_args": trainer_args}
            # the reference sharded too (one replica of 2 GPUs), with the on-disk store: its
            # fingerprint and lookups are agreed over NCCL
            reference = {
                "num_gpu": 2,
                "zero_size": 2,
                "model_args": {
                    "parallel": "fsdp",
                    "model_path": str(checkpoint),
                    "max_tokens_per_micro_batch": 64,
                },
            }
            # an eval set the 2 ranks cannot split evenly: each must still run as many
            # forwards (FSDP2's are NCCL collectives; one more on one rank hung the run)
            store = str(workdir / "fsdp" / "store")
            runtime = {"reference_store": store, "eval_data_num_limit": 33}
            config = example_config(workdir / "fsdp", trainer, reference, True, runtime)
            said = ["one after another", "sent the model"]  # in turns; once, then broadcast
            figures = run_example(
                config, workdir / "fsdp", deadline.left(90), stored=True, said=said
            )
            return f"{figures}, {check_sharded_export(workdir / 'fsdp')}"

        def example_lora() -> str:
            trainer = {"num_gpu": 1, "model_args": lora_gpu_model_args(fsdp=False)}
            config = example_config(workdir / "lora", trainer, {"num_gpu": 1}, True)
            # a checkpoint each episode: the first holds the adapter alone (copied from the GPU)
            figures = run_example(config, workdir / "lora", deadline.left(60), save_every=1)
            again = resume_example(config, workdir / "lora", deadline.left(60))
            return f"{figures}, {check_lora_export(workdir / 'lora')}, {again}"

        def example_lora_fsdp() -> str:
            trainer = {"num_gpu": 2, "model_args": lora_gpu_model_args(fsdp=True)}
            config = example_config(workdir / "lora_fsdp", trainer, {"num_gpu": 2}, True)
            figures = run_example(config, workdir / "lora_fsdp", deadline.left(60))
            return f"{figures}, {check_lora_export(workdir / 'lora_fsdp')}"

        def megatron() -> str:
            if importlib.util.find_spec("megatron.core") is None:
                raise CheckFailed("megatron-core is not installed (the `megatron` extra)")
            tp = 2 if num_gpus >= 2 else 1  # tensor parallel over NCCL when there are 2 GPUs
            policy = {"num_gpu": tp, "tensor_model_parallel_size": tp}
            config = megatron_config(workdir / "megatron", {"num_gpu": 1}, policy, True)
            return run_megatron_example(config, workdir / "megatron", deadline.left(60))

        for name in ("one", "fsdp", "lora", "lora_fsdp", "megatron"):
            (workdir / name).mkdir()
        results.append(run_check("DPO example", example))
        results.append(run_check("DPO example LoRA fp16", example_lora))
        if num_gpus >= 2:
            results.append(run_check("DPO example FSDP2 bf16", example_fsdp))
            results.append(run_check("DPO example LoRA FSDP2 fp16", example_lora_fsdp))
        results.append(run_check("Megatron example", megatron))
    results.append(run_check("packed attention", check_packed_attention))
    results.append(run_check("bench dpo", lambda: check_bench_dpo(deadline.left(60))))
    results.append(run_check("bench memory", lambda: check_bench_memory(deadline.left(120))))
    return results


@click.command("gpu-check")
def command() -> None:
    """Verify the CUDA paths on this machine's GPUs: one PASS/FAIL line per check."""
    reason = no_gpu_reason()
    if reason is not None:
        click.echo(f"gpu-check: no GPU here, nothing to check ({reason})")
        return
    started = time.monotonic()
    results = run_checks()
    failed = [r.name for r in results if not r.passed]
    seconds = time.monotonic() - started
    if failed:
        names = ", ".join(failed)
        click.echo(
            f"gpu-check: {len(failed)} of {len(results)} checks FAILED ({names}) in {seconds:.0f}s"
        )
        sys.exit(1)
    click.echo(f"gpu-check: all {len(results)} checks passed in {seconds:.0f}s")
