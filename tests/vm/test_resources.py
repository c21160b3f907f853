"""Per-VM numbers: never shared by two live VMs, lowest free first, probed before handed out."""

from __future__ import annotations

import socket

import pytest

from cocos_manager.config.go_parse import PortRange
from cocos_manager.errors import ResourceExhaustedError
from cocos_manager.vm.resources import (
    EphemeralPortPool,
    NumberPool,
    guest_cid_pool,
    host_port_pool,
    tcp_port_is_free,
)


def test_lowest_free_number_and_release() -> None:
    pool = guest_cid_pool(3)
    assert [pool.take() for _ in range(3)] == [3, 4, 5]
    pool.release(4)
    assert pool.take() == 4
    pool.hold(6)
    assert pool.take() == 7
    assert pool.held == {3, 4, 5, 6, 7}


def test_avoid_and_probe() -> None:
    pool = NumberPool("display", 0, 5, probe=lambda n: n != 1)
    assert pool.take(avoid={0}) == 2
    assert pool.take() == 0


def test_exhausted_range_names_itself() -> None:
    pool = NumberPool("widget", 1, 2)
    pool.take()
    pool.take()
    with pytest.raises(ResourceExhaustedError, match="no free widget in 1-2"):
        pool.take()


def test_range_skips_ports_bound_by_others() -> None:
    with socket.socket() as squatter:
        squatter.bind(("", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        assert not tcp_port_is_free(taken)
        pool = host_port_pool(PortRange(taken, taken + 50))
        assert pool.take() != taken


def test_ephemeral_ports_are_never_handed_out_twice() -> None:
    pool = host_port_pool(None)
    assert isinstance(pool, EphemeralPortPool)
    ports = [pool.take() for _ in range(50)]
    assert len(set(ports)) == 50
    assert all(tcp_port_is_free(p) for p in ports)
