"""Per-VM resource metrics: CPU time and resident memory of each VM's QEMU, read from /proc.

Read at scrape time by a custom collector rather than kept in labelled gauges: a VM that is
gone simply is not listed any more, so its series disappear with it and no stale label set
lingers. The daemon registers it once:

    collector = register_vm_metrics(service.vm_pids)    # () -> iterable of (id, pid)
    ...
    unregister_vm_metrics(collector)                      # at shutdown

`collect()` runs in prometheus-client's HTTP thread, not on the event loop: the callable
must only take a snapshot (e.g. `tuple(self._machines.values())`, one C-level call under
the GIL) and never wait for the loop.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cocos_manager.telemetry.metrics import METRICS

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

VmPids = Callable[[], Iterable[tuple[str, int]]]


@dataclass(frozen=True, slots=True)
class ProcessUsage:
    cpu_seconds: float  # user + system time
    resident_bytes: int


def process_usage(pid: int) -> ProcessUsage | None:
    """From /proc/PID/stat (utime, stime) and /proc/PID/statm (resident pages); None if the
    process is gone (or a zombie: no memory, and its time is no VM's any more)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # The command name may hold spaces and parentheses: split after the last ')'.
            fields = stat.read().rsplit(b")", 1)[1].split()
        with open(f"/proc/{pid}/statm", "rb") as statm:
            resident_pages = int(statm.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    if fields[0] in (b"Z", b"X"):
        return None
    # fields[0] is field 3 (state): utime and stime are fields 14 and 15.
    utime, stime = int(fields[11]), int(fields[12])
    return ProcessUsage((utime + stime) / CLOCK_TICKS, resident_pages * PAGE_SIZE)


class VmCollector:
    """manager_vm_cpu_seconds_total and manager_vm_resident_memory_bytes per computation.

    A collector as prometheus-client's registry calls it (`describe`, `collect`), loading
    prometheus-client only when it is registered or read (metrics.py)."""

    def __init__(self, vms: VmPids) -> None:
        self._vms = vms

    def describe(self) -> Iterator[Metric]:
        """Names only, so registering does not call `vms` (the service may not be ready)."""
        yield from self._families()

    def _families(self) -> tuple[CounterMetricFamily, GaugeMetricFamily]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        return (
            CounterMetricFamily(
                "manager_vm_cpu_seconds",
                "CPU time (user and system) used by the VM's QEMU process.",
                labels=("computation_id",),
            ),
            GaugeMetricFamily(
                "manager_vm_resident_memory_bytes",
                "Resident memory of the VM's QEMU process.",
                labels=("computation_id",),
            ),
        )

    def collect(self) -> Iterator[Metric]:
        cpu, memory = self._families()
        for computation_id, pid in list(self._vms()):
            if pid <= 0:  # not spawned yet
                continue
            usage = process_usage(pid)
            if usage is None:
                continue
            cpu.add_metric((computation_id,), usage.cpu_seconds)
            memory.add_metric((computation_id,), usage.resident_bytes)
        yield cpu
        yield memory


def register_vm_metrics(vms: VmPids, registry: CollectorRegistry | None = None) -> VmCollector:
    """Adds the per-VM series to the manager's registry (the one /metrics serves)."""
    collector = VmCollector(vms)
    (registry if registry is not None else METRICS.registry).register(collector)
    return collector


def unregister_vm_metrics(
    collector: VmCollector, registry: CollectorRegistry | None = None
) -> None:
    (registry if registry is not None else METRICS.registry).unregister(collector)
