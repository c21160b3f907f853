"""What the List RPC says about one computation, built from plain values (the service reads
them off each Machine; the wire format is docs/contracts.md, "List, Logs, TTL")."""

from __future__ import annotations

import os

from cocos_manager.proto import manager_pb2 as pb

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _boot_time() -> float:
    with open("/proc/stat", "rb") as stat:
        for line in stat:
            if line.startswith(b"btime "):
                return float(line.split()[1])
    raise OSError("no btime in /proc/stat")


def started_at_from_ticks(start_ticks: int) -> float | None:
    """Wall-clock start (seconds since the epoch) of a process from its /proc start time in
    clock ticks since boot (VmRecord.start_time): when an adopted VM's QEMU really started.
    None when unknown. Precise to the second (btime is whole seconds)."""
    if start_ticks <= 0:
        return None
    try:
        return _boot_time() + start_ticks / CLOCK_TICKS
    except OSError:
        return None


def computation_info(
    computation_id: str,
    *,
    state: str,
    host_port: int,
    guest_cid: int,
    vnc_display: int,
    pid: int | None,
    started_at: float | None,
    expires_at: float | None,
    adopted: bool,
) -> pb.ComputationInfo:
    """Times are wall-clock seconds since the epoch; None leaves the field unset (for
    expires_at: no TTL). pid None or 0: QEMU not spawned yet."""
    info = pb.ComputationInfo(
        computation_id=computation_id,
        state=state,
        agent_port=str(host_port),
        guest_cid=guest_cid,
        vnc_display=vnc_display,
        pid=pid or 0,
        adopted=adopted,
    )
    if started_at is not None:
        info.started_at.FromNanoseconds(int(started_at * 1e9))
    if expires_at is not None:
        info.expires_at.FromNanoseconds(int(expires_at * 1e9))
    return info
