"""This host and process: kernel probes, the scheduling weight, the state directory lock, VM records and process identity, background tasks and worker threads, check results.

Public names load their module on first use (docs/decisions.md, "Wings and one-way imports")."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cocos_manager.host.check_result import Check as Check
    from cocos_manager.host.check_result import Status as Status
    from cocos_manager.host.check_result import exit_code as exit_code
    from cocos_manager.host.check_result import hidden_note as hidden_note
    from cocos_manager.host.check_result import render as render
    from cocos_manager.host.launch_dirs import launch_dir_sharers as launch_dir_sharers
    from cocos_manager.host.launch_dirs import load_launch_dirs as load_launch_dirs
    from cocos_manager.host.launch_dirs import mark_launch_dir as mark_launch_dir
    from cocos_manager.host.launch_dirs import save_launch_dirs as save_launch_dirs
    from cocos_manager.host.launch_dirs import unmark_launch_dir as unmark_launch_dir
    from cocos_manager.host.listeners import LISTEN_OPTIONS as LISTEN_OPTIONS
    from cocos_manager.host.listeners import ListenRefusedError as ListenRefusedError
    from cocos_manager.host.listeners import grpc_listen_refusal as grpc_listen_refusal
    from cocos_manager.host.listeners import listen_address as listen_address
    from cocos_manager.host.listeners import probe_grpc_listen as probe_grpc_listen
    from cocos_manager.host.probes import Host as Host
    from cocos_manager.host.probes import check_agent_channel as check_agent_channel
    from cocos_manager.host.probes import check_kvm as check_kvm
    from cocos_manager.host.probes import check_sev as check_sev
    from cocos_manager.host.processes import live_processes as live_processes
    from cocos_manager.host.processes import process_ended as process_ended
    from cocos_manager.host.processes import process_identity as process_identity
    from cocos_manager.host.processes import process_start_time as process_start_time
    from cocos_manager.host.processes import processes_since as processes_since
    from cocos_manager.host.sched_weight import raise_session_weight as raise_session_weight
    from cocos_manager.host.sched_weight import weight_check as weight_check
    from cocos_manager.host.state_lock import StateDirLockedError as StateDirLockedError
    from cocos_manager.host.state_lock import hold_state_lock as hold_state_lock
    from cocos_manager.host.state_lock import probe_state_lock as probe_state_lock
    from cocos_manager.host.state_store import StateStore as StateStore
    from cocos_manager.host.state_store import VmRecord as VmRecord
    from cocos_manager.host.state_store import check_private_dir as check_private_dir
    from cocos_manager.host.state_store import current_boot_id as current_boot_id
    from cocos_manager.host.tasks import TaskSet as TaskSet
    from cocos_manager.host.tasks import done_within as done_within
    from cocos_manager.host.tasks import outcome_seen as outcome_seen
    from cocos_manager.host.tasks import outlast as outlast
    from cocos_manager.host.workers import start_pool as start_pool

# Each public name and the module it lives in.
HOMES = {
    "load_launch_dirs": "launch_dirs",
    "save_launch_dirs": "launch_dirs",
    "mark_launch_dir": "launch_dirs",
    "unmark_launch_dir": "launch_dirs",
    "launch_dir_sharers": "launch_dirs",
    "hidden_note": "check_result",
    "probe_state_lock": "state_lock",
    "probe_grpc_listen": "listeners",
    "listen_address": "listeners",
    "grpc_listen_refusal": "listeners",
    "check_private_dir": "state_store",
    "ListenRefusedError": "listeners",
    "LISTEN_OPTIONS": "listeners",
    "Check": "check_result",
    "exit_code": "check_result",
    "render": "check_result",
    "Status": "check_result",
    "check_agent_channel": "probes",
    "check_kvm": "probes",
    "check_sev": "probes",
    "Host": "probes",
    "raise_session_weight": "sched_weight",
    "weight_check": "sched_weight",
    "hold_state_lock": "state_lock",
    "StateDirLockedError": "state_lock",
    "current_boot_id": "state_store",
    "live_processes": "processes",
    "process_ended": "processes",
    "process_identity": "processes",
    "process_start_time": "processes",
    "processes_since": "processes",
    "StateStore": "state_store",
    "VmRecord": "state_store",
    "TaskSet": "tasks",
    "done_within": "tasks",
    "outcome_seen": "tasks",
    "outlast": "tasks",
    "start_pool": "workers",
}


def __getattr__(name: str) -> object:
    if name in HOMES:
        return getattr(importlib.import_module(f"{__name__}.{HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
