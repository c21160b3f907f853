"""Memory sizes as QEMU's -m reads them ("2048M", "30G", "512": MiB without a suffix), turned
into whole MiB so a Run's size can be compared with the settings' and the operator's ceiling."""

from __future__ import annotations

import re

_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)([bBkKmMgGtTpPeE]?)")
_MIB_PER_UNIT = {"b": 1 / 2**20, "k": 1 / 2**10, "m": 1, "g": 2**10, "t": 2**20, "p": 2**30}
_MIB_PER_UNIT["e"] = 2**40


def memory_mib(text: str) -> int:
    """Whole MiB of a QEMU size (rounded down, as QEMU rounds RAM to pages anyway); ValueError
    for anything QEMU's -m would not read."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a size (a number of MiB, or with K, M, G or T: 4G)")
    number, unit = match.groups()
    return int(float(number) * _MIB_PER_UNIT[(unit or "m").lower()])


def parse_optional_memory_mib(value: object) -> int | None:
    """A settings field in MiB, written as QEMU sizes are ("8G", "4096M"); unset or 0 = None."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        mib = value
    elif isinstance(value, str):
        mib = memory_mib(value)
    else:
        raise ValueError("expected a size such as 8G or 4096M")
    return mib or None
