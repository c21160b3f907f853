"""Events and console history: the bus (numbering, retention, replay, fan-out), subscriptions, the manager's own messages, each VM's console.

Public names load their module on first use (docs/decisions.md, "Wings and one-way imports")."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cocos_manager.events.bus import EventBus as EventBus
    from cocos_manager.events.bus import Subscription as Subscription
    from cocos_manager.events.bus import log_message as log_message
    from cocos_manager.events.console import ConsoleArchive as ConsoleArchive
    from cocos_manager.events.console import ConsoleLog as ConsoleLog
    from cocos_manager.events.console import notice_line as notice_line
    from cocos_manager.events.console_limit import ConsoleLogLimiter as ConsoleLogLimiter
    from cocos_manager.events.messages import MANAGER_ORIGINATOR as MANAGER_ORIGINATOR
    from cocos_manager.events.messages import MANAGER_SHUTDOWN as MANAGER_SHUTDOWN
    from cocos_manager.events.messages import manager_event as manager_event
    from cocos_manager.events.messages import shutdown_notice as shutdown_notice

# Each public name and the module it lives in.
HOMES = {
    "MANAGER_SHUTDOWN": "messages",
    "shutdown_notice": "messages",
    "notice_line": "console",
    "EventBus": "bus",
    "log_message": "bus",
    "Subscription": "bus",
    "ConsoleArchive": "console",
    "ConsoleLog": "console",
    "ConsoleLogLimiter": "console_limit",
    "manager_event": "messages",
    "MANAGER_ORIGINATOR": "messages",
}


def __getattr__(name: str) -> object:
    if name in HOMES:
        return getattr(importlib.import_module(f"{__name__}.{HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
