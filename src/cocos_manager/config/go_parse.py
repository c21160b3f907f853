"""Parsers for environment values, spelled exactly as the original Go daemon's strconv read them.

The original used caarlos0/env: booleans through strconv.ParseBool, integers through
strconv.ParseInt(v, 10, 32), durations through time.ParseDuration. Operators' existing
environment files must keep meaning the same thing here; config/settings.py declares its fields
with these.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from pydantic import BeforeValidator

_GO_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_GO_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})
_INT_RE = re.compile(r"[+-]?[0-9]+")
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def parse_go_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        if value in _GO_TRUE:
            return True
        if value in _GO_FALSE:
            return False
    raise ValueError("expected a boolean (1, t, T, TRUE, true, True, 0, f, F, FALSE, false, False)")


def parse_go_int(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and _INT_RE.fullmatch(value):
        number = int(value, 10)
    else:
        raise ValueError("expected a base-10 integer")
    if not _INT32_MIN <= number <= _INT32_MAX:
        raise ValueError("integer out of range")
    return number


_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
# Go: digits, an optional fraction ("1.5h", "1.s", ".5s"), at least one digit in all.
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h)")
_DURATION_MAX_SECONDS = (2**63 - 1) / 1e9  # Go's Duration is int64 nanoseconds (~2562047h)


class DurationRangeError(ValueError):
    """A well-formed duration beyond Go's int64 nanoseconds."""


def parse_go_duration(value: object) -> float:
    """Seconds from a Go duration string ("30s", "1m30s", "250ms"), as time.ParseDuration reads."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, str):
        raise ValueError("expected a duration such as 30s, 500ms or 1m30s")
    text = value
    sign = -1.0 if text.startswith("-") else 1.0
    if text[:1] in ("-", "+"):
        text = text[1:]  # one sign, as Go: "--5s" and "+-5s" are errors
    if text == "0":
        return 0.0
    pos, total = 0, 0.0
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if match is None:
            raise ValueError("expected a duration such as 30s, 500ms or 1m30s")
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if pos == 0:
        raise ValueError("expected a duration such as 30s, 500ms or 1m30s")
    if total > _DURATION_MAX_SECONDS:
        raise DurationRangeError("a duration must be at most 2562047h (Go's limit)")
    return sign * total


def parse_optional_go_int(value: object) -> int | None:
    return None if value is None else parse_go_int(value)


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse_name_list(value: object) -> tuple[str, ...]:
    """Comma-separated environment variable names ("A,B, C"); empty items are ignored."""
    if isinstance(value, tuple | list):
        items = [str(item) for item in value]
    elif isinstance(value, str):
        items = [item.strip() for item in value.split(",")]
    else:
        raise ValueError("expected comma-separated variable names")
    names = tuple(item for item in items if item)
    for name in names:
        if not _ENV_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not an environment variable name")
    return names


def parse_optional_go_duration(value: object) -> float | None:
    """Unset or "0" = None (off), as MAX_VMS=0 means no limit; otherwise a Go duration."""
    if value is None:
        return None
    seconds = parse_go_duration(value)
    return None if seconds == 0 else seconds


GoBool = Annotated[bool, BeforeValidator(parse_go_bool)]
GoInt = Annotated[int, BeforeValidator(parse_go_int)]
GoDuration = Annotated[float, BeforeValidator(parse_go_duration)]


def parse_uint64(value: object) -> int:
    """A 64-bit unsigned number, decimal or 0x-hex: SNP policies are written in hex."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and re.fullmatch(r"(0[xX][0-9a-fA-F]+|[0-9]+)", value):
        number = int(value, 0)
    else:
        raise ValueError("expected a decimal or 0x-hexadecimal number")
    if not 0 <= number < 2**64:
        raise ValueError("out of range for 64 bits")
    return number


UInt64 = Annotated[int, BeforeValidator(parse_uint64)]


@dataclass(frozen=True, slots=True)
class PortRange:
    """An inclusive host port range such as "6100-6200" (MANAGER_QEMU_HOST_FWD_RANGE)."""

    first: int
    last: int

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.first, self.last + 1))

    def __str__(self) -> str:
        return f"{self.first}-{self.last}"


def parse_port_range(value: object) -> PortRange | None:
    if value is None or isinstance(value, PortRange):
        return value
    if isinstance(value, str):
        if value == "":
            return None
        match = re.fullmatch(r"([0-9]{1,5})-([0-9]{1,5})", value)
        if match:
            first, last = int(match.group(1)), int(match.group(2))
            if 1 <= first <= last <= 65535:
                return PortRange(first, last)
    raise ValueError("expected a port range FIRST-LAST within 1-65535, such as 6100-6200")


def go_duration_text(seconds: float) -> str:
    """Seconds written as Go's Duration.String() writes them ("20s", "1m30s", "1h0m0s",
    "500ms"), so a value printed back reads as the operator would have written it."""
    nanos = round(seconds * 1e9)
    if nanos == 0:
        return "0s"
    sign, nanos = ("-", -nanos) if nanos < 0 else ("", nanos)
    if nanos < 1_000_000_000:
        for unit, size in (("ms", 1_000_000), ("µs", 1_000), ("ns", 1)):
            if nanos >= size:
                return f"{sign}{_trim(nanos / size)}{unit}"
    hours, rest = divmod(nanos, 3_600_000_000_000)
    minutes, rest = divmod(rest, 60_000_000_000)
    text = f"{_trim(rest / 1e9)}s"
    if hours or minutes:
        text = f"{minutes}m{text}"
    if hours:
        text = f"{hours}h{text}"
    return sign + text


def _trim(value: float) -> str:
    return f"{value:.9f}".rstrip("0").rstrip(".")
