"""Figure 6: exec to health SERVING, its CPU time and idle RSS beside a bare grpc.aio health
server; RSS and CPU while supervising many VMs (the stand-in QEMU: TCG guests do not fit)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from scripts.bench.baselines import CARD_LIBRARIES, start_bare_health
from scripts.bench.common import MiB, log
from scripts.bench.daemon import BenchDaemon, DaemonConfig
from scripts.bench.report import Figure, ratios, summary


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (its children not included)."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


@dataclass
class Start:
    """One kind of server's start-ups: at SERVING, and the same process 1 s later (work put
    off until just after SERVING shows there)."""

    startup: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    rss_serving: list[float] = field(default_factory=list)
    cpu_idle: list[float] = field(default_factory=list)
    rss_idle: list[float] = field(default_factory=list)

    async def measure(self, elapsed: float, pid: int) -> None:
        process = psutil.Process(pid)
        self.cpu.append(cpu_seconds(pid) * 1000)
        self.rss_serving.append(process.memory_info().rss / MiB)
        await asyncio.sleep(1.0)
        self.cpu_idle.append(cpu_seconds(pid) * 1000)
        self.rss_idle.append(process.memory_info().rss / MiB)
        self.startup.append(elapsed * 1000)


def over(values: list[float], floor: list[float]) -> dict[str, Any]:
    """The daemon's figures over the floor's, repetition by repetition."""
    return summary(ratios(values, floor), 2)


async def fig_footprint(
    work: Path,
    jaeger_port: int,
    fake: DaemonConfig,
    reps: int,
    vms: int,
    figures: list[Figure],
) -> None:
    log(f"footprint: {reps} daemon starts, {reps} x {vms} stand-in VMs")
    kinds = ("bare", "floor", "daemon")
    seen = {kind: Start() for kind in kinds}
    for rep in range(reps):
        for kind in kinds[rep % 3 :] + kinds[: rep % 3]:  # each kind first in turn
            if kind == "daemon":
                daemon = BenchDaemon(fake.renamed(f"startup-{rep}"), work, jaeger_port)
                try:
                    elapsed = await daemon.start_serving(subscribe=False)
                    await seen[kind].measure(elapsed, daemon.pid)
                finally:
                    await daemon.close()
            else:
                imports = CARD_LIBRARIES if kind == "floor" else ""
                elapsed, proc = await start_bare_health(
                    work / f"{kind}-health.log", imports=imports
                )
                try:
                    await seen[kind].measure(elapsed, proc.pid)
                finally:
                    proc.terminate()
                    await asyncio.to_thread(proc.wait)
    daemon_seen, bare, floor = seen["daemon"], seen["bare"], seen["floor"]
    bare_label = "bare grpc.aio health server (python -c)"
    floor_label = "the bare server after importing pydantic-settings, structlog, OTel SDK"
    figures.append(
        Figure(
            key="footprint.startup",
            label="exec to health SERVING",
            unit="ms",
            values=daemon_seen.startup,
            baseline=bare.startup,
            baseline_label=bare_label,
            target=("ratio", "<=", 2.0),
            extra={"over_floor": over(daemon_seen.startup, floor.startup)},
        )
    )
    figures.append(
        Figure(
            key="footprint.startup_cpu",
            label="CPU time of the start-up (user+sys)",
            unit="ms",
            values=daemon_seen.cpu,
            baseline=bare.cpu,
            baseline_label=bare_label,
            target=("ratio", "<=", 2.0),
            note="what the wall time above costs with the machine to itself: less sensitive "
            "to the host's other load than the wall time",
            extra={
                "cpu_1s_after_serving_ms": summary(daemon_seen.cpu_idle, 1),
                "baseline_cpu_1s_after_serving_ms": summary(bare.cpu_idle, 1),
                "over_floor": over(daemon_seen.cpu, floor.cpu),
            },
        )
    )
    figures.append(
        Figure(
            key="footprint.rss_idle",
            label="daemon RSS, idle",
            unit="MiB",
            values=daemon_seen.rss_idle,
            baseline=bare.rss_idle,
            baseline_label="bare grpc.aio health server",
            target=("ratio", "<=", 1.25),
            note="1 s after SERVING",
            extra={
                "rss_at_serving_mib": summary(daemon_seen.rss_serving, 1),
                "baseline_rss_at_serving_mib": summary(bare.rss_serving, 1),
                "over_floor": over(daemon_seen.rss_idle, floor.rss_idle),
            },
        )
    )
    floor_note = (
        "no target: what the card's libraries alone cost the bare server, a floor under the "
        "start-up targets above; the daemon's own ratio to this floor is `over_floor` there"
    )
    for key, label, unit, attribute in (
        ("startup", "exec to health SERVING", "ms", "startup"),
        ("startup_cpu", "CPU time of the start-up", "ms", "cpu"),
        ("rss_idle", "RSS, idle", "MiB", "rss_idle"),
    ):
        figures.append(
            Figure(
                key=f"footprint.floor.{key}",
                label=f"floor: {label}, libraries imported",
                unit=unit,
                values=getattr(floor, attribute),
                baseline=getattr(bare, attribute),
                baseline_label=floor_label + " beside the bare server",
                note=floor_note,
            )
        )

    daemon = BenchDaemon(fake.renamed("fifty"), work, jaeger_port)
    busy, idle_before, cpu, per_vm = [], [], [], []
    try:
        await daemon.start_serving(subscribe=True)
        await daemon.warm_up()
        await asyncio.sleep(0.5)
        process = psutil.Process(daemon.pid)
        for rep in range(reps):
            idle_before.append(daemon.rss() / MiB)
            ids = [f"fifty-{rep}-{i}" for i in range(vms)]
            results = await asyncio.gather(*(daemon.run(i) for i in ids), return_exceptions=True)
            bad = [r for r in results if isinstance(r, BaseException)]
            if bad:
                raise RuntimeError(f"{len(bad)} of {vms} stand-in Runs failed: {bad[0]!r}")
            await asyncio.sleep(0.5)
            before = process.cpu_times()
            await asyncio.sleep(2.0)
            after = process.cpu_times()
            used = after.user + after.system - before.user - before.system
            cpu.append(max(0.0, used / 2.0 * 100))
            busy.append(daemon.rss() / MiB)
            per_vm.append((busy[-1] - idle_before[-1]) * 1024 / vms)
            await asyncio.gather(*(daemon.stop_vm(i) for i in ids))
    finally:
        await daemon.close()
    figures.append(
        Figure(
            key="footprint.rss_supervising",
            label=f"daemon RSS supervising {vms} VMs (stand-in QEMU)",
            unit="MiB",
            values=busy,
            baseline=idle_before,
            baseline_label="the same daemon idle, just before",
            note="stand-in QEMU (tests/support/fake_qemu.py); informational, no target",
            extra={"per_vm_kib": summary(per_vm, 1), "vms": vms},
        )
    )
    figures.append(
        Figure(
            key="footprint.cpu_supervising",
            label=f"daemon CPU supervising {vms} idle VMs",
            unit="%",
            values=cpu,
            note="over 2 s with no requests; exits are watched by pidfd, nothing polls",
        )
    )
