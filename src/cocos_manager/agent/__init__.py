"""The Cocos agent: the manifest it is handed, the vsock transport, and its event/log stream protocol.

Public names load their module on first use (docs/decisions.md, "Wings and one-way imports")."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cocos_manager.agent.cvm_settings import AgentSettings as AgentSettings
    from cocos_manager.agent.cvm_settings import agent_settings as agent_settings
    from cocos_manager.agent.cvm_settings import create_ttl as create_ttl
    from cocos_manager.agent.late import LateAgentMessages as LateAgentMessages
    from cocos_manager.agent.manifest import effective_ttl as effective_ttl
    from cocos_manager.agent.manifest import validated_manifest as validated_manifest
    from cocos_manager.agent.protocol import MAX_FRAME as MAX_FRAME
    from cocos_manager.agent.vsock import AgentEventListener as AgentEventListener
    from cocos_manager.agent.vsock import Connect as Connect
    from cocos_manager.agent.vsock import HandoverAborted as HandoverAborted
    from cocos_manager.agent.vsock import HandoverTimeout as HandoverTimeout
    from cocos_manager.agent.vsock import send_manifest as send_manifest
    from cocos_manager.agent.vsock import vsock_connector as vsock_connector

# Each public name and the module it lives in.
HOMES = {
    "AgentSettings": "cvm_settings",
    "create_ttl": "cvm_settings",
    "agent_settings": "cvm_settings",
    "LateAgentMessages": "late",
    "effective_ttl": "manifest",
    "validated_manifest": "manifest",
    "MAX_FRAME": "protocol",
    "AgentEventListener": "vsock",
    "Connect": "vsock",
    "HandoverAborted": "vsock",
    "HandoverTimeout": "vsock",
    "send_manifest": "vsock",
    "vsock_connector": "vsock",
}


def __getattr__(name: str) -> object:
    if name in HOMES:
        return getattr(importlib.import_module(f"{__name__}.{HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
