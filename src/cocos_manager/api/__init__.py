"""The gRPC face: the servicer that maps requests and errors, its interceptors, the server, and the dial-out client of a computations server.

Public names load their module on first use (docs/decisions.md, "Wings and one-way imports")."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cocos_manager.api.dialout import DialOut as DialOut
    from cocos_manager.api.dialout import DialOutConfigError as DialOutConfigError
    from cocos_manager.api.interceptors import TelemetryInterceptor as TelemetryInterceptor
    from cocos_manager.api.server import Server as Server
    from cocos_manager.api.server import build_server as build_server
    from cocos_manager.api.server import listen_address as listen_address

# Each public name and the module it lives in.
HOMES = {
    "DialOut": "dialout",
    "DialOutConfigError": "dialout",
    "TelemetryInterceptor": "interceptors",
    "build_server": "server",
    "listen_address": "server",
    "Server": "server",
}


def __getattr__(name: str) -> object:
    if name in HOMES:
        return getattr(importlib.import_module(f"{__name__}.{HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
