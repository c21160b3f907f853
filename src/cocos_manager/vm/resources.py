"""Per-VM numbers that must never be shared by two live VMs: host port, guest CID, VNC display.

Allocation is synchronous, so on the event loop a take() can never interleave with another
(the original bound port 0 and closed it, and two concurrent Runs could get the same
port). A number is probed (can it be bound now?) before it is handed out, and held
until released; a process outside the daemon can still win a port in the gap before QEMU
binds it, which the launcher detects and retries.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from cocos_manager.config import PortRange, QemuSettings
from cocos_manager.errors import ResourceExhaustedError
from cocos_manager.qemu import Conflict, VmResources

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
        self._shunned: set[int] = set()

    @property
    def held(self) -> frozenset[int]:
        return frozenset(self._held)

    def take(self, avoid: Iterable[int] = ()) -> int:
        number = self._pick(self._held | self._shunned | set(avoid))
        self._held.add(number)
        return number

    def shun(self, number: int) -> None:
        """Never hand this number out again: something outside the daemon holds it and no
        probe can see it (a guest CID of another VMM)."""
        self._shunned.add(number)

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


@dataclass
class Pools:
    """The host-wide numbers of every VM, and which computation speaks from which CID."""

    ports: Pool
    cids: Pool
    displays: Pool
    cid_owner: dict[int, str] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, q: QemuSettings) -> Pools:
        return cls(
            host_port_pool(q.HOST_FWD_RANGE),
            guest_cid_pool(q.VSOCK_GUEST_CID),
            vnc_display_pool(q.VSOCK_VNC),
        )

    def lease(self, computation_id: str, vm_uuid: str) -> Lease:
        """Port, CID and display in one synchronous step: all of them or none."""
        port = self.ports.take()
        try:
            cid = self.cids.take()
            try:
                display = self.displays.take()
            except BaseException:
                self.cids.release(cid)
                raise
        except BaseException:
            self.ports.release(port)
            raise
        return Lease(self, computation_id, VmResources(vm_uuid, port, cid, display))

    def hold(self, computation_id: str, resources: VmResources) -> Lease:
        """The numbers of a VM re-adopted after a restart."""
        self.ports.hold(resources.host_port)
        self.cids.hold(resources.guest_cid)
        self.displays.hold(resources.vnc_display)
        return Lease(self, computation_id, resources)


class Lease:
    """What one VM holds; released once, whichever way the VM ends."""

    def __init__(self, pools: Pools, computation_id: str, resources: VmResources) -> None:
        self._pools = pools
        self.computation_id = computation_id
        self.resources = resources
        self.released = False
        pools.cid_owner[resources.guest_cid] = computation_id

    def swap(self, conflict: Conflict) -> None:
        """Another process took one of our numbers before QEMU bound it: take the next one."""
        r, pools = self.resources, self._pools
        if conflict is Conflict.HOST_PORT:
            pools.ports.release(r.host_port)
            port = pools.ports.take(avoid={r.host_port})
            self.resources = VmResources(r.uuid, port, r.guest_cid, r.vnc_display)
        elif conflict is Conflict.VNC_DISPLAY:
            pools.displays.release(r.vnc_display)
            display = pools.displays.take(avoid={r.vnc_display})
            self.resources = VmResources(r.uuid, r.host_port, r.guest_cid, display)
        else:
            pools.cids.shun(r.guest_cid)
            pools.cids.release(r.guest_cid)
            self._forget_cid()
            cid = pools.cids.take()
            self.resources = VmResources(r.uuid, r.host_port, cid, r.vnc_display)
            pools.cid_owner[cid] = self.computation_id

    def _forget_cid(self) -> None:
        if self._pools.cid_owner.get(self.resources.guest_cid) == self.computation_id:
            del self._pools.cid_owner[self.resources.guest_cid]

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        r = self.resources
        self._pools.ports.release(r.host_port)
        self._pools.cids.release(r.guest_cid)
        self._pools.displays.release(r.vnc_display)
        self._forget_cid()
