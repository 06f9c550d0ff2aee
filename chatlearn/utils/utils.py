"""ChatLearn's `chatlearn.utils.utils` helpers that its example modules import:
`listdict_to_dictlist` (a list of per-sample dicts into one dict of lists) and
`multi_thread_data_processing` (its Megatron example's prompt dataset tokenizes with it).

A leaf of the package (tests/test_layers.py): it imports nothing of chatlearn. ChatLearn's other
helpers of that module are not provided (importing one is an ImportError naming it).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
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


def multi_thread_data_processing(
    num_threads: int,
    all_data: Sequence[Any],
    process_one_data: Callable[..., Any],
    fn_args: Sequence[Any],
) -> list[Any]:
    """``[process_one_data(item, *fn_args) for item in all_data]``, computed by up to
    ``num_threads`` threads, each over one contiguous share of the data, as ChatLearn's (which
    its Megatron example uses to tokenize prompts). The results are in the data's order; an
    exception in any item is raised here (the other shares run to their end first)."""
    items = list(all_data)
    if not items:
        return []
    if num_threads <= 0:
        raise ValueError(f"num_threads must be a positive number, got {num_threads}")
    share = math.ceil(len(items) / min(num_threads, len(items)))
    starts = range(0, len(items), share)

    def process(start: int) -> list[Any]:
        return [process_one_data(item, *fn_args) for item in items[start : start + share]]

    if len(starts) == 1:
        return process(0)
    with ThreadPoolExecutor(max_workers=len(starts)) as pool:
        futures = [pool.submit(process, start) for start in starts]
        return [result for future in futures for result in future.result()]


__all__ = ["listdict_to_dictlist", "multi_thread_data_processing"]
