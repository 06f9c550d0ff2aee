"""Padding-free packing and shared-prompt (prefix-sharing) forwards for causal LMs.

A padded batch of preference pairs computes every row to the longest row's length and every
prompt twice (once under chosen, once under rejected). Packing concatenates the sequences into
one row (or a few rows of at most ``max_tokens_per_row`` tokens) so no padding is computed;
prefix sharing lays each pair out as one unit ``[prompt | chosen | rejected]`` so its prompt is
computed once:

    row:       p0 p1 p2 c0 c1 c2 r0 r1 | q0 q1 d0 e0 e1 ...
    positions:  0  1  2  3  4  5  3  4 |  0  1  2  2  3
    attends:   causal within a unit; a branch (chosen, rejected) sees its unit's prompt and
               itself, never the other branch; nothing crosses a unit boundary

The model sees this through ``position_ids`` (restarting per unit, both branches continuing from
the prompt's end) and either a 4-D block-diagonal causal ``attention_mask`` ``[rows, 1, T, T]``
(``mask_format`` "bool" or "additive": any attention that applies a given mask) or, with
``mask_format="segments"``, no mask at all: ``Packed.segments`` lists each unit's place and
`segment_attention` computes every branch with a causal fused kernel over its own tokens and its
unit's prompt, so attention costs the sum of the units' squares instead of ``T²`` per row and no
row needs bounding (nor padding: one row). The
log-prob of a branch token is read from the hidden state of the token before it *in its own
sequence* (the first branch token from the prompt's last token), so ``Packed.scoring`` lists,
for every scored token, the flat index of that hidden state, the target id and the owning
sequence. The result is the same per-sequence sum as the padded computation, up to float
rounding of a different kernel shape.

    packed = pack_pairs(batch, prefix_sharing=True)              # from the DPO pair batch
    packed = pack_sequences(ids, loss_masks, prefix_lengths)     # any sequences (TorchModule)
    hidden = body(input_ids=packed.input_ids, attention_mask=packed.attention_mask,
                  position_ids=packed.position_ids)
    logps, num_tokens = scored_logps(head, hidden, packed)       # chatlearn.algorithms.logps

Memory: the mask is ``rows × T²`` booleans (SDPA may expand it to floats): 16 MB for one row of
4,096 tokens, 1 GB at 16,384 (plus the attention's own T² work, as for padded rows of that
length). Bound ``T`` with ``max_tokens_per_row`` when micro-batches hold many long sequences, or
use segments, which build no mask.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# The tensors of each side of a preference pair in a batch: chosen_<key> and rejected_<key>
PAIR_KEYS = ("input_ids", "attention_mask", "loss_mask")
MASK_FORMATS = ("bool", "additive", "segments")
# The attention implementation name under which a model attends by segments (the Hugging Face
# adapter is chatlearn/hf/packing.py; models report it as `config._attn_implementation`)
SEGMENT_ATTENTION = "chatlearn_segments"

# One unit of a packed row: (row, its first column, prefix length, branch lengths in order)
Segment = tuple[int, int, int, tuple[int, ...]]


@dataclass(frozen=True, slots=True)
class Packed:
    """One micro-batch laid out for a padding-free forward.

    scoring: [3, K] long — for each scored token, the flat index (row · T + column) of the hidden
    state that predicts it, its token id, and the index of the sequence it belongs to.
    """

    input_ids: torch.Tensor  # [R, T]
    position_ids: torch.Tensor  # [R, T]
    # [R, 1, T, T]: bool (True: attend) or additive float; with segments [R, T] ones (no mask)
    attention_mask: torch.Tensor
    scoring: torch.Tensor  # [3, K]
    num_sequences: int
    num_computed_tokens: int  # R · T: what the model runs over
    segments: tuple[Segment, ...] | None = None  # mask_format "segments": for segment_attention

    def to(self, device: torch.device) -> Packed:
        return Packed(
            input_ids=self.input_ids.to(device, non_blocking=True),
            position_ids=self.position_ids.to(device, non_blocking=True),
            attention_mask=self.attention_mask.to(device, non_blocking=True),
            scoring=self.scoring.to(device, non_blocking=True),
            num_sequences=self.num_sequences,
            num_computed_tokens=self.num_computed_tokens,
            segments=self.segments,
        )


@dataclass(frozen=True, slots=True)
class _Unit:
    """A shared prefix and the branches that continue it (a plain sequence: no prefix)."""

    prefix: list[int]
    branches: list[tuple[int, list[int], list[int]]]  # (sequence index, ids, loss mask)

    @property
    def length(self) -> int:
        return len(self.prefix) + sum(len(ids) for _, ids, _ in self.branches)


def pack_sequences(
    input_ids: Sequence[Sequence[int]],
    loss_masks: Sequence[Sequence[int]],
    *,
    groups: Sequence[Sequence[int]] | None = None,
    prefix_lengths: Sequence[int] | None = None,
    max_tokens_per_row: int | None = None,
    one_unit_per_row: bool = False,
    pad_token_id: int = 0,
    mask_format: str = "bool",
) -> Packed:
    """Pack sequences (token ids and 0/1 loss masks, unpadded) for one forward.

    groups: lists of sequence indices that share a prefix of `prefix_lengths[g]` tokens (the
    tokens must be equal and unscored in every member; each sequence in at most one group);
    sequences in no group are packed alone. `max_tokens_per_row` starts a new row when a unit
    would not fit (a unit longer than the budget gets a row of its own); None: one row.
    `one_unit_per_row`: no packing, each unit right-padded in its own row (prefix sharing alone);
    with `mask_format="segments"` (no mask, so nothing to bound or to keep apart) the units go
    into one row unless `max_tokens_per_row` is given.
    """
    if len(input_ids) != len(loss_masks):
        raise ValueError(f"{len(input_ids)} sequences but {len(loss_masks)} loss masks")
    groups = list(groups or [])
    prefix_lengths = list(prefix_lengths or [0] * len(groups))
    if len(prefix_lengths) != len(groups):
        raise ValueError(f"{len(groups)} groups but {len(prefix_lengths)} prefix lengths")
    units = _units(input_ids, loss_masks, groups, prefix_lengths)
    if one_unit_per_row and mask_format != "segments":
        rows = [[unit] for unit in units]
    else:
        rows = _fill_rows(units, max_tokens_per_row)
    return _layout(rows, len(input_ids), pad_token_id, mask_format)


def _units(
    input_ids: Sequence[Sequence[int]],
    loss_masks: Sequence[Sequence[int]],
    groups: list[Sequence[int]],
    prefix_lengths: list[int],
) -> list[_Unit]:
    grouped: dict[int, int] = {}
    for g, members in enumerate(groups):
        for index in members:
            if index in grouped:
                raise ValueError(f"sequence {index} is in groups {grouped[index]} and {g}")
            grouped[index] = g
    units: list[_Unit] = []
    for g, members in enumerate(groups):
        p = prefix_lengths[g]
        first = list(input_ids[members[0]][:p])
        for index in members:
            ids, mask = list(input_ids[index]), list(loss_masks[index])
            if len(ids) < p or ids[:p] != first or any(mask[:p]):
                raise ValueError(f"sequence {index} does not share group {g}'s unscored prefix")
        units.append(
            _Unit(first, [(i, list(input_ids[i][p:]), list(loss_masks[i][p:])) for i in members])
        )
    for index, (seq_ids, seq_mask) in enumerate(zip(input_ids, loss_masks, strict=True)):
        if len(seq_ids) != len(seq_mask):
            raise ValueError(
                f"sequence {index}: {len(seq_ids)} ids but {len(seq_mask)} loss mask values"
            )
        if index not in grouped:
            units.append(_Unit([], [(index, list(seq_ids), list(seq_mask))]))
    return units


def _fill_rows(units: list[_Unit], budget: int | None) -> list[list[_Unit]]:
    """First fit in order: a unit goes to the first row it fits in."""
    if budget is not None and budget < 1:
        raise ValueError(f"max_tokens_per_row must be >= 1, got {budget}")
    rows: list[list[_Unit]] = []
    used: list[int] = []
    for unit in units:
        for r in range(len(rows)):
            if budget is None or used[r] + unit.length <= budget:
                rows[r].append(unit)
                used[r] += unit.length
                break
        else:
            rows.append([unit])
            used.append(unit.length)
    return rows


def _layout(
    rows: list[list[_Unit]], num_sequences: int, pad_token_id: int, mask_format: str
) -> Packed:
    if mask_format not in MASK_FORMATS:
        raise ValueError(f"mask_format must be one of {MASK_FORMATS}, got {mask_format!r}")
    width = max((sum(unit.length for unit in row) for row in rows), default=1) or 1
    # built as lists, one tensor each at the end (element-wise tensor writes cost ~µs each);
    # per token: its unit (-1 for padding: attends to itself only) and its branch (0: prefix)
    ids: list[int] = []
    positions: list[int] = []
    unit_of: list[int] = []
    branch_of: list[int] = []
    sources: list[int] = []
    targets: list[int] = []
    owners: list[int] = []
    segments: list[Segment] = []
    for r, row in enumerate(rows):
        start = len(ids)
        for u, unit in enumerate(row):
            p = len(unit.prefix)
            lengths = tuple(len(branch) for _, branch, _ in unit.branches)
            segments.append((r, len(ids) - start, p, lengths))
            prefix_last = len(ids) - start + p - 1  # column of the prefix's last token
            ids += unit.prefix
            positions += range(p)
            unit_of += [u] * p
            branch_of += [0] * p
            for b, (owner, branch, branch_loss) in enumerate(unit.branches, start=1):
                at = len(ids) - start
                for j, scored in enumerate(branch_loss):
                    # the state before this token in its own sequence: the branch's previous
                    # token, or for the first one the prefix's last (none: never scored)
                    if scored and (j or p):
                        sources.append(r * width + (at + j - 1 if j else prefix_last))
                        targets.append(branch[j])
                        owners.append(owner)
                ids += branch
                positions += range(p, p + len(branch))
                unit_of += [u] * len(branch)
                branch_of += [b] * len(branch)
        pad = width - (len(ids) - start)
        ids += [pad_token_id] * pad
        positions += [0] * pad
        unit_of += [-1] * pad
        branch_of += [0] * pad
    shape = (len(rows), width)
    if mask_format == "segments":
        # no mask: padding (rows of a budget) attends to nothing and is never scored; ones keep
        # a model from deriving one (a Hugging Face model would build a T² mask from positions)
        mask = torch.ones(shape, dtype=torch.long)
    else:
        mask = _block_mask(torch.tensor(unit_of).view(shape), torch.tensor(branch_of).view(shape))
    if mask_format == "additive":
        mask = torch.zeros(mask.shape).masked_fill_(~mask, torch.finfo(torch.float32).min)
    return Packed(
        input_ids=torch.tensor(ids, dtype=torch.long).view(shape),
        position_ids=torch.tensor(positions, dtype=torch.long).view(shape),
        attention_mask=mask,
        scoring=torch.tensor([sources, targets, owners], dtype=torch.long).view(3, -1),
        num_sequences=num_sequences,
        num_computed_tokens=len(rows) * width,
        segments=tuple(segments) if mask_format == "segments" else None,
    )


def segment_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    segments: Sequence[Segment],
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Attention of a packed layout without a mask: ``query``, ``key``, ``value`` [R, H, T, D]
    (as many key/value heads as query heads) → [R, H, T, D].

    Per unit: its prefix and first branch are one causal run; each further branch is a causal
    run over the prefix and itself (the prefix's queries are computed again and dropped: cheaper
    than a mask that would take the kernel off its fused causal path). Columns in no unit
    (padding) get zeros. Exactly the block-diagonal mask's attention, up to float rounding.
    """
    rows, heads, width, dim = query.shape
    pieces: list[list[torch.Tensor]] = [[] for _ in range(rows)]
    filled = [0] * rows

    def causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale
        )

    for row, start, prefix, branches in segments:
        q, k, v = query[row], key[row], value[row]
        if start > filled[row]:
            pieces[row].append(query.new_zeros(heads, start - filled[row], dim))
        end = start + prefix + branches[0]
        pieces[row].append(causal(q[:, start:end], k[:, start:end], v[:, start:end]))
        for length in branches[1:]:
            branch = slice(end, end + length)
            if prefix:
                head = slice(start, start + prefix)
                run = [torch.cat((t[:, head], t[:, branch]), 1) for t in (q, k, v)]
                pieces[row].append(causal(*run)[:, prefix:])
            else:
                pieces[row].append(causal(q[:, branch], k[:, branch], v[:, branch]))
            end += length
        filled[row] = end
    for row in range(rows):
        if filled[row] < width:
            pieces[row].append(query.new_zeros(heads, width - filled[row], dim))
    return torch.stack([torch.cat(row_pieces, 1) for row_pieces in pieces])


def _block_mask(unit_of: torch.Tensor, branch_of: torch.Tensor) -> torch.Tensor:
    """[R, 1, T, T] bool: query q may see key k iff k ≤ q, same unit, and k is in the prefix or
    in q's branch; a padding token sees only itself (a query that sees nothing would be NaN)."""
    width = unit_of.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same_unit = (unit_of[:, :, None] == unit_of[:, None, :]) & (unit_of[:, None, :] >= 0)
    branch_k = branch_of[:, None, :]
    visible = (branch_k == 0) | (branch_k == branch_of[:, :, None])
    mask = same_unit & visible & causal
    mask |= torch.eye(width, dtype=torch.bool)
    return mask[:, None]


def shared_prompt_length(
    chosen_ids: torch.Tensor,
    chosen_loss: torch.Tensor,
    rejected_ids: torch.Tensor,
    rejected_loss: torch.Tensor,
) -> int:
    """Leading tokens a pair can share: equal in both and scored in neither (the prompt)."""
    limit = min(_first_scored(chosen_loss), _first_scored(rejected_loss))
    same = (chosen_ids[:limit] != rejected_ids[:limit]).nonzero()
    return int(same[0, 0]) if same.numel() else limit


def _first_scored(loss_mask: torch.Tensor) -> int:
    scored = loss_mask.nonzero()
    return int(scored[0, 0]) if scored.numel() else int(loss_mask.shape[0])


def pack_pairs(
    batch: Mapping[str, torch.Tensor],
    *,
    prefix_sharing: bool = True,
    packing: bool = True,
    max_tokens_per_row: int | None = None,
    pad_token_id: int = 0,
    mask_format: str = "bool",
) -> Packed:
    """Pack a DPO pair batch (see `chatlearn.algorithms.dpo`): sequence i < B is chosen row i,
    B + i is rejected row i, as in `concatenate_pairs`. With `prefix_sharing`, each pair's
    prompt (its common unscored leading tokens) is computed once; `packing` False: one pair (or
    with neither, one sequence) per row, right-padded."""
    rows = int(batch["chosen_input_ids"].shape[0])
    if int(batch["rejected_input_ids"].shape[0]) != rows:
        raise ValueError("chosen and rejected must have the same number of rows")
    ids: list[list[int]] = []
    masks: list[list[int]] = []
    trimmed: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for side in ("chosen", "rejected"):
        lengths = _right_padded_lengths(batch[f"{side}_attention_mask"], side)
        trimmed[side] = [
            (batch[f"{side}_input_ids"][i, :n], batch[f"{side}_loss_mask"][i, :n])
            for i, n in enumerate(lengths)
        ]
        ids.extend(t.tolist() for t, _ in trimmed[side])
        masks.extend(m.tolist() for _, m in trimmed[side])
    groups: list[list[int]] = []
    prefix_lengths: list[int] = []
    if prefix_sharing:
        for i in range(rows):
            (c_ids, c_loss), (r_ids, r_loss) = trimmed["chosen"][i], trimmed["rejected"][i]
            groups.append([i, rows + i])
            prefix_lengths.append(shared_prompt_length(c_ids, c_loss, r_ids, r_loss))
    return pack_sequences(
        ids,
        masks,
        groups=groups,
        prefix_lengths=prefix_lengths,
        max_tokens_per_row=max_tokens_per_row,
        one_unit_per_row=not packing,
        pad_token_id=pad_token_id,
        mask_format=mask_format,
    )


def _right_padded_lengths(attention_mask: torch.Tensor, side: str) -> list[int]:
    """Each row's length, given that its mask is 1s then 0s; a row padded on the left (or with
    holes) would lose its tokens to the trimming: a ValueError naming it instead. The lengths
    and the check reach the host in one transfer (one device sync per side on CUDA, as the
    lengths alone took)."""
    lengths = attention_mask.sum(-1)
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    misplaced = (attention_mask.bool() != (positions < lengths[:, None])).any(-1)
    counts, bad = torch.stack([lengths, misplaced.to(lengths.dtype)]).tolist()
    if any(bad):
        raise ValueError(
            f"packing and prefix sharing need right-padded rows (attention mask 1s, then 0s): "
            f"{side} row {bad.index(1)} is padded otherwise; pad on the right (as the modules' "
            "collator does) or set packing: false and prefix_sharing: false"
        )
    return [int(n) for n in counts]


def real_tokens(batch: Mapping[str, torch.Tensor]) -> int:
    """Tokens of a pair batch that are neither padding nor a repeated prompt: the work a forward
    cannot avoid (`Packed.num_computed_tokens` or the padded 2·B·L is what it does)."""
    total = int(batch["chosen_attention_mask"].sum()) + int(batch["rejected_attention_mask"].sum())
    for i in range(int(batch["chosen_input_ids"].shape[0])):
        c_len = int(batch["chosen_attention_mask"][i].sum())
        r_len = int(batch["rejected_attention_mask"][i].sum())
        total -= shared_prompt_length(
            batch["chosen_input_ids"][i, :c_len],
            batch["chosen_loss_mask"][i, :c_len],
            batch["rejected_input_ids"][i, :r_len],
            batch["rejected_loss_mask"][i, :r_len],
        )
    return total
