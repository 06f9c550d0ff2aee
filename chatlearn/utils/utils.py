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
    ``list_extend`` a key whose values are lists gets them concatenated (``a1 + a2 + ...``). The
    first dict's values are deep-copied; the keys are those of the first dict."""
    res = copy.deepcopy(dict(ld[0]))
    for key, value in res.items():
        if not (list_extend and isinstance(value, list)):
            res[key] = [value]
    for d in ld[1:]:
        for key, value in d.items():
            if list_extend and isinstance(value, list):
                res[key].extend(value)
            else:
                res[key].append(value)
    return res


__all__ = ["listdict_to_dictlist"]
