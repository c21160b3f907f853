"""QEMU itself: the command line (pure), its environment, the spawn, the process and its QMP monitor, its output, what its failures mean, probes of the binary, and sudo.

Public names load their module on first use (docs/decisions.md, "Wings and one-way imports")."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cocos_manager.qemu.argv import Executable as Executable
    from cocos_manager.qemu.argv import QemuNotFoundError as QemuNotFoundError
    from cocos_manager.qemu.argv import VmResources as VmResources
    from cocos_manager.qemu.argv import VmSize as VmSize
    from cocos_manager.qemu.argv import cvm_args as cvm_args
    from cocos_manager.qemu.argv import derive_vm_settings as derive_vm_settings
    from cocos_manager.qemu.argv import effective_base_args as effective_base_args
    from cocos_manager.qemu.argv import option_values as option_values
    from cocos_manager.qemu.argv import qemu_args as qemu_args
    from cocos_manager.qemu.argv import resolve_executable as resolve_executable
    from cocos_manager.qemu.argv import shell_line as shell_line
    from cocos_manager.qemu.argv import vm_args as vm_args
    from cocos_manager.qemu.argv import vm_file_paths as vm_file_paths
    from cocos_manager.qemu.console_file import ConsoleFiles as ConsoleFiles
    from cocos_manager.qemu.console_file import read_history as read_history
    from cocos_manager.qemu.environment import qemu_environment as qemu_environment
    from cocos_manager.qemu.failures import Conflict as Conflict
    from cocos_manager.qemu.failures import conflicts_exhausted as conflicts_exhausted
    from cocos_manager.qemu.probes import Runner as Runner
    from cocos_manager.qemu.probes import check_qemu as check_qemu
    from cocos_manager.qemu.probes import check_sudo as check_sudo
    from cocos_manager.qemu.probes import run_probe as run_probe
    from cocos_manager.qemu.process import QemuProcess as QemuProcess
    from cocos_manager.qemu.qmp import QmpClosed as QmpClosed
    from cocos_manager.qemu.qmp import QmpError as QmpError
    from cocos_manager.qemu.qmp import qmp_args as qmp_args
    from cocos_manager.qemu.qmp import qmp_listener as qmp_listener
    from cocos_manager.qemu.spawn import ExitInfo as ExitInfo
    from cocos_manager.qemu.streams import LineCallback as LineCallback

# Each public name and the module it lives in.
HOMES = {
    "read_history": "console_file",
    "ConsoleFiles": "console_file",
    "VmSize": "argv",
    "cvm_args": "argv",
    "option_values": "argv",
    "derive_vm_settings": "argv",
    "effective_base_args": "argv",
    "Executable": "argv",
    "qemu_args": "argv",
    "QemuNotFoundError": "argv",
    "resolve_executable": "argv",
    "shell_line": "argv",
    "vm_args": "argv",
    "vm_file_paths": "argv",
    "VmResources": "argv",
    "qemu_environment": "environment",
    "Conflict": "failures",
    "conflicts_exhausted": "failures",
    "LineCallback": "streams",
    "check_qemu": "probes",
    "check_sudo": "probes",
    "run_probe": "probes",
    "Runner": "probes",
    "QemuProcess": "process",
    "qmp_args": "qmp",
    "qmp_listener": "qmp",
    "QmpClosed": "qmp",
    "QmpError": "qmp",
    "ExitInfo": "spawn",
}


def __getattr__(name: str) -> object:
    if name in HOMES:
        return getattr(importlib.import_module(f"{__name__}.{HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
