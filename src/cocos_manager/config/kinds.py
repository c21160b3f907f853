"""Kinds of setting: a value parsed as the Go original did (go_parse.py) with the one rule it
must meet, written once and named for what it is.

A field says what it is (`Port`, `NonNegativeDuration`, `AtLeast(1)`), and the rule and its
message come with the kind, so two variables of one kind can never disagree on either. The
messages are the ones operators see after `invalid value for MANAGER_...`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Annotated, Any, TypeVar
from urllib.parse import urlsplit

from pydantic import AfterValidator, BeforeValidator
from pydantic_settings import NoDecode

from cocos_manager.config.choices import TRACING_OFF, tracing_off
from cocos_manager.config.go_parse import (
    GoDuration,
    GoInt,
    UInt64,
    parse_optional_go_duration,
    parse_optional_go_int,
)

T = TypeVar("T")

FIRST_GUEST_CID = 3
MAX_VNC_DISPLAY = 65535 - 5900
# SEV-SNP guest policy bit 17 is reserved and must be 1; 0x30000 also allows SMT (bit 16).
SNP_POLICY_RESERVED_ONE = 1 << 17


def rule(holds: Callable[[Any], bool], message: str) -> AfterValidator:
    """A check on the parsed value; None (an optional setting left unset) always passes."""

    def check(value: T) -> T:
        if value is not None and not holds(value):
            raise ValueError(message)
        return value

    return AfterValidator(check)


def AtLeast(low: int, message: str | None = None) -> AfterValidator:
    """An integer from `low` up; the message may say what `low` means ("0 (no limit)")."""
    return rule(lambda v: v >= low, message or f"must be {low} or more")


def Within(low: int, high: int, message: str) -> AfterValidator:
    return rule(lambda v: low <= v <= high, message)


def _ipv4_or_empty(value: str) -> bool:
    try:
        return not value or bool(ipaddress.IPv4Address(value))
    except ValueError:
        return False


def _trace_url(value: str) -> str:
    if tracing_off(value):
        return TRACING_OFF
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            "expected an http(s) URL such as http://localhost:14268/api/traces, "
            f"or {TRACING_OFF!r} to turn tracing off"
        )
    return value


_PORT = Within(0, 65535, "a port must be within 0-65535")
_NOT_NEGATIVE = rule(lambda v: v >= 0, "a duration must not be negative")

Port = Annotated[GoInt, _PORT]
OptionalPort = Annotated[int | None, NoDecode, BeforeValidator(parse_optional_go_int), _PORT]
NonNegativeDuration = Annotated[GoDuration, _NOT_NEGATIVE]
OptionalNonNegativeDuration = Annotated[
    float | None, NoDecode, BeforeValidator(parse_optional_go_duration), _NOT_NEGATIVE
]
PositiveDuration = Annotated[GoDuration, rule(lambda v: v > 0, "a timeout must be positive")]
# Pings: below a second they cost CPU (1ms: a core's tenth) and a live client on a busy host
# misses its answer (1ms: a Logs follower dropped within seconds).
PingInterval = Annotated[
    GoDuration, rule(lambda v: v == 0 or v >= 1, "must be 0 (no pings) or 1s or more")
]
PingTimeout = Annotated[GoDuration, rule(lambda v: v >= 1, "must be 1s or more")]
PositiveInt = Annotated[GoInt, AtLeast(1)]
ZeroOrMore = Annotated[GoInt, AtLeast(0)]
Nice = Annotated[GoInt, Within(-20, 19, "a nice value is from -20 to 19")]
GuestCid = Annotated[
    GoInt,
    AtLeast(FIRST_GUEST_CID, f"guest CIDs start at {FIRST_GUEST_CID} (0-2 are reserved by vsock)"),
]
VncDisplay = Annotated[
    GoInt,
    Within(0, MAX_VNC_DISPLAY, f"a VNC display must be within 0-{MAX_VNC_DISPLAY} (port 5900+N)"),
]
# QEMU's user networking reads hostfwd's address as IPv4 only (no names, no IPv6): anything
# else would fail every Run with "Invalid host forwarding rule".
HostFwdAddress = Annotated[
    str,
    rule(
        _ipv4_or_empty,
        "expected an IPv4 address such as 127.0.0.1 (QEMU forwards IPv4 only; "
        "empty = every interface)",
    ),
]
SnpPolicy = Annotated[
    UInt64,
    rule(
        lambda v: v & SNP_POLICY_RESERVED_ONE,
        "bit 17 of an SEV-SNP policy is reserved and must be 1 (e.g. 0x30000)",
    ),
]
QgsSocket = Annotated[
    str,
    rule(
        lambda v: not v or v.startswith("/") or re.fullmatch(r"vsock:[0-9]+:[0-9]+", v),
        "expected a UNIX socket path (/...) or vsock:CID:PORT",
    ),
]
TraceUrl = Annotated[str, AfterValidator(_trace_url)]
