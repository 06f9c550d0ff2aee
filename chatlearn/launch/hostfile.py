"""Host files and host selection, in the conventions of DeepSpeed and OpenMPI.

A host file lists one host per line with its number of device slots::

    # comments and blank lines are ignored
    worker-1 slots=4
    worker-2 slots=4   # a trailing comment too

A slot is one device: a GPU on GPU hosts, a CPU core on CPU-only hosts. `--include` and
`--exclude` narrow the list with DeepSpeed's syntax: hosts joined by ``@``, each optionally with
``:`` and a comma-separated list of slot indices, e.g. ``worker-1@worker-2:0,2``. Every mistake is a
`HostfileError` (a `ValueError`) that names the file and line, or the selection, and what to fix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from chatlearn.actors.hosts import is_local_host

__all__ = [
    "HostSlots",
    "HostfileError",
    "parse_hostfile",
    "read_hostfile",
    "read_text_file",
    "select_hosts",
]

# A host name or an IPv4 address (IPv6 ones are refused by name): no spaces, no shell
# metacharacters.
_HOST_RE = re.compile(r"^[A-Za-z0-9_.:\-\[\]%]+$")
_SLOTS_RE = re.compile(r"^slots=(\S*)$")
_DECIMAL_RE = re.compile(r"^[0-9]{1,7}$")  # str.isdigit() also takes '²' and other digits
# Devices a host may offer: more than any machine has (a typo of many digits would otherwise
# build a tuple of billions of slot indices).
MAX_SLOTS = 65536


class HostfileError(ValueError):
    """A malformed host file line or host selection; the message says where and what to fix."""


@dataclass(frozen=True)
class HostSlots:
    """One host and the indices of the slots (devices) the run may use on it."""

    name: str
    slots: tuple[int, ...]

    @property
    def num_slots(self) -> int:
        return len(self.slots)


def parse_hostfile(text: str, source: str = "<hostfile>") -> list[HostSlots]:
    """The hosts of a host file's `text`, in file order; `source` names the file in errors."""
    hosts: list[HostSlots] = []
    seen: dict[str, int] = {}
    local: tuple[str, int] | None = None  # the entry naming this machine, and its line
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source}:{lineno}"
        parts = line.split()
        if len(parts) != 2:
            raise HostfileError(f"{where}: expected 'hostname slots=N', got {raw.strip()!r}")
        name, slots_text = parts
        if not _HOST_RE.match(name):
            raise HostfileError(f"{where}: {name!r} is not a valid host name or address")
        if name.startswith("-"):  # ssh (or the --ssh-command) would take it for an option
            raise HostfileError(
                f"{where}: {name!r} is not a valid host name or address (a host name does not "
                "begin with '-'; ssh would read it as an option)"
            )
        if ":" in name:  # --include/--exclude write host:slots, and the sockets bind IPv4
            raise HostfileError(
                f"{where}: {name!r} is an IPv6 address, which chatlearn launch does not support "
                "yet; give the host's name or IPv4 address"
            )
        match = _SLOTS_RE.match(slots_text)
        if match is None:
            raise HostfileError(
                f"{where}: expected 'slots=N' after the host name, got {slots_text!r}"
            )
        value = match.group(1)
        if not _DECIMAL_RE.match(value) or not 1 <= int(value) <= MAX_SLOTS:
            raise HostfileError(
                f"{where}: slots must be an integer from 1 to {MAX_SLOTS}, got {value!r}"
            )
        key = name.lower()  # host names are case-insensitive: 'Node1' is 'node1'
        if key in seen:
            raise HostfileError(
                f"{where}: host {name!r} is listed twice (first on line {seen[key]}); "
                "list each host once with its total slots"
            )
        if is_local_host(name):
            if local is not None:
                raise HostfileError(
                    f"{where}: {name!r} and {local[0]!r} (line {local[1]}) are both this "
                    "machine, whose slots would be given out twice; list it once with its "
                    "total slots"
                )
            local = (name, lineno)
        seen[key] = lineno
        hosts.append(HostSlots(name, tuple(range(int(value)))))
    if not hosts:
        raise HostfileError(f"{source}: no hosts (expected lines of 'hostname slots=N')")
    return hosts


def read_text_file(path: str | Path, what: str) -> str:
    """The UTF-8 text of the `what` ("host file", "env file") at `path`; a file that cannot be
    read, or is not UTF-8 text, is a `HostfileError` naming it (and the line of the bad byte:
    the decoder's own message named neither)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise HostfileError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise HostfileError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); "
            f"save the {what} as UTF-8"
        ) from None


def read_hostfile(path: str | Path) -> list[HostSlots]:
    """`parse_hostfile` of a file; a missing or non-UTF-8 file is a `HostfileError` too."""
    return parse_hostfile(read_text_file(path, "host file"), str(path))


def _parse_selection(spec: str, option: str) -> dict[str, tuple[int, ...] | None]:
    """``host1@host2:0,2`` → {host1: None (all slots), host2: (0, 2)}."""
    selection: dict[str, tuple[int, ...] | None] = {}
    if not spec.strip():
        raise HostfileError(f"{option}: empty host selection")
    for item in spec.split("@"):
        item = item.strip()
        name, sep, slot_text = item.partition(":")
        if not name or not _HOST_RE.match(name):
            raise HostfileError(f"{option} {spec!r}: {item!r} is not 'host' or 'host:0,1'")
        if name in selection:
            raise HostfileError(f"{option} {spec!r}: host {name!r} appears twice")
        if not sep:
            selection[name] = None
            continue
        slots = []
        for part in slot_text.split(","):
            if not _DECIMAL_RE.match(part.strip()):
                raise HostfileError(
                    f"{option} {spec!r}: slot {part!r} of host {name!r} is not an integer"
                )
            slots.append(int(part))
        selection[name] = tuple(sorted(set(slots)))
    return selection


def select_hosts(
    hosts: list[HostSlots], include: str | None = None, exclude: str | None = None
) -> list[HostSlots]:
    """Apply `--include` or `--exclude` (not both) to `hosts`; keeps host file order.

    Hosts left without slots are dropped; naming a host or slot that is not in the host file is
    an error, and so is a selection that leaves nothing. `None` means the option was not given;
    an empty string was given (``--include ''``, e.g. an unset shell variable) and is an error,
    not "all hosts".
    """
    if include is not None and exclude is not None:
        raise HostfileError("--include and --exclude are mutually exclusive; use one of them")
    if include is None and exclude is None:
        return list(hosts)
    option = "--include" if include is not None else "--exclude"
    selection = _parse_selection(include if include is not None else exclude or "", option)
    by_name = {h.name: h for h in hosts}
    for name, slots in selection.items():
        if name not in by_name:
            known = ", ".join(by_name)
            raise HostfileError(f"{option}: host {name!r} is not in the host file ({known})")
        bad = [s for s in slots or () if s not in by_name[name].slots]
        if bad:
            raise HostfileError(
                f"{option}: host {name!r} has slots 0..{by_name[name].num_slots - 1}, not {bad}"
            )
    result: list[HostSlots] = []
    for host in hosts:
        chosen = selection.get(host.name, ()) if include is not None else None
        if include is not None:
            if host.name not in selection:
                continue
            slots = host.slots if chosen is None else chosen
        else:
            dropped = selection.get(host.name, ())
            if host.name in selection and dropped is None:
                continue
            slots = tuple(s for s in host.slots if s not in (dropped or ()))
        if slots:
            result.append(HostSlots(host.name, tuple(slots)))
    if not result:
        spec = include if include is not None else exclude
        raise HostfileError(f"{option} {spec!r} leaves no host to run on")
    return result
