"""The values that some settings choose between, apart from the settings that read them:
the modules that act on a choice (logging, tracing, the agent channel, the SEV-SNP syntax)
import these without the whole settings model."""

from __future__ import annotations

from enum import StrEnum

# COCOS_JAEGER_URL=off (or none, false, disabled) turns tracing off; empty keeps the default.
TRACING_OFF = "off"
_TRACING_OFF_SPELLINGS = frozenset({"off", "none", "false", "disabled", "0"})


def tracing_off(url: str) -> bool:
    return url.strip().lower() in _TRACING_OFF_SPELLINGS


class AgentChannel(StrEnum):
    VSOCK = "vsock"
    FW_CFG = "fw_cfg"


class GuestHaltAction(StrEnum):
    """What to do when QEMU reports the guest halted (internal error, panic, I/O error)."""

    STOP = "stop"  # stop the VM and release everything (vm-exit failed, QEMU's reason)
    KEEP = "keep"  # keep QEMU for inspection (state paused, vm-paused event)


class SnpSyntax(StrEnum):
    """How SEV-SNP is spelled on QEMU's command line (MANAGER_QEMU_SEV_SNP_SYNTAX)."""

    SEED = "seed"  # AMD's old fork, as the original wrote it
    UPSTREAM = "upstream"  # QEMU 9.1 and later
    AUTO = "auto"  # seed if QEMU knows the fork's memory-backend-memfd-private, else upstream


class LogLevel(StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARN = "warn"
    ERROR = "error"


class LogFormat(StrEnum):
    """MANAGER_LOG_FORMAT: how the daemon writes its log lines."""

    JSON = "json"  # one JSON object a line, the original's keys: for journald, Loki, jq
    TEXT = "text"  # "time level message key=value ...": for a person at a terminal
