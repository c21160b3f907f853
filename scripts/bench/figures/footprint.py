"""Figure 6: exec to health SERVING, its CPU time and idle RSS beside a bare grpc.aio health
server; RSS and CPU while supervising many VMs (the stand-in QEMU: TCG guests do not fit)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import psutil

from scripts.bench.baselines import start_bare_health
from scripts.bench.common import MiB, log
from scripts.bench.daemon import BenchDaemon, DaemonConfig
from scripts.bench.report import Figure, summary


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (its children not included)."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


async def fig_footprint(
    work: Path,
    jaeger_port: int,
    fake: DaemonConfig,
    reps: int,
    vms: int,
    figures: list[Figure],
) -> None:
    log(f"footprint: {reps} daemon starts, {reps} x {vms} stand-in VMs")
    startups, rss_idle, bare_startups, bare_rss = [], [], [], []
    cpu, bare_cpu = [], []
    # The same process 1 s past SERVING: work put off until just after SERVING shows here.
    cpu_idle, bare_cpu_idle, rss_serving, bare_rss_serving = [], [], [], []
    for rep in range(reps):
        first_bare = rep % 2 == 0
        for which in ("bare", "daemon") if first_bare else ("daemon", "bare"):
            if which == "bare":
                elapsed, proc = await start_bare_health(work / "bare-health.log")
                bare_cpu.append(cpu_seconds(proc.pid) * 1000)
                bare_rss_serving.append(psutil.Process(proc.pid).memory_info().rss / MiB)
                await asyncio.sleep(1.0)
                bare_cpu_idle.append(cpu_seconds(proc.pid) * 1000)
                bare_rss.append(psutil.Process(proc.pid).memory_info().rss / MiB)
                bare_startups.append(elapsed * 1000)
                proc.terminate()
                await asyncio.to_thread(proc.wait)
            else:
                daemon = BenchDaemon(fake.renamed(f"startup-{rep}"), work, jaeger_port)
                try:
                    elapsed = await daemon.start_serving(subscribe=False)
                    cpu.append(cpu_seconds(daemon.pid) * 1000)
                    rss_serving.append(daemon.rss() / MiB)
                    await asyncio.sleep(1.0)
                    cpu_idle.append(cpu_seconds(daemon.pid) * 1000)
                    rss_idle.append(daemon.rss() / MiB)
                    startups.append(elapsed * 1000)
                finally:
                    await daemon.close()
    figures.append(
        Figure(
            key="footprint.startup",
            label="exec to health SERVING",
            unit="ms",
            values=startups,
            baseline=bare_startups,
            baseline_label="bare grpc.aio health server (python -c)",
            target=("ratio", "<=", 2.0),
        )
    )
    figures.append(
        Figure(
            key="footprint.startup_cpu",
            label="CPU time of the start-up (user+sys)",
            unit="ms",
            values=cpu,
            baseline=bare_cpu,
            baseline_label="bare grpc.aio health server (python -c)",
            target=("ratio", "<=", 2.0),
            note="what the wall time above costs with the machine to itself: less sensitive "
            "to the host's other load than the wall time",
            extra={
                "cpu_1s_after_serving_ms": summary(cpu_idle, 1),
                "baseline_cpu_1s_after_serving_ms": summary(bare_cpu_idle, 1),
            },
        )
    )
    figures.append(
        Figure(
            key="footprint.rss_idle",
            label="daemon RSS, idle",
            unit="MiB",
            values=rss_idle,
            baseline=bare_rss,
            baseline_label="bare grpc.aio health server",
            target=("ratio", "<=", 1.25),
            note="1 s after SERVING",
            extra={
                "rss_at_serving_mib": summary(rss_serving, 1),
                "baseline_rss_at_serving_mib": summary(bare_rss_serving, 1),
            },
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
