"""`python -m scripts.bench [--quick] [--only ...] [--reps N]`: the plan, run in order, then the
table and the JSON document."""

from __future__ import annotations

import argparse
import asyncio
import compileall
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import scripts.bench as package
from scripts.bench.common import FAKE_QEMU, OUT_DIR, REPO, log, machine_info, prepare_images
from scripts.bench.daemon import BenchDaemon, DaemonConfig
from scripts.bench.figures.burst import fig_burst
from scripts.bench.figures.crash import fig_crash
from scripts.bench.figures.events import fig_events
from scripts.bench.figures.fleet import fig_fleet
from scripts.bench.figures.footprint import fig_footprint
from scripts.bench.figures.records import fig_records
from scripts.bench.figures.run import fig_image_size, fig_run_overhead
from scripts.bench.report import Figure, table
from tests.support.daemon_process import free_port

FIGURES = ("run", "image", "burst", "events", "crash", "footprint", "records", "fleet")


@dataclass(frozen=True)
class Plan:
    reps: int
    per_rep: int
    burst: int
    supervise: int
    events: int
    latency_events: int
    latency_rate: float
    fleet: int
    quick: bool = False


FULL = Plan(
    reps=5,
    per_rep=20,
    burst=32,
    supervise=50,
    events=20000,
    latency_events=2000,
    latency_rate=1000,
    fleet=200,
)
QUICK = Plan(
    reps=1,
    per_rep=4,
    burst=8,
    supervise=10,
    events=3000,
    latency_events=500,
    latency_rate=1000,
    fleet=20,
    quick=True,
)


async def run_figures(
    plan: Plan, wanted: set[str], work: Path
) -> tuple[list[Figure], dict[str, Any]]:
    images = prepare_images(OUT_DIR / "images")
    jaeger_port = free_port()  # nothing listens there: a collector that is down
    real = str(shutil.which("qemu-system-x86_64") or "qemu-system-x86_64")
    small_cfg = DaemonConfig("real-small", real, images.kernel, images.small_rootfs, vnc_span=80)
    big_cfg = DaemonConfig("real-big", real, images.kernel, images.big_rootfs)
    fake_cfg = DaemonConfig("fake", str(FAKE_QEMU), images.kernel, images.small_rootfs, vnc_span=80)
    figures: list[Figure] = []
    details: dict[str, Any] = {}
    daemons: list[BenchDaemon] = []
    try:
        if wanted & {"run", "image", "burst", "crash"}:
            small = BenchDaemon(small_cfg, work, jaeger_port)
            daemons.append(small)
            big = BenchDaemon(big_cfg, work, jaeger_port)
            if "image" in wanted:
                daemons.append(big)
            flat: BenchDaemon | None = None
            if "burst" in wanted:  # the burst without the daemon's scheduling weight, beside
                flat_cfg = small_cfg.renamed("real-flat")
                flat_cfg.extra = {"MANAGER_AUTOGROUP_NICE": "0"}
                flat = BenchDaemon(flat_cfg, work, jaeger_port)
                daemons.append(flat)
            await asyncio.gather(*(d.start_serving() for d in daemons))
            await asyncio.gather(*(d.warm_up() for d in daemons))
            if "run" in wanted:
                await fig_run_overhead(small, plan.reps, plan.per_rep, figures, details)
            if "image" in wanted:
                await fig_image_size(small, big, images, plan.reps, plan.per_rep, figures)
            if "crash" in wanted:
                await fig_crash(small, plan.reps, figures)
            if "burst" in wanted:
                await fig_burst(small, plan.reps, plan.burst, figures, flat)
            await asyncio.gather(*(d.close() for d in daemons))
            daemons.clear()
        if "events" in wanted:
            events_daemon = BenchDaemon(fake_cfg.renamed("events"), work, jaeger_port)
            events_env = events_daemon.full_env() | {"MANAGER_GRPC_PORT": "0"}
            await fig_events(
                work,
                events_env,
                plan.reps,
                plan.events,
                plan.latency_events,
                plan.latency_rate,
                figures,
            )
        if "footprint" in wanted:
            await fig_footprint(work, jaeger_port, fake_cfg, plan.reps, plan.supervise, figures)
        if "records" in wanted:
            per_rep = max(2, plan.per_rep // 2)
            await fig_records(small_cfg, work, jaeger_port, plan.reps, per_rep, figures)
        if "fleet" in wanted:
            await fig_fleet(work, jaeger_port, fake_cfg, plan.reps, plan.fleet, figures)
    finally:
        await asyncio.gather(*(d.close() for d in daemons), return_exceptions=True)
    return figures, details


async def bench(plan: Plan, output: Path, wanted: set[str]) -> dict[str, Any]:
    started = time.perf_counter()
    load_before = os.getloadavg()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=OUT_DIR))
    # The daemon's own bytecode, as an installed package has it (pip compiles at install): an
    # editable checkout run with PYTHONDONTWRITEBYTECODE=1 would otherwise compile its ~75
    # modules from source at every start (about 70 ms of CPU), which the baselines, whose
    # libraries are all compiled, never pay.
    compileall.compile_dir(REPO / "src" / "cocos_manager", quiet=1)
    try:
        figures, details = await run_figures(plan, wanted, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    doc = {
        "schema": "cocos-manager-bench/1",
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "quick": plan.quick,
        "repetitions": plan.reps,
        "machine": machine_info(),
        # Other jobs on the host slow QEMU and the daemon alike; ratios hold up better.
        "load_average": {
            "before": [round(x, 2) for x in load_before],
            "after": [round(x, 2) for x in os.getloadavg()],
        },
        "qemu_config": "qemu-system-x86_64 under TCG (ENABLE_KVM=false, no SEV), CPU=max, "
        "SMP_COUNT=1, MEMORY_SIZE=1024M, OVMF (Debian), AGENT_CHANNEL=fw_cfg, the test guest of "
        "build/guest; other settings at their defaults",
        "figures": {f.key: f.as_json() for f in figures},
        "all_pass": all(f.passed() is not False for f in figures),
        "failed": [f.key for f in figures if f.passed() is False],
        "details": details,
        "duration_s": round(time.perf_counter() - started, 1),
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(doc, indent=2) + "\n")  # noqa: ASYNC240
    print(table(figures))
    print()
    print(json.dumps(doc, indent=2))
    log(f"wrote {output} in {doc['duration_s']} s")
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] in (["events-server"], ["agent-feeder"]):
        from scripts.bench.events_server import agent_feeder, events_server

        if args[0] == "events-server":
            asyncio.run(events_server(args[1]))
        else:
            agent_feeder(int(args[1]))
        return 0
    parser = argparse.ArgumentParser(
        prog="python -m scripts.bench", description=(package.__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="one repetition, fewer VMs (CI smoke)")
    parser.add_argument("--output", type=Path, default=OUT_DIR / "latest.json")
    parser.add_argument(
        "--strict", action="store_true", help="exit with status 1 when a figure misses its target"
    )
    parser.add_argument("--only", default="", help="comma-separated subset of " + ",".join(FIGURES))
    parser.add_argument("--reps", type=int, default=0, help="repetitions (default: 5, 1 if quick)")
    options = parser.parse_args(args)
    wanted = {x for x in options.only.split(",") if x} or set(FIGURES)
    if unknown := wanted - set(FIGURES):
        parser.error(f"--only: unknown figure(s) {', '.join(sorted(unknown))}")
    plan = QUICK if options.quick else FULL
    if options.reps > 0:
        plan = dataclasses.replace(plan, reps=options.reps)
    doc = asyncio.run(bench(plan, options.output, wanted))
    if not doc["figures"]:
        return 1
    return 1 if options.strict and doc["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
