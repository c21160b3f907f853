"""Typed settings read from the environment, parsed exactly as the original Go daemon did.

The original used caarlos0/env: booleans through strconv.ParseBool, integers through
strconv.ParseInt(v, 10, 32), and a variable that is set but empty takes its default.
Operators' existing environment files must keep meaning the same thing here. The value
parsers are in config/go_parse.py; this module declares the fields and loads them.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import Annotated

from pydantic import BeforeValidator, Field, ValidationError
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from cocos_manager.config.choices import (
    AgentChannel,
    GuestHaltAction,
    LogFormat,
    LogLevel,
    SnpSyntax,
)
from cocos_manager.config.go_parse import GoBool, GoInt, UInt64, parse_name_list, parse_port_range

# Re-exported: vm/resources.py and the tests name the range type with the settings it belongs to.
from cocos_manager.config.go_parse import PortRange as PortRange
from cocos_manager.config.kinds import (
    AtLeast,
    GuestCid,
    HostFwdAddress,
    Nice,
    NonNegativeDuration,
    OptionalNonNegativeDuration,
    OptionalPort,
    PingInterval,
    PingTimeout,
    Port,
    PositiveDuration,
    PositiveInt,
    QgsSocket,
    SnpPolicy,
    TraceUrl,
    VncDisplay,
    ZeroOrMore,
)
from cocos_manager.config.sizes import parse_optional_memory_mib

MIN_CONSOLE_FILE_BYTES = 256 * 1024

# The original's -append value: one argv element that includes the two double quotes.
ORIGINAL_KERNEL_CMDLINE = '"earlyprintk=serial console=ttyS0"'


_COMMON = SettingsConfigDict(
    env_ignore_empty=True,  # set-but-empty takes the default, as in the original
    case_sensitive=True,  # as Go's os.Getenv: manager_grpc_port is not MANAGER_GRPC_PORT
    extra="ignore",
    frozen=True,
    arbitrary_types_allowed=True,
)


class _FromEnvironment:
    """The environment is the one place settings come from, as in the original: neither model
    names an env file or a secrets directory, and pydantic-settings' dotenv source still looked
    at every field for nothing at each load (a quarter of load_settings' CPU)."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings


class QemuSettings(_FromEnvironment, BaseSettings):
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
    VSOCK_GUEST_CID: GuestCid = 3
    VSOCK_VNC: VncDisplay = 0

    # Additions of the port (not in the original README's era).
    KERNEL_CMDLINE: str = ORIGINAL_KERNEL_CMDLINE
    AGENT_CHANNEL: AgentChannel = AgentChannel.VSOCK
    HOST_FWD_RANGE: Annotated[PortRange | None, NoDecode, BeforeValidator(parse_port_range)] = None
    STOP_TIMEOUT: NonNegativeDuration = 30.0
    START_TIMEOUT: NonNegativeDuration = 60.0
    # Stop asks the guest first (ACPI power button, QMP system_powerdown) for this long, then
    # SIGTERM, then SIGKILL after STOP_TIMEOUT; 0 keeps the original's SIGTERM.
    POWERDOWN_GRACE: NonNegativeDuration = 0.0
    ON_GUEST_HALT: GuestHaltAction = GuestHaltAction.STOP
    # After a restart, how long a re-adopted VM's QMP monitor may take to answer (all VMs are
    # probed at once); one that does not is killed. Bounded: start-up must not wait on a wedge.
    ADOPT_TIMEOUT: NonNegativeDuration = 10.0
    # The most a Run may ask for (ComputationRunReq.vcpus / memory_mib): docs/decisions.md,
    # "Per-Run size". 0 / unset = the default size (SMP_COUNT, MEMORY_SIZE) is also the
    # ceiling: a client can make its VM smaller, never bigger, until the operator says so.
    MAX_SMP: Annotated[GoInt, AtLeast(0, "must be 0 (the default size is the ceiling) or more")] = 0
    MAX_MEMORY_PER_VM: Annotated[
        int | None, NoDecode, BeforeValidator(parse_optional_memory_mib)
    ] = None  # in MiB; written as QEMU sizes are (8G, 4096M)

    # Hardening for real hosts (exposure and QEMU's environment): docs/decisions.md,
    # "Hardening: exposure" and "Hardening: QEMU's environment".
    HOST_FWD_ADDR: HostFwdAddress = (
        ""  # host address of hostfwd ("" = every interface, as the original)
    )
    VNC_ADDR: str = ""  # host address of -vnc ("" = every interface, as the original)
    PASS_ENV: Annotated[tuple[str, ...], NoDecode, BeforeValidator(parse_name_list)] = ()

    # -- confidential launch (confidential/modes.py, vm/attestation.py) --------------------------------
    SEV_SNP_SYNTAX: SnpSyntax = SnpSyntax.SEED
    SEV_SNP_POLICY: SnpPolicy = 0x30000
    SEV_SNP_GUEST_FEATURES: UInt64 = 0x1
    SEV_SNP_ID_BLOCK_FILE: str = ""
    SEV_SNP_ID_AUTH_FILE: str = ""
    SEV_SNP_AUTHOR_KEY_ENABLED: GoBool = False
    BIND_MANIFEST: GoBool = False
    BIOS_FILE: str = "/usr/share/ovmf/OVMF.fd"
    ENABLE_TDX: GoBool = False
    TDX_ID: str = "tdx0"
    TDX_QUOTE_GENERATION_SOCKET: QgsSocket = ""

    # Upstream Cocos main's (manager/qemu/config.go): the firmware's version, which CVMInfo
    # reports for a verifier's policy; the daemon does not read the firmware to learn it.
    OVMF_VERSION: str = ""


class ServiceSettings(_FromEnvironment, BaseSettings):
    """MANAGER_* service-wide variables (and the one COCOS_* variable the manager reads)."""

    model_config = SettingsConfigDict(env_prefix="MANAGER_", **_COMMON)

    LOG_LEVEL: LogLevel = LogLevel.INFO
    LOG_FORMAT: LogFormat = LogFormat.JSON  # the port's own: text for a person at a terminal
    GRPC_HOST: str = ""
    GRPC_PORT: Port = 7001
    GRPC_SERVER_CERT: str = ""
    GRPC_SERVER_KEY: str = ""
    GRPC_SERVER_CA_CERTS: str = ""
    GRPC_CLIENT_CA_CERTS: str = ""
    JAEGER_URL: TraceUrl = Field(
        default="http://localhost:14268/api/traces", validation_alias="COCOS_JAEGER_URL"
    )
    INSTANCE_ID: str = ""
    METRICS_PORT: OptionalPort = None
    MAX_VMS: Annotated[GoInt, AtLeast(0, "must be 0 (no limit) or more")] = 0
    STATE_DIR: str = "state"
    SHUTDOWN_STOPS_VMS: GoBool = True
    # Upstream Cocos main's: the guest OS (EOS) image's version, reported by CVMInfo.
    EOS_VERSION: str = ""

    # Hardening for real hosts: docs/decisions.md, "Hardening: bounds against clients and guests".
    METRICS_HOST: str = ""  # "" = the address of MANAGER_GRPC_HOST
    GRPC_MAX_MESSAGE_SIZE: PositiveInt = 8 * 1024 * 1024
    # Pings to each client connection, so that one gone silent frees its streams' places.
    GRPC_KEEPALIVE: PingInterval = 30.0  # 0 = no pings
    GRPC_KEEPALIVE_TIMEOUT: PingTimeout = 20.0
    EVENTS_MAX_SUBSCRIBERS: ZeroOrMore = 64  # 0 = no limit
    EVENTS_QUEUE_BYTES: PositiveInt = 16 * 1024 * 1024
    EVENTS_RETAIN: ZeroOrMore = 10_000
    EVENTS_RETAIN_BYTES: ZeroOrMore = 16 * 1024 * 1024
    EVENTS_HOLD_TIMEOUT: NonNegativeDuration = 1.0
    AGENT_MAX_CONNECTIONS_PER_CID: ZeroOrMore = 4  # 0 = no limit
    CONSOLE_LINES_PER_SECOND: ZeroOrMore = 50  # 0 = no limit
    CONSOLE_LINES_BURST: PositiveInt = 200
    # Disk of each VM's console file (both halves of its rotation): docs/decisions.md,
    # "The console survives the daemon".
    CONSOLE_FILE_BYTES: Annotated[
        GoInt,
        AtLeast(
            MIN_CONSOLE_FILE_BYTES,
            f"must be {MIN_CONSOLE_FILE_BYTES} (256 KiB) or more: each half of the "
            "rotation holds a longest line (64 KiB) and then some",
        ),
    ] = 8 * 1024 * 1024
    # The daemon's session against its guests' in the scheduler: host/sched_weight.py.
    AUTOGROUP_NICE: Nice = -10

    # Dial-out to a computations server (api/dialout.py): the original's gRPC client settings.
    # Empty URL = no dial-out (the original defaulted to localhost:7001, which is this
    # daemon's own listen address here).
    GRPC_URL: str = ""
    GRPC_TIMEOUT: PositiveDuration = 60.0
    GRPC_CLIENT_CERT: str = ""
    GRPC_CLIENT_KEY: str = ""
    GRPC_URL_CA_CERTS: str = ""  # the port's own: the dial-out trust root, apart from the chain
    GRPC_ATTESTED_TLS: GoBool = False
    GRPC_MANIFEST: str = ""

    # Operator queries: TTL and console history (docs/contracts.md, "List, Logs, TTL").
    DEFAULT_TTL: OptionalNonNegativeDuration = None  # unset or 0 = no TTL unless a Run gives one
    LOG_HISTORY_LINES: PositiveInt = 1000  # per VM
    LOG_HISTORY_BYTES: PositiveInt = 256 * 1024  # per VM
    LOG_RETENTION: NonNegativeDuration = 3600.0  # how long an ended VM's console stays readable
    LOG_RETAINED_VMS: Annotated[GoInt, AtLeast(0, "must be 0 (keep none) or more")] = (
        50  # ended VMs whose console is kept, newest first
    )
    LOG_MAX_STREAMS: ZeroOrMore = 64  # Logs streams at once (tail or follow); 0 = no limit


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
