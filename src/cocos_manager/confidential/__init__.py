"""Confidential launch: which SEV / SEV-SNP / TDX mode the settings make, its command-line pieces, and the checks of settings and host.

Public names load their module on first use (docs/decisions.md, "Wings and one-way imports")."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cocos_manager.confidential.argv import confidential_args as confidential_args
    from cocos_manager.confidential.argv import escape_option as escape_option
    from cocos_manager.confidential.argv import pflash_drives as pflash_drives
    from cocos_manager.confidential.checks import (
        check_confidential_launch as check_confidential_launch,
    )
    from cocos_manager.confidential.checks import check_settings as check_settings
    from cocos_manager.confidential.checks import (
        confidential_host_checks as confidential_host_checks,
    )
    from cocos_manager.confidential.modes import ConfidentialConfigError as ConfidentialConfigError
    from cocos_manager.confidential.modes import LaunchMode as LaunchMode
    from cocos_manager.confidential.modes import firmware_file as firmware_file
    from cocos_manager.confidential.modes import launch_mode as launch_mode
    from cocos_manager.confidential.modes import launched_binding as launched_binding
    from cocos_manager.confidential.modes import launched_mode as launched_mode
    from cocos_manager.confidential.modes import qemu_binary as qemu_binary
    from cocos_manager.confidential.modes import qemu_version as qemu_version
    from cocos_manager.confidential.modes import uses_bios as uses_bios

# Each public name and the module it lives in.
HOMES = {
    "launched_mode": "modes",
    "confidential_args": "argv",
    "escape_option": "argv",
    "pflash_drives": "argv",
    "check_confidential_launch": "checks",
    "check_settings": "checks",
    "confidential_host_checks": "checks",
    "ConfidentialConfigError": "modes",
    "firmware_file": "modes",
    "launch_mode": "modes",
    "launched_binding": "modes",
    "LaunchMode": "modes",
    "qemu_binary": "modes",
    "qemu_version": "modes",
    "uses_bios": "modes",
}


def __getattr__(name: str) -> object:
    if name in HOMES:
        return getattr(importlib.import_module(f"{__name__}.{HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
