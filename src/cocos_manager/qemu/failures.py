"""What QEMU's own words at a failed start mean: the one classifier of its stderr.

Beside the argv builder because the options it reads back are the ones that builder wrote:
`-netdev user,hostfwd=...` (host port), `-vnc` (display) and `-device vhost-vsock-pci`
(guest CID). Each of these numbers is probed and held by the daemon, but a process outside it
can still take one between the probe and QEMU's bind; the start is then retried with another.
"""

from __future__ import annotations

import enum
import errno
import os
import pwd
import re
from collections.abc import Iterable, Sequence

from cocos_manager.errors import FailedPreconditionError, ManagerError, ResourceExhaustedError


class Conflict(enum.Enum):
    """A host-wide number another process holds."""

    HOST_PORT = "host_port"
    VNC_DISPLAY = "vnc_display"
    GUEST_CID = "guest_cid"


_PATTERNS: tuple[tuple[Conflict, re.Pattern[str]], ...] = (
    # -netdev user: Could not set up host forwarding rule 'tcp::7020-:7002'
    (Conflict.HOST_PORT, re.compile(r"could not set up host forwarding rule", re.I)),
    # Failed to start VNC server: Failed to find an available port: Address already in use
    (Conflict.VNC_DISPLAY, re.compile(r"VNC server.*(address already in use|bind)", re.I)),
    # vhost-vsock: unable to set guest cid: Address already in use
    (Conflict.GUEST_CID, re.compile(r"unable to set guest cid", re.I)),
)


def classify_start_failure(stderr: Iterable[str]) -> Conflict | None:
    """The taken number QEMU complains about, or None when it failed for another reason."""
    for line in stderr:
        for conflict, pattern in _PATTERNS:
            if pattern.search(line):
                return conflict
    return None


_WHAT = {
    Conflict.HOST_PORT: ("host port", "MANAGER_QEMU_HOST_FWD_RANGE"),
    Conflict.VNC_DISPLAY: ("VNC display", "MANAGER_QEMU_VSOCK_VNC"),
    Conflict.GUEST_CID: ("guest CID", "MANAGER_QEMU_VSOCK_GUEST_CID"),
}


def conflicts_exhausted(
    taken: Sequence[tuple[Conflict, int]], attempts: int
) -> ResourceExhaustedError:
    """Every attempt of a start hit a number another process holds: the host is short of
    them, not broken, so RESOURCE_EXHAUSTED naming the numbers and the setting to move."""
    parts = []
    for conflict in Conflict:
        numbers = [str(number) for c, number in taken if c is conflict]
        if numbers:
            what, variable = _WHAT[conflict]
            parts.append(f"{what}s {', '.join(numbers)} are held by another process ({variable})")
    return ResourceExhaustedError(
        f"QEMU could not start in {attempts} attempts: " + "; ".join(parts)
    )


def launch_failure(argv: Sequence[str], error: OSError) -> ManagerError:
    """The exec of QEMU (or sudo) itself failed: the binary was removed, lost its exec bit
    or is not a program since start-up checked it. The host's fault, named by its setting;
    a host out of processes or memory is RESOURCE_EXHAUSTED."""
    program = argv[0] if argv else "?"
    variable = "MANAGER_QEMU_USE_SUDO (sudo)" if program == "sudo" else "MANAGER_QEMU_BIN_PATH"
    reason = error.strerror or str(error)
    if error.errno in (errno.EAGAIN, errno.ENOMEM):
        return ResourceExhaustedError(f"cannot start {program!r}: {reason}")
    return FailedPreconditionError(f"{variable}: cannot execute {program!r}: {reason}")


# -- sudo (MANAGER_QEMU_USE_SUDO=true) ---------------------------------------------------------
#
# sudo's own refusals, as sudo 1.9 words them; any other line of sudo's own ("sudo: ...") before
# QEMU ran is a refusal too. QEMU's lines start with its program name, never with "sudo:".
_SUDO_REFUSAL = re.compile(r"^sudo: ", re.I)
_SUDO_HINTS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"password is required|terminal is required|askpass", re.I), "nopasswd"),
    (re.compile(r"not permitted to use the -C option", re.I), "closefrom"),
    (re.compile(r"not in the sudoers file|not allowed to (execute|run)|may not run", re.I), "rule"),
)


def classify_sudo_refusal(stderr: Iterable[str]) -> tuple[str, str] | None:
    """(sudo's line, what is missing: nopasswd, closefrom, rule or other), or None when sudo
    did not refuse (QEMU itself failed)."""
    for line in stderr:
        if _SUDO_REFUSAL.search(line):
            for pattern, kind in _SUDO_HINTS:
                if pattern.search(line):
                    return line, kind
            return line, "other"
    return None


def sudoers_lines(user: str, qemu: str, kill: str | None = None) -> str:
    """The sudoers lines a daemon running as `user` needs (`kill`: for the SIGKILL fallback)."""
    commands = qemu if kill is None else f"{qemu}, {kill}"
    return f"`{user} ALL=(root) NOPASSWD: {commands}` and `Defaults!{qemu} closefrom_override`"


def daemon_user() -> str:
    """The name sudoers rules must give (the daemon's effective user)."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"#{os.geteuid()}"
