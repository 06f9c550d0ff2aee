"""glibc's malloc thresholds: where received messages' memory comes from.

libzmq's I/O thread allocates every received message of more than a few KiB with `malloc`, and
the process frees it when the decoded tensors die. glibc serves a block above its mmap threshold
with a mapping of its own, unmapped when freed; after such a free it raises the threshold to the
freed size (up to 32 MiB) and the trim threshold to twice that. A receiver of 1 MiB messages
thus ends up with a 2 MiB trim threshold while a queue of 8 messages is in flight: the top of
the I/O thread's heap is handed back to the system again and again, and the next messages land
in fresh pages. Measured between two processes over tcp: 7-52 page faults per 1 MiB message,
and raw pyzmq as well as our channels received 25-40 % fewer bytes per second than with the
thresholds fixed (see BENCHMARKS.md).

`keep_receive_buffers` fixes them where glibc's own adjustment ends for any process that has
freed a 32 MiB block (a training process frees many): blocks up to 32 MiB come from the heaps,
and up to 64 MiB of free memory at a heap's top stays with the process. The actor processes and
the transport benchmark's processes apply it at start-up; a module that wants freed memory back
sooner sets its own thresholds in `setup` (e.g. `chatlearn.hf`'s ``malloc_mmap_threshold``),
which replaces these. Thresholds the user set for glibc in the environment (``GLIBC_TUNABLES``'
``glibc.malloc.mmap_threshold`` or ``trim_threshold``, ``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_``) are left as they are.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Mapping
from typing import Final

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
# glibc's ceiling for its dynamic mmap threshold on 64-bit systems, and its trim threshold then.
RECEIVE_MMAP_THRESHOLD: Final = 32 * 1024 * 1024
RECEIVE_TRIM_THRESHOLD: Final = 2 * RECEIVE_MMAP_THRESHOLD


def set_malloc_thresholds(mmap_bytes: int, trim_bytes: int, *, release: bool = False) -> bool:
    """Fix glibc's mmap and trim thresholds (process-wide; this stops its dynamic adjustment)
    and, with ``release``, give back what the heaps hold free now (`malloc_trim`). False where
    there is no glibc (nothing is changed) or it refused a value."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 — glibc only (musl has no mallopt parameters)
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = mallopt(_M_MMAP_THRESHOLD, int(mmap_bytes)) == 1
    applied = mallopt(_M_TRIM_THRESHOLD, int(trim_bytes)) == 1 and applied
    if release and applied:
        libc.malloc_trim(0)
    return applied


def keep_receive_buffers(environ: Mapping[str, str] = os.environ) -> bool:
    """Let received messages of up to 32 MiB reuse freed memory instead of fresh pages; False
    (nothing changed) without glibc or if ``environ`` sets glibc's thresholds itself."""
    if _thresholds_set_in(environ):
        return False
    return set_malloc_thresholds(RECEIVE_MMAP_THRESHOLD, RECEIVE_TRIM_THRESHOLD)


def _thresholds_set_in(environ: Mapping[str, str]) -> bool:
    if "MALLOC_MMAP_THRESHOLD_" in environ or "MALLOC_TRIM_THRESHOLD_" in environ:
        return True
    tunables = environ.get("GLIBC_TUNABLES", "")
    return "malloc.mmap_threshold" in tunables or "malloc.trim_threshold" in tunables
