"""Samples that cannot become a data set or cross the wire, named by where they came from.

Runs in the coordinator.

A module's config error about "sample i of the <split> data set" (chatlearn/hf/data.py) becomes
the error at that record's file:line when the data set came from a file (its ``origin``); a
sample the transport cannot send (a ``datetime`` among extra fields) is found after the
`EncodeError`, sample by sample, and named by split, index, file:line and key path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from chatlearn.actors import ActorError
from chatlearn.config.errors import ConfigError, sample_named, sample_where, split_fix
from chatlearn.transport.codec import encode
from chatlearn.transport.errors import EncodeError


def located_sample_error(
    error: ActorError, origins: Mapping[str, Callable[[int], str] | None]
) -> ActorError | ConfigError:
    """A module's config error about "sample i of the <split> data set" as the ConfigError at
    that record's file:line, when the data set came from a file (``origins``: split -> the
    records' ``origin``, chatlearn/hf/data.py's PreferenceRecords); else ``error`` itself."""
    found = sample_named(error.message) if error.is_config_error else None
    origin = origins.get(found[1]) if found else None
    if found is None or origin is None:
        return error
    try:
        where = origin(found[0])
    except (IndexError, TypeError, ValueError):
        return error
    head, fix = split_fix(error.message)
    return ConfigError(" ".join(head.split()), where=where, fix=fix)


def unsendable_sample_error(
    datasets: Sequence[tuple[str, Sequence[Any]]],
    origins: Mapping[str, Callable[[int], str] | None],
) -> ConfigError | None:
    """The one-line error of the first sample the transport cannot send (a `datetime` among
    its extra fields, say), naming its split, index (and file:line) and key path; None when
    every sample encodes. Run after an `EncodeError`, so it costs nothing before one."""
    for split, samples in datasets:
        for index, sample in enumerate(samples):
            found = _unsendable(sample, "")
            if found is None:
                continue
            path, value = found
            origin = origins.get(split)
            where = sample_where(index, split)
            with contextlib.suppress(IndexError, TypeError, ValueError):
                where = f"{origin(index)}: {where}" if origin else where
            key = path or "(the sample)"
            if isinstance(value, str):  # text the codec refuses: a lone surrogate
                return ConfigError(
                    f"key {key} holds text that is not Unicode ({_short_repr(value)}: a lone "
                    "surrogate, such as a truncated emoji's \\ud83d)",
                    where=where,
                    fix="write the character itself, or its whole surrogate pair, or drop it",
                )
            return ConfigError(
                f"key {key} is {_short_repr(value)} (a {type(value).__qualname__}), which "
                "cannot be sent to the models",
                where=where,
                fix="convert it to a string or a number, or drop the key, before set_dataset",
            )
    return None


def _unsendable(value: Any, path: str) -> tuple[str, Any] | None:
    """(key path, value) of the innermost part of ``value`` the codec refuses, or None."""
    try:
        encode(value)
    except EncodeError:
        pass
    else:
        return None
    items: Any = ()
    if isinstance(value, Mapping):
        items = ((f"{path}[{k!r}]" if path else repr(k), v) for k, v in value.items())
    elif isinstance(value, list | tuple):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    for inner_path, inner in items:
        found = _unsendable(inner, inner_path)
        if found is not None:
            return found
    return path, value


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
