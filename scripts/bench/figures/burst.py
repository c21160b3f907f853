"""Figure 3: N concurrent Runs (32; 8 with --quick) beside the same N QEMU command lines (read
from /proc of the daemon's QEMUs) started at once by a client, one thread each, waiting for
the same readiness. Every Run must succeed with distinct ports, CIDs and VNC displays."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import statistics
import time
from typing import Any

import psutil

from scripts.bench.baselines import VmFileStash, direct_burst
from scripts.bench.common import log
from scripts.bench.daemon import BenchDaemon
from scripts.bench.report import Figure, ratios, summary

TARGET = 1.3


async def one_run(daemon: BenchDaemon, rep: int) -> float:
    """The median of three Runs alone (each stopped before the next), in seconds."""
    singles = []
    for i in range(3):
        latency, _ = await daemon.run(f"single-{rep}-{i}")
        singles.append(latency)
        await daemon.stop_vm(f"single-{rep}-{i}")
    return statistics.median(singles)


async def daemon_burst(
    daemon: BenchDaemon, rep: int, count: int, stash: VmFileStash
) -> tuple[float, dict[str, Any], list[list[str]]]:
    """Seconds for `count` concurrent Runs; what was checked; the argvs of the QEMUs (their
    per-VM files kept in `stash` before the VMs are stopped)."""
    assert daemon.events is not None
    ids = [f"burst-{rep}-{i}" for i in range(count)]
    completes = {i: daemon.events.expect(i, "vm-provision", "complete") for i in ids}
    started = time.perf_counter()
    results = await asyncio.gather(*(daemon.run(i) for i in ids), return_exceptions=True)
    wall = time.perf_counter() - started
    failures = [repr(r) for r in results if isinstance(r, BaseException)]
    ports = [int(r[1].agent_port) for r in results if not isinstance(r, BaseException)]
    cids, displays = [], []
    for cid in ids:
        with contextlib.suppress(TimeoutError):
            _, message = await asyncio.wait_for(completes[cid], 5)
            detail = json.loads(message.agent_event.details)
            cids.append(detail.get("guest_cid", cid))  # fw_cfg VMs have no CID
            displays.append(detail["vnc_display"])
    argv_ports, argv_displays = set(), set()
    argvs = []
    for child in daemon.children():
        with contextlib.suppress(psutil.Error):
            argvs.append(child.cmdline())
            line = " ".join(argvs[-1])
            if m := re.search(r"hostfwd=tcp::(\d+)-", line):
                argv_ports.add(int(m.group(1)))
            if m := re.search(r"-vnc :(\d+)", line):
                argv_displays.add(int(m.group(1)))
    check = {
        "succeeded": len(ports),
        "failures": failures[:3],
        "distinct_ports": len(set(ports)),
        "distinct_cids": len(set(cids)),
        "distinct_vnc_displays": len(set(displays)),
        "qemu_processes": len(argv_ports),
        "argv_ports_match": argv_ports == set(ports),
        "argv_displays_match": argv_displays == set(displays),
    }
    check["ok"] = (
        len(ports) == count
        and check["distinct_ports"] == count
        and check["distinct_cids"] == count
        and check["distinct_vnc_displays"] == count
        and check["argv_ports_match"]
        and check["argv_displays_match"]
    )
    stash.keep()
    await asyncio.gather(*(daemon.stop_vm(i) for i in ids), return_exceptions=True)
    return wall, check, argvs


async def fig_burst(daemon: BenchDaemon, reps: int, count: int, figures: list[Figure]) -> None:
    log(f"burst: {reps} x {count} concurrent Runs beside the same argvs started at once")
    walls, directs, serials = [], [], []
    checks: list[dict[str, Any]] = []
    stash = VmFileStash(daemon.tmp, daemon.root / "stash-burst")
    argvs: list[list[str]] = []
    for rep in range(reps):
        one = await one_run(daemon, rep)
        # Which goes first alternates (the host's other load drifts); the client's argvs are
        # those of the daemon's previous burst, stopped by now, with their files restored.
        direct_first = rep % 2 == 1 and bool(argvs)
        if direct_first:
            directs.append(await direct_burst(daemon, argvs, stash) * 1000)
        wall, check, argvs = await daemon_burst(daemon, rep, count, stash)
        checks.append(check)
        if not direct_first:
            directs.append(await direct_burst(daemon, argvs, stash) * 1000)
        walls.append(wall * 1000)
        serials.append(one * count * 1000)
    shutil.rmtree(stash.stash, ignore_errors=True)
    figures.append(
        Figure(
            key="burst",
            label=f"{count} concurrent Runs, wall time (real QEMU)",
            unit="ms",
            values=walls,
            baseline=directs,
            baseline_label=f"the same {count} QEMU argvs started at once by a client",
            ratios=ratios(walls, directs),
            target=("ratio", "<=", TARGET),
            passed_override=all(c["ok"] for c in checks),
            note="baseline: the daemon's own argvs (from /proc), the same per-VM files at the "
            "same paths, one client thread each, the same QMP readiness. Pass also needs every "
            "Run to succeed with distinct ports, CIDs and VNC displays (checked in RunResponse, "
            "the vm-provision events and the QEMU argv)",
            extra={
                "vms": count,
                "checks": checks,
                "serial_runs_ms": summary(serials),
                "ratio_to_serial_runs": summary(ratios(walls, serials)),
            },
        )
    )
