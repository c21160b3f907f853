"""What the operator configures: every `MANAGER_*` variable as a typed setting, the Go-style value parsers, unknown-variable hints, and the credential files the settings name.

Public names load their module on first use (docs/decisions.md, "Wings and one-way imports")."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cocos_manager.config.choices import AgentChannel as AgentChannel
    from cocos_manager.config.choices import GuestHaltAction as GuestHaltAction
    from cocos_manager.config.choices import LogFormat as LogFormat
    from cocos_manager.config.choices import LogLevel as LogLevel
    from cocos_manager.config.choices import SnpSyntax as SnpSyntax
    from cocos_manager.config.choices import tracing_off as tracing_off
    from cocos_manager.config.dialout import DialOutConfig as DialOutConfig
    from cocos_manager.config.dialout import DialOutConfigError as DialOutConfigError
    from cocos_manager.config.dialout import dialout_config as dialout_config
    from cocos_manager.config.dialout import rejected_certificate as rejected_certificate
    from cocos_manager.config.dialout import retry_fields as retry_fields
    from cocos_manager.config.env_text import env_values as env_values
    from cocos_manager.config.go_parse import DurationRangeError as DurationRangeError
    from cocos_manager.config.go_parse import go_duration_text as go_duration_text
    from cocos_manager.config.go_parse import parse_go_duration as parse_go_duration
    from cocos_manager.config.settings import PortRange as PortRange
    from cocos_manager.config.settings import QemuSettings as QemuSettings
    from cocos_manager.config.settings import ServiceSettings as ServiceSettings
    from cocos_manager.config.settings import Settings as Settings
    from cocos_manager.config.settings import SettingsError as SettingsError
    from cocos_manager.config.settings import load_settings as load_settings
    from cocos_manager.config.sizes import memory_mib as memory_mib
    from cocos_manager.config.tls import TlsConfigError as TlsConfigError
    from cocos_manager.config.tls import TlsMode as TlsMode
    from cocos_manager.config.tls import channel_credentials as channel_credentials
    from cocos_manager.config.tls import describe_mode as describe_mode
    from cocos_manager.config.tls import server_credentials as server_credentials
    from cocos_manager.config.tls_failures import CLI as CLI
    from cocos_manager.config.tls_failures import likely_cause as likely_cause
    from cocos_manager.config.unknown import unknown_variables as unknown_variables

# Each public name and the module it lives in.
HOMES = {
    "go_duration_text": "go_parse",
    "env_values": "env_text",
    "memory_mib": "sizes",
    "LogFormat": "choices",
    "likely_cause": "tls_failures",
    "CLI": "tls_failures",
    "retry_fields": "dialout",
    "rejected_certificate": "dialout",
    "AgentChannel": "choices",
    "GuestHaltAction": "choices",
    "LogLevel": "choices",
    "SnpSyntax": "choices",
    "tracing_off": "choices",
    "dialout_config": "dialout",
    "DialOutConfig": "dialout",
    "DialOutConfigError": "dialout",
    "DurationRangeError": "go_parse",
    "parse_go_duration": "go_parse",
    "load_settings": "settings",
    "PortRange": "settings",
    "QemuSettings": "settings",
    "ServiceSettings": "settings",
    "Settings": "settings",
    "SettingsError": "settings",
    "channel_credentials": "tls",
    "describe_mode": "tls",
    "server_credentials": "tls",
    "TlsConfigError": "tls",
    "TlsMode": "tls",
    "unknown_variables": "unknown",
}


def __getattr__(name: str) -> object:
    if name in HOMES:
        return getattr(importlib.import_module(f"{__name__}.{HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
