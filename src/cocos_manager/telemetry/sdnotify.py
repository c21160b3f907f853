"""systemd's readiness protocol (sd_notify), without linking libsystemd.

With Type=notify, systemd holds back units ordered after the manager, and reports the start
as done, only once READY=1 arrives; so READY=1 is sent when gRPC is serving, not when the
process starts. STOPPING=1 tells systemd the stop is ours, not a crash, while VMs are stopped.
"""

from __future__ import annotations

import os
import socket

READY = "READY=1"
STOPPING = "STOPPING=1"


def _address(value: str) -> str | bytes:
    # A leading '@' names Linux's abstract namespace, which the socket API spells with NUL.
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    return value


def notify(state: str) -> bool:
    """Sends `state` (e.g. "READY=1") to $NOTIFY_SOCKET; False when unset or unreachable.

    Never raises: outside systemd there is nobody to tell, and a lost notification must not
    stop the daemon (systemd's start timeout reports it instead).
    """
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), _address(target))
    except OSError:
        return False
    return True
