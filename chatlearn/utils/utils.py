"""ChatLearn's `chatlearn.utils.utils.listdict_to_dictlist`, which its example modules import to
turn a list of per-sample dicts into one dict of lists.

A leaf of the package (tests/test_layers.py): it imports nothing of chatlearn. ChatLearn's other
helpers of that module are not provided (importing one is an ImportError naming it).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any


def listdict_to_dictlist(
    ld: Sequence[Mapping[str, Any]], list_extend: bool = True
) -> dict[str, Any]:
    """``[{k: a1}, {k: a2}, ...]`` → ``{k: [a1, a2, ...]}``, as ChatLearn's: with
    ``list_extend`` a value that is a list is spliced in (``a1 + a2 + ...``). The first dict's
    values are deep-copied; its keys are the columns (a later key not among them: KeyError)."""
    columns: dict[str, list[Any]] = {}
    for position, sample in enumerate(ld):
        for key, value in sample.items():
            if position == 0:
                value = copy.deepcopy(value)
                columns[key] = []
            column = columns[key]
            if list_extend and isinstance(value, list):
                column.extend(value)
            else:
                column.append(value)
    return columns


__all__ = ["listdict_to_dictlist"]
