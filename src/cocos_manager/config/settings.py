"""Typed settings read from the environment, parsed exactly as the original Go daemon did.

The original used caarlos0/env: booleans through strconv.ParseBool, integers through
strconv.ParseInt(v, 10, 32), and a variable that is set but empty takes its default.
Operators' existing environment files must keep meaning the same thing here. The value
parsers are in go_parse.py; this module declares the fields and loads them.
"""

from __future__ import annotations

import ipaddress
import os
import re
import uuid
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import BeforeValidator, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from cocos_manager.config.choices import (
    TRACING_OFF,
    AgentChannel,
    GuestHaltAction,
    LogLevel,
    SnpSyntax,
    tracing_off,
)
from cocos_manager.config.go_parse import (
    GoBool,
    GoDuration,
    GoInt,
    UInt64,
    parse_name_list,
    parse_optional_go_duration,
    parse_optional_go_int,
    parse_port_range,
)

# Re-exported: resources.py and the tests name the range type with the settings it belongs to.
from cocos_manager.config.go_parse import PortRange as PortRange

FIRST_GUEST_CID = 3
MAX_VNC_DISPLAY = 65535 - 5900
MIN_CONSOLE_FILE_BYTES = 256 * 1024

# The original's -append value: one argv element that includes the two double quotes.
ORIGINAL_KERNEL_CMDLINE = '"earlyprintk=serial console=ttyS0"'


# SEV-SNP guest policy bit 17 is reserved and must be 1; 0x30000 also allows SMT (bit 16).
SNP_POLICY_RESERVED_ONE = 1 << 17


_COMMON = SettingsConfigDict(
    env_ignore_empty=True,  # set-but-empty takes the default, as in the original
    case_sensitive=True,  # as Go's os.Getenv: manager_grpc_port is not MANAGER_GRPC_PORT
    extra="ignore",
    frozen=True,
    arbitrary_types_allowed=True,
)


class QemuSettings(BaseSettings):
    """MANAGER_QEMU_*: the original's variables, then the port's own additions."""

    model_config = SettingsConfigDict(env_prefix="MANAGER_QEMU_", **_COMMON)

    BIN_PATH: str = "qemu-system-x86_64"
    TMP_FILE_LOC: str = "tmp"
    USE_SUDO: GoBool = False
    ENABLE_SEV: GoBool = False
    ENABLE_SEV_SNP: GoBool = True
    ENABLE_KVM: GoBool = True
    MACHINE: str = "q35"
    CPU: str = "EPYC"
    SMP_COUNT: GoInt = 4
    SMP_MAXCPUS: GoInt = 64
    MEM_ID: str = "ram1"
    MEMORY_SIZE: str = "2048M"
    MEMORY_SLOTS: GoInt = 5
    MAX_MEMORY: str = "30G"
    OVMF_CODE_IF: str = "pflash"
    OVMF_CODE_FORMAT: str = "raw"
    OVMF_CODE_UNIT: GoInt = 0
    OVMF_CODE_FILE: str = "/usr/share/OVMF/OVMF_CODE.fd"
    OVMF_CODE_READONLY: str = "on"
    OVMF_VARS_IF: str = "pflash"
    OVMF_VARS_FORMAT: str = "raw"
    OVMF_VARS_UNIT: GoInt = 1
    OVMF_VARS_FILE: str = "/usr/share/OVMF/OVMF_VARS.fd"
    NETDEV_ID: str = "vmnic"
    HOST_FWD_AGENT: GoInt = 7020
    GUEST_FWD_AGENT: GoInt = 7002
    VIRTIO_NET_PCI_DISABLE_LEGACY: str = "on"
    VIRTIO_NET_PCI_IOMMU_PLATFORM: GoBool = True
    VIRTIO_NET_PCI_ADDR: str = "0x2"
    VIRTIO_NET_PCI_ROMFILE: str = ""
    DISK_IMG_KERNEL_FILE: str = "img/bzImage"
    DISK_IMG_ROOTFS_FILE: str = "img/rootfs.cpio.gz"
    KERNEL_HASH: GoBool = False
    NO_GRAPHIC: GoBool = True
    MONITOR: str = "pty"
    SEV_ID: str = "sev0"
    SEV_CBITPOS: GoInt = 51
    SEV_REDUCED_PHYS_BITS: GoInt = 1
    VSOCK_ID: str = "vhost-vsock-pci0"
    VSOCK_GUEST_CID: GoInt = 3
    VSOCK_VNC: GoInt = 0

    # Additions of the port (not in the original README's era).
    KERNEL_CMDLINE: str = ORIGINAL_KERNEL_CMDLINE
    AGENT_CHANNEL: AgentChannel = AgentChannel.VSOCK
    HOST_FWD_RANGE: Annotated[PortRange | None, NoDecode, BeforeValidator(parse_port_range)] = None
    STOP_TIMEOUT: GoDuration = 30.0
    START_TIMEOUT: GoDuration = 60.0
    # Stop asks the guest first (ACPI power button, QMP system_powerdown) for this long, then
    # SIGTERM, then SIGKILL after STOP_TIMEOUT; 0 keeps the original's SIGTERM.
    POWERDOWN_GRACE: GoDuration = 0.0
    ON_GUEST_HALT: GuestHaltAction = GuestHaltAction.STOP
    # After a restart, how long a re-adopted VM's QMP monitor may take to answer (all VMs are
    # probed at once); one that does not is killed. Bounded: start-up must not wait on a wedge.
    ADOPT_TIMEOUT: GoDuration = 10.0

    # Hardening for real hosts (exposure and QEMU's environment): docs/decisions.md,
    # "Hardening: exposure" and "Hardening: QEMU's environment".
    HOST_FWD_ADDR: str = ""  # host address of hostfwd ("" = every interface, as the original)
    VNC_ADDR: str = ""  # host address of -vnc ("" = every interface, as the original)
    PASS_ENV: Annotated[tuple[str, ...], NoDecode, BeforeValidator(parse_name_list)] = ()

    # -- confidential launch (confidential.py, attestation.py) --------------------------------
    SEV_SNP_SYNTAX: SnpSyntax = SnpSyntax.SEED
    SEV_SNP_POLICY: UInt64 = 0x30000
    SEV_SNP_GUEST_FEATURES: UInt64 = 0x1
    SEV_SNP_ID_BLOCK_FILE: str = ""
    SEV_SNP_ID_AUTH_FILE: str = ""
    SEV_SNP_AUTHOR_KEY_ENABLED: GoBool = False
    BIND_MANIFEST: GoBool = False
    BIOS_FILE: str = "/usr/share/ovmf/OVMF.fd"
    ENABLE_TDX: GoBool = False
    TDX_ID: str = "tdx0"
    TDX_QUOTE_GENERATION_SOCKET: str = ""

    @field_validator("SEV_SNP_POLICY")
    @classmethod
    def _snp_policy(cls, value: int) -> int:
        if not value & SNP_POLICY_RESERVED_ONE:
            raise ValueError("bit 17 of an SEV-SNP policy is reserved and must be 1 (e.g. 0x30000)")
        return value

    @field_validator("TDX_QUOTE_GENERATION_SOCKET")
    @classmethod
    def _qgs(cls, value: str) -> str:
        if value and not (value.startswith("/") or re.fullmatch(r"vsock:[0-9]+:[0-9]+", value)):
            raise ValueError("expected a UNIX socket path (/...) or vsock:CID:PORT")
        return value

    @field_validator("STOP_TIMEOUT", "START_TIMEOUT", "POWERDOWN_GRACE", "ADOPT_TIMEOUT")
    @classmethod
    def _non_negative(cls, value: float) -> float:
        if value < 0:
            raise ValueError("a duration must not be negative")
        return value

    @field_validator("HOST_FWD_ADDR")
    @classmethod
    def _host_fwd_addr(cls, value: str) -> str:
        # QEMU's user networking reads hostfwd's address as IPv4 only (no names, no IPv6):
        # anything else would fail every Run with "Invalid host forwarding rule".
        if value:
            try:
                ipaddress.IPv4Address(value)
            except ValueError:
                raise ValueError(
                    "expected an IPv4 address such as 127.0.0.1 (QEMU forwards IPv4 only; "
                    "empty = every interface)"
                ) from None
        return value

    @field_validator("VSOCK_GUEST_CID")
    @classmethod
    def _guest_cid(cls, value: int) -> int:
        if value < FIRST_GUEST_CID:
            raise ValueError(f"guest CIDs start at {FIRST_GUEST_CID} (0-2 are reserved by vsock)")
        return value

    @field_validator("VSOCK_VNC")
    @classmethod
    def _vnc_display(cls, value: int) -> int:
        if not 0 <= value <= MAX_VNC_DISPLAY:
            raise ValueError(f"a VNC display must be within 0-{MAX_VNC_DISPLAY} (port 5900+N)")
        return value


class ServiceSettings(BaseSettings):
    """MANAGER_* service-wide variables (and the one COCOS_* variable the manager reads)."""

    model_config = SettingsConfigDict(env_prefix="MANAGER_", **_COMMON)

    LOG_LEVEL: LogLevel = LogLevel.INFO
    GRPC_HOST: str = ""
    GRPC_PORT: GoInt = 7001
    GRPC_SERVER_CERT: str = ""
    GRPC_SERVER_KEY: str = ""
    GRPC_SERVER_CA_CERTS: str = ""
    GRPC_CLIENT_CA_CERTS: str = ""
    JAEGER_URL: str = Field(
        default="http://localhost:14268/api/traces", validation_alias="COCOS_JAEGER_URL"
    )
    INSTANCE_ID: str = ""
    METRICS_PORT: Annotated[int | None, NoDecode, BeforeValidator(parse_optional_go_int)] = None
    MAX_VMS: GoInt = 0  # 0 = no limit
    STATE_DIR: str = "state"
    SHUTDOWN_STOPS_VMS: GoBool = True

    # Hardening for real hosts: docs/decisions.md, "Hardening: bounds against clients and guests".
    METRICS_HOST: str = ""  # "" = the address of MANAGER_GRPC_HOST
    GRPC_MAX_MESSAGE_SIZE: GoInt = 8 * 1024 * 1024
    EVENTS_MAX_SUBSCRIBERS: GoInt = 64  # 0 = no limit
    EVENTS_QUEUE_BYTES: GoInt = 16 * 1024 * 1024
    EVENTS_RETAIN: GoInt = 10_000
    EVENTS_RETAIN_BYTES: GoInt = 16 * 1024 * 1024
    EVENTS_HOLD_TIMEOUT: GoDuration = 1.0
    AGENT_MAX_CONNECTIONS_PER_CID: GoInt = 4  # 0 = no limit
    CONSOLE_LINES_PER_SECOND: GoInt = 50  # 0 = no limit
    CONSOLE_LINES_BURST: GoInt = 200
    # Disk of each VM's console file (both halves of its rotation): docs/decisions.md,
    # "The console survives the daemon".
    CONSOLE_FILE_BYTES: GoInt = 8 * 1024 * 1024
    # The daemon's session against its guests' in the scheduler: sched_weight.py.
    AUTOGROUP_NICE: GoInt = -10

    # Dial-out to a computations server (dialout.py): the original's gRPC client settings.
    # Empty URL = no dial-out (the original defaulted to localhost:7001, which is this
    # daemon's own listen address here).
    GRPC_URL: str = ""
    GRPC_TIMEOUT: GoDuration = 60.0
    GRPC_CLIENT_CERT: str = ""
    GRPC_CLIENT_KEY: str = ""
    GRPC_URL_CA_CERTS: str = ""  # the port's own: the dial-out trust root, apart from the chain
    GRPC_ATTESTED_TLS: GoBool = False
    GRPC_MANIFEST: str = ""

    @field_validator("GRPC_TIMEOUT")
    @classmethod
    def _positive_timeout(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("a timeout must be positive")
        return value

    # Operator queries: TTL and console history (docs/contracts.md, "List, Logs, TTL").
    DEFAULT_TTL: Annotated[float | None, NoDecode, BeforeValidator(parse_optional_go_duration)] = (
        None  # unset or 0 = no TTL unless a Run gives one
    )
    LOG_HISTORY_LINES: GoInt = 1000  # per VM
    LOG_HISTORY_BYTES: GoInt = 256 * 1024  # per VM
    LOG_RETENTION: GoDuration = 3600.0  # how long an ended VM's console stays readable
    LOG_RETAINED_VMS: GoInt = 50  # ended VMs whose console is kept, newest first

    @field_validator("DEFAULT_TTL", "LOG_RETENTION", "EVENTS_HOLD_TIMEOUT")
    @classmethod
    def _duration(cls, value: float | None) -> float | None:
        if value is not None and value < 0:
            raise ValueError("a duration must not be negative")
        return value

    @field_validator("LOG_RETAINED_VMS")
    @classmethod
    def _retained(cls, value: int) -> int:
        if value < 0:
            raise ValueError("must be 0 (keep none) or more")
        return value

    @field_validator("JAEGER_URL")
    @classmethod
    def _jaeger_url(cls, value: str) -> str:
        if tracing_off(value):
            return TRACING_OFF
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                "expected an http(s) URL such as http://localhost:14268/api/traces, "
                f"or {TRACING_OFF!r} to turn tracing off"
            )
        return value

    @field_validator("GRPC_PORT", "METRICS_PORT")
    @classmethod
    def _port(cls, value: int | None) -> int | None:
        if value is not None and not 0 <= value <= 65535:
            raise ValueError("a port must be within 0-65535")
        return value

    @field_validator(
        "GRPC_MAX_MESSAGE_SIZE",
        "EVENTS_QUEUE_BYTES",
        "CONSOLE_LINES_BURST",
        "LOG_HISTORY_LINES",
        "LOG_HISTORY_BYTES",
    )
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be 1 or more")
        return value

    @field_validator(
        "EVENTS_MAX_SUBSCRIBERS",
        "EVENTS_RETAIN",
        "EVENTS_RETAIN_BYTES",
        "AGENT_MAX_CONNECTIONS_PER_CID",
        "CONSOLE_LINES_PER_SECOND",
    )
    @classmethod
    def _zero_or_more(cls, value: int) -> int:
        if value < 0:
            raise ValueError("must be 0 or more")
        return value

    @field_validator("CONSOLE_FILE_BYTES")
    @classmethod
    def _console_file(cls, value: int) -> int:
        if value < MIN_CONSOLE_FILE_BYTES:
            raise ValueError(
                f"must be {MIN_CONSOLE_FILE_BYTES} (256 KiB) or more: each half of the "
                "rotation holds a longest line (64 KiB) and then some"
            )
        return value

    @field_validator("AUTOGROUP_NICE")
    @classmethod
    def _nice(cls, value: int) -> int:
        if not -20 <= value <= 19:
            raise ValueError("a nice value is from -20 to 19")
        return value

    @field_validator("MAX_VMS")
    @classmethod
    def _max_vms(cls, value: int) -> int:
        if value < 0:
            raise ValueError("must be 0 (no limit) or more")
        return value


class SettingsError(Exception):
    """A variable that does not parse: start-up stops with this one line."""


@dataclass(frozen=True, slots=True)
class Settings:
    service: ServiceSettings
    qemu: QemuSettings
    instance_id: str


def env_name(model: type[BaseSettings], field: str) -> str:
    info = model.model_fields[field]
    if isinstance(info.validation_alias, str):
        return info.validation_alias
    return f"{model.model_config.get('env_prefix', '')}{field}"


def _describe(model: type[BaseSettings], error: ValidationError) -> str:
    first = error.errors(include_url=False)[0]
    field = str(first["loc"][0]) if first["loc"] else "?"
    name = env_name(model, field) if field in model.model_fields else field
    message = first["msg"].removeprefix("Value error, ")
    got = first.get("input")
    return (
        f"invalid value for {name}: {got!r} ({message})"
        if isinstance(got, str)
        else (f"invalid value for {name} ({message})")
    )


def load_settings() -> Settings:
    """Reads and validates every variable; raises SettingsError naming the first bad one."""
    models: list[BaseSettings] = []
    for model in (ServiceSettings, QemuSettings):
        try:
            models.append(model())
        except ValidationError as error:
            raise SettingsError(_describe(model, error)) from None
    service, qemu = models
    assert isinstance(service, ServiceSettings) and isinstance(qemu, QemuSettings)
    # Resolved once, here: a daemon restarted from another working directory must find the
    # same records and per-VM files (and the lock), and the log shows where they are.
    service = service.model_copy(update={"STATE_DIR": os.path.abspath(service.STATE_DIR)})
    qemu = qemu.model_copy(update={"TMP_FILE_LOC": os.path.abspath(qemu.TMP_FILE_LOC)})
    return Settings(
        service=service, qemu=qemu, instance_id=service.INSTANCE_ID or str(uuid.uuid4())
    )
