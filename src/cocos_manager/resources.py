"""Per-VM numbers that must never be shared by two live VMs: host port, guest CID, VNC display.

Allocation is synchronous, so on the event loop a take() can never interleave with another
(the original bound port 0 and closed it, and two concurrent Runs could get the same port:
SPEC defect 3). A number is probed (can it be bound now?) before it is handed out, and held
until released; a process outside the daemon can still win a port in the gap before QEMU
binds it, which the launcher detects and retries.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable, Iterable

from cocos_manager.errors import ResourceExhaustedError
from cocos_manager.settings import PortRange

VNC_BASE_PORT = 5900


def tcp_port_is_free(port: int) -> bool:
    """As QEMU will bind it: all IPv4 interfaces, SO_REUSEADDR (as slirp and VNC do)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))
        except OSError as error:
            if error.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


class Pool:
    """Numbers held by live VMs; subclasses decide which free number to hand out next."""

    name = "number"

    def __init__(self) -> None:
        self._held: set[int] = set()

    @property
    def held(self) -> frozenset[int]:
        return frozenset(self._held)

    def take(self, avoid: Iterable[int] = ()) -> int:
        number = self._pick(self._held | set(avoid))
        self._held.add(number)
        return number

    def _pick(self, skip: set[int]) -> int:
        raise NotImplementedError

    def hold(self, number: int) -> None:
        """Marks a number taken outside take(): a VM re-adopted after a restart."""
        self._held.add(number)

    def release(self, number: int) -> None:
        self._held.discard(number)


class NumberPool(Pool):
    """The lowest free number of first..last not held here and not refused by `probe`."""

    def __init__(
        self, name: str, first: int, last: int, probe: Callable[[int], bool] | None = None
    ) -> None:
        super().__init__()
        self.name = name
        self.first, self.last = first, last
        self._probe = probe

    def _pick(self, skip: set[int]) -> int:
        for number in range(self.first, self.last + 1):
            if number not in skip and (self._probe is None or self._probe(number)):
                return number
        raise ResourceExhaustedError(f"no free {self.name} in {self.first}-{self.last}")


class EphemeralPortPool(Pool):
    """Any free port the kernel picks, never one already held by a live VM."""

    name = "host port"
    _ATTEMPTS = 64

    def _pick(self, skip: set[int]) -> int:
        for _ in range(self._ATTEMPTS):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.bind(("", 0))
                port = int(probe.getsockname()[1])
            if port not in skip:
                return port
        raise ResourceExhaustedError("no free host port found")


def host_port_pool(port_range: PortRange | None) -> Pool:
    if port_range is None:
        return EphemeralPortPool()
    return NumberPool(
        "host port (MANAGER_QEMU_HOST_FWD_RANGE)",
        port_range.first,
        port_range.last,
        tcp_port_is_free,
    )


def guest_cid_pool(first: int) -> NumberPool:
    return NumberPool("guest CID", first, 0xFFFFFFFE)


def vnc_display_pool(first: int) -> NumberPool:
    return NumberPool(
        "VNC display",
        first,
        65535 - VNC_BASE_PORT,
        lambda display: tcp_port_is_free(VNC_BASE_PORT + display),
    )
