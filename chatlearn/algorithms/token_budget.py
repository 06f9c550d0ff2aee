"""A token budget per forward: a step's pairs regrouped so no forward runs over more tokens.

ChatLearn's micro-batches count samples (``train_micro_batch_size``), which on real data means
one micro-batch of short pairs uses a fraction of the memory one of long pairs needs: the
micro-batch size has to be set for the longest, and the short ones run below what the device
could do. With ``max_tokens_per_micro_batch`` the modules keep the engine's batches (the
optimizer step, the loss normalisation and every counter stay ChatLearn's) and only regroup the
pairs of each step (trainer) or order (reference) into forwards of at most that many tokens:

- the cost of a pair is what its forward computes: with packing, its real tokens (chosen plus
  rejected, minus the shared prompt under prefix sharing); padded, twice its longer side times
  the group's rows (the group is padded to its longest pair, so groups hold pairs of similar
  length);
- groups are filled first-fit in decreasing cost (deterministic: ties keep the batch order),
  so few forwards run, each close to the budget; a pair above the budget gets a forward of its
  own (it cannot be split);
- the gradient does not depend on the grouping: each group's loss is weighted by its share of
  the step's samples (``dpo.accumulation_loss``), so only float rounding differs;
- sharded models (FSDP2) run a collective in every forward, so all ranks must run the same
  number: ``split_evenly`` splits the largest groups until a rank has the agreed count (the
  maximum over the ranks; every rank holds as many pairs as the others, so it always can).

Padding columns that no row of a group uses are cut off (rows are right-padded), which is
exact. Everything here runs on CPU tensors before the forward.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from chatlearn.algorithms.collectives import collective_device
from chatlearn.algorithms.packing import PAIR_KEYS, shared_prompt_length

SIDES = ("chosen", "rejected")


def pair_costs(
    batch: Mapping[str, Any], *, packing: bool, prefix_sharing: bool
) -> list[tuple[int, int]]:
    """Per pair ``(cost, length)``: the tokens its forward computes when packed (see the
    module doc), and its longer side's length (the padded forward's row width)."""
    rows = _num_rows(batch)
    lengths = {side: batch[f"{side}_attention_mask"].sum(-1).tolist() for side in SIDES}
    out = []
    for i in range(rows):
        c_len, r_len = int(lengths["chosen"][i]), int(lengths["rejected"][i])
        cost = c_len + r_len
        if prefix_sharing:
            cost -= shared_prompt_length(
                batch["chosen_input_ids"][i, :c_len],
                batch["chosen_loss_mask"][i, :c_len],
                batch["rejected_input_ids"][i, :r_len],
                batch["rejected_loss_mask"][i, :r_len],
            )
        out.append((cost, max(c_len, r_len)))
    return out


def group_rows(costs: Sequence[tuple[int, int]], budget: int, *, packing: bool) -> list[list[int]]:
    """Row indices grouped so each group's forward stays within ``budget`` tokens (a single
    row above it gets a group of its own). Groups and their rows are in batch order."""
    if budget <= 0:
        raise ValueError(f"max_tokens_per_micro_batch must be > 0, got {budget}")
    by = 0 if packing else 1  # packed: the pair's tokens; padded: its row width
    order = sorted(range(len(costs)), key=lambda i: (-costs[i][by], i))
    groups: list[list[int]] = []
    if packing:
        loads: list[int] = []
        for i in order:  # first fit, in decreasing cost
            cost = costs[i][0]
            for g, load in enumerate(loads):
                if load + cost <= budget:
                    groups[g].append(i)
                    loads[g] += cost
                    break
            else:
                groups.append([i])
                loads.append(cost)
    else:
        # Padded: a group costs 2 × rows × its longest row, and the longest comes first.
        for i in order:
            if groups and 2 * (len(groups[-1]) + 1) * costs[groups[-1][0]][1] <= budget:
                groups[-1].append(i)
            else:
                groups.append([i])
    return sorted(sorted(g) for g in groups)


def split_evenly(groups: list[list[int]], count: int, costs: Sequence[tuple[int, int]]) -> None:
    """Split groups in place until there are ``count`` (each split halves the costliest group
    of more than one row, by cost): what a rank with fewer groups than its peers does."""
    total = sum(len(g) for g in groups)
    if count > total:
        raise ValueError(f"cannot make {count} groups of {total} pairs")
    while len(groups) < count:
        splittable = [g for g in groups if len(g) > 1]
        largest = max(splittable, key=lambda g: sum(costs[i][0] for i in g))
        groups.remove(largest)
        half, acc, target = 1, 0, sum(costs[i][0] for i in largest) / 2
        for k, i in enumerate(largest[:-1], start=1):
            acc += costs[i][0]
            half = k
            if acc >= target:
                break
        groups.extend([largest[:half], largest[half:]])
    groups.sort(key=lambda g: g[0])


def select_rows(batch: Mapping[str, Any], rows: Sequence[int]) -> dict[str, Any]:
    """The pairs ``rows`` of ``batch``: every tensor (or list) with one entry per pair is
    indexed, anything else is kept; the pair tensors lose padding columns no selected row
    uses."""
    num = _num_rows(batch)
    index = torch.tensor(list(rows), dtype=torch.long)
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == num:
            out[key] = value.index_select(0, index.to(value.device))
        elif isinstance(value, (list, tuple)) and len(value) == num:
            out[key] = [value[i] for i in rows]
        else:
            out[key] = value
    for side in SIDES:
        mask = out.get(f"{side}_attention_mask")
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            continue
        used = int(mask.sum(-1).max()) if mask.shape[0] else 0
        for key in PAIR_KEYS:
            tensor = out.get(f"{side}_{key}")
            if isinstance(tensor, torch.Tensor) and tensor.dim() == 2:
                out[f"{side}_{key}"] = tensor[:, : max(used, 1)]
    return out


def split_batch(
    batch: Mapping[str, Any],
    budget: int,
    *,
    packing: bool,
    prefix_sharing: bool,
    agree: Callable[[int], int] | None = None,
) -> list[tuple[list[int], dict[str, Any]]]:
    """``batch`` as ``(rows, sub-batch)`` groups of at most ``budget`` tokens each.
    ``agree(count) -> count``: for sharded models, the number all ranks run (e.g. an all-reduce
    of the maximum); this rank then splits its groups to that many."""
    costs = pair_costs(batch, packing=packing, prefix_sharing=prefix_sharing)
    groups = group_rows(costs, budget, packing=packing)
    if agree is not None:
        split_evenly(groups, int(agree(len(groups))), costs)
    return [(rows, select_rows(batch, rows)) for rows in groups]


def regroup_step(
    micro_batches: Sequence[Mapping[str, Any]],
    budget: int,
    *,
    packing: bool,
    prefix_sharing: bool,
    agree: Callable[[int], int] | None = None,
) -> list[dict[str, Any]]:
    """A step's micro-batches as forwards of at most ``budget`` tokens: the pairs of every
    micro-batch pooled (so short pairs of several micro-batches share one forward) and
    grouped as `split_batch` does."""
    pooled = concat_batches(micro_batches)
    return [
        sub
        for _, sub in split_batch(
            pooled, budget, packing=packing, prefix_sharing=prefix_sharing, agree=agree
        )
    ]


def concat_batches(batches: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Micro-batches of pairs as one batch (pair tensors right-padded to the widest)."""
    if len(batches) == 1:
        return dict(batches[0])
    keys = list(batches[0])
    for b in batches[1:]:
        if list(b) != keys:
            raise ValueError(f"micro-batches differ in their keys: {keys} and {list(b)}")
    out: dict[str, Any] = {}
    for key in keys:
        values = [b[key] for b in batches]
        first = values[0]
        if isinstance(first, torch.Tensor) and first.dim() >= 1:
            if first.dim() == 2 and any(v.shape[1] != first.shape[1] for v in values):
                width = max(v.shape[1] for v in values)
                values = [torch.nn.functional.pad(v, (0, width - v.shape[1])) for v in values]
            out[key] = torch.cat(values)
        elif isinstance(first, list):
            out[key] = [x for v in values for x in v]
        else:
            out[key] = first
    return out


def max_over_ranks(count: int) -> int:
    """The largest ``count`` over the ranks of the default process group (an ``agree`` for
    sharded models); ``count`` itself without one."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return count
    value = torch.tensor([count], dtype=torch.long, device=collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item())


def _num_rows(batch: Mapping[str, Any]) -> int:
    return int(batch["chosen_input_ids"].shape[0])
