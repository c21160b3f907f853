"""One VM's lifecycle: the `Machine` and its states, start (for a caller), stop, record, guest watch, TTL, files, leased numbers, re-adoption after a restart, what List says, the attestation policy.

Public names load their module on first use (docs/decisions.md, "Wings and one-way imports")."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cocos_manager.vm.attestation import computation_policy_json as computation_policy_json
    from cocos_manager.vm.caller import start_to_running as start_to_running
    from cocos_manager.vm.files import check_images as check_images
    from cocos_manager.vm.files import room_per_vm as room_per_vm
    from cocos_manager.vm.info import cvm_info as cvm_info
    from cocos_manager.vm.inspect import EndedVms as EndedVms
    from cocos_manager.vm.inspect import machine_info as machine_info
    from cocos_manager.vm.inspect import vm_info as vm_info
    from cocos_manager.vm.lifecycle import PROVISION as PROVISION
    from cocos_manager.vm.lifecycle import MachineContext as MachineContext
    from cocos_manager.vm.lifecycle import Released as Released
    from cocos_manager.vm.lifecycle import StopReason as StopReason
    from cocos_manager.vm.lifecycle import VmState as VmState
    from cocos_manager.vm.listing import computation_info as computation_info
    from cocos_manager.vm.machine import Machine as Machine
    from cocos_manager.vm.orphans import hold_tmp_dir as hold_tmp_dir
    from cocos_manager.vm.orphans import share_tmp_dir as share_tmp_dir
    from cocos_manager.vm.output import append_agent_log as append_agent_log
    from cocos_manager.vm.pause import pause_vm as pause_vm
    from cocos_manager.vm.pause import resume_vm as resume_vm
    from cocos_manager.vm.recovery import recover as recover
    from cocos_manager.vm.resources import Pool as Pool
    from cocos_manager.vm.resources import Pools as Pools
    from cocos_manager.vm.shutdown import announce_shutdown as announce_shutdown
    from cocos_manager.vm.shutdown import end_streams as end_streams
    from cocos_manager.vm.shutdown import stop_or_leave as stop_or_leave
    from cocos_manager.vm.shutdown import stop_starting as stop_starting
    from cocos_manager.vm.size import requested_size as requested_size

# Each public name and the module it lives in.
HOMES = {
    "start_to_running": "caller",
    "EndedVms": "inspect",
    "machine_info": "inspect",
    "vm_info": "inspect",
    "resume_vm": "pause",
    "requested_size": "size",
    "append_agent_log": "output",
    "announce_shutdown": "shutdown",
    "end_streams": "shutdown",
    "stop_or_leave": "shutdown",
    "stop_starting": "shutdown",
    "pause_vm": "pause",
    "share_tmp_dir": "orphans",
    "hold_tmp_dir": "orphans",
    "room_per_vm": "files",
    "cvm_info": "info",
    "computation_policy_json": "attestation",
    "check_images": "files",
    "MachineContext": "lifecycle",
    "PROVISION": "lifecycle",
    "Released": "lifecycle",
    "StopReason": "lifecycle",
    "VmState": "lifecycle",
    "computation_info": "listing",
    "Machine": "machine",
    "recover": "recovery",
    "Pool": "resources",
    "Pools": "resources",
}


def __getattr__(name: str) -> object:
    if name in HOMES:
        return getattr(importlib.import_module(f"{__name__}.{HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
