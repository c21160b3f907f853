"""Soak test: many Run/Stop cycles against the real daemon, then a count of what leaked.

    python scripts/soak.py [--cycles 1000] [--workers 4] [--subscribers 3] [--warmup 50]
    make soak [SOAK_CYCLES=1000]

The daemon runs as a subprocess (`cocos-manager`, configured from the environment as in
production) with the stand-in QEMU, over loopback gRPC. Workers run Run -> read the manifest
from the forwarded port -> Stop cycles concurrently while Events subscribers read everything.
After a warm-up the daemon's RSS and descriptors are sampled with no VM running; after the last
cycle again, in the same state. Then it reports, as a table and as one JSON line:

  zombies        children of the daemon that are zombies, and stand-in QEMUs still running
  leaked files   entries left in MANAGER_QEMU_TMP_FILE_LOC
  descriptors    growth of /proc/<daemon>/fd between the two samples
  ports          ports of the host-forward range and VNC displays still bound by anyone, and
                 listening sockets of the daemon other than its own gRPC port
  CIDs           how far a fresh Run's guest CID is above MANAGER_QEMU_VSOCK_GUEST_CID (a CID
                 still held pushes it up); the same for its port and VNC display
  RSS growth     percent between the two samples

Exit status 0 only if every leak figure is 0, RSS grew less than 10 %, no cycle failed, no
subscriber missed an event, and the daemon exited 0 on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for tests.support (the stand-in QEMU and request builder)

from cocos_manager.proto import manager_pb2 as pb  # noqa: E402
from cocos_manager.proto import manager_pb2_grpc as pb_grpc  # noqa: E402
from cocos_manager.vm.resources import VNC_BASE_PORT, tcp_port_is_free  # noqa: E402
from tests.support.daemon_process import Daemon  # noqa: E402
from tests.support.harness import FAKE_QEMU, base_env, run_request  # noqa: E402

RPC_TIMEOUT = 30.0
RSS_LIMIT_PCT = 10.0
BASE_CID = 3


def free_run(first: int, last: int, count: int) -> int:
    """The start of `count` consecutive TCP ports in first..last that nobody holds now."""
    for _ in range(500):
        start = random.randint(first, last - count)
        if all(tcp_port_is_free(port) for port in range(start, start + count)):
            return start
    raise SystemExit(f"no {count} free consecutive ports in {first}-{last}")


def listing(directory: Path) -> list[str]:
    return sorted(os.listdir(directory)) if directory.is_dir() else []


def stray_processes(tmp: Path) -> list[int]:
    """Any process on the host still running the stand-in for this soak's directory."""
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = process.info.get("cmdline") or []
        if any(str(FAKE_QEMU) in part for part in cmdline) and any(
            str(tmp) in part for part in cmdline
        ):
            found.append(process.info["pid"])
    return found


# -- the load -----------------------------------------------------------------------------------


@dataclass
class Subscriber:
    """One Events stream: what it saw of each computation."""

    call: Any
    messages: int = 0
    provisioned: dict[str, dict[str, Any]] = field(default_factory=dict)
    stopped: set[str] = field(default_factory=set)
    error: str = ""
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def saw_stops(self, wanted: set[str]) -> None:
        while not wanted <= self.stopped:
            self.changed.clear()
            await self.changed.wait()

    async def read(self) -> None:
        try:
            async for message in self.call:
                self.messages += 1
                if not message.HasField("agent_event"):
                    continue
                event = message.agent_event
                if event.event_type == "vm-provision" and event.status == "complete":
                    self.provisioned[event.computation_id] = json.loads(event.details or b"{}")
                elif event.event_type == "vm-stop" and event.status == "complete":
                    self.stopped.add(event.computation_id)
                    self.changed.set()
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.CANCELLED:
                self.error = f"{error.code().name}: {error.details()}"


@dataclass
class Load:
    stub: Any
    run_seconds: list[float] = field(default_factory=list)
    stop_seconds: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    done: int = 0

    async def cycle(self, computation_id: str) -> None:
        try:
            started = time.monotonic()
            response = await self.stub.Run(run_request(computation_id), timeout=RPC_TIMEOUT)
            self.run_seconds.append(time.monotonic() - started)
            reader, writer = await asyncio.open_connection("127.0.0.1", int(response.agent_port))
            manifest = json.loads(await asyncio.wait_for(reader.read(), RPC_TIMEOUT))
            writer.close()
            await writer.wait_closed()
            if manifest.get("id") != computation_id:
                self.failures.append(f"{computation_id}: the agent port served {manifest!r}")
            started = time.monotonic()
            await self.stub.Stop(pb.StopRequest(computation_id=computation_id), timeout=RPC_TIMEOUT)
            self.stop_seconds.append(time.monotonic() - started)
        except (grpc.aio.AioRpcError, OSError, ValueError, TimeoutError) as error:
            self.failures.append(f"{computation_id}: {type(error).__name__}: {error}")
        self.done += 1

    async def run(self, ids: list[str], workers: int, progress: Any = None) -> None:
        queue = iter(ids)

        async def worker() -> None:
            for computation_id in queue:  # one iterator shared: each id is taken once
                await self.cycle(computation_id)
                if progress is not None:
                    progress(self.done)

        await asyncio.gather(*(worker() for _ in range(workers)))


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100)[int(q * 100) - 1]


async def settled_sample(daemon: Daemon) -> dict[str, int]:
    """RSS and descriptors with no VM running, after in-flight work has drained."""
    await asyncio.sleep(1.0)
    fds, rss = [], []
    for _ in range(5):
        fds.append(daemon.fds())
        rss.append(daemon.rss())
        await asyncio.sleep(0.2)
    return {"fds": min(fds), "rss": int(statistics.median(rss))}


# -- the soak -----------------------------------------------------------------------------------


async def soak(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    fwd_first = free_run(20000, 32000, 64)
    vnc_base = free_run(VNC_BASE_PORT + 100, VNC_BASE_PORT + 3000, 16) - VNC_BASE_PORT
    env = base_env(tmp)
    env.update(
        {
            "MANAGER_QEMU_HOST_FWD_RANGE": f"{fwd_first}-{fwd_first + 63}",
            "MANAGER_QEMU_VSOCK_VNC": str(vnc_base),
            "MANAGER_QEMU_VSOCK_GUEST_CID": str(BASE_CID),
            "MANAGER_LOG_LEVEL": args.log_level,
        }
    )
    tmp_file_loc = Path(env["MANAGER_QEMU_TMP_FILE_LOC"])
    state_dir = Path(env["MANAGER_STATE_DIR"])

    wall = time.monotonic()
    daemon = Daemon(env=env, log=tmp / "daemon.log")
    returncode: int | None = None
    try:
        await daemon.start()
        address = daemon.address
        channels = [grpc.aio.insecure_channel(address) for _ in range(args.subscribers + 1)]
        stub = pb_grpc.ManagerServiceStub(channels[0])
        subscribers = [
            Subscriber(pb_grpc.ManagerServiceStub(channel).Events(pb.EventsRequest()))
            for channel in channels[1:]
        ]
        readers = [asyncio.ensure_future(s.read()) for s in subscribers]
        load = Load(stub)

        warmup = min(args.warmup, args.cycles)
        await load.run([f"warmup-{i}" for i in range(warmup)], args.workers)
        baseline = await settled_sample(daemon)
        listening_before = daemon.listening_ports()

        measured = [f"soak-{i}" for i in range(args.cycles - warmup)]
        started = time.monotonic()

        def progress(done: int) -> None:
            if args.progress and done % args.progress == 0:
                rate = (done - warmup) / max(time.monotonic() - started, 1e-9)
                print(
                    f"  {done:>6} cycles  {rate:6.1f}/s  rss {daemon.rss() / 2**20:6.1f} MiB"
                    f"  fds {daemon.fds()}",
                    flush=True,
                )

        await load.run(measured, args.workers, progress)
        measured_seconds = time.monotonic() - started

        # A fresh Run with nothing else running gets the lowest numbers of every pool, unless
        # something is still held.
        final_id = "soak-final"
        await load.cycle(final_id)
        end = await settled_sample(daemon)

        wanted = {*measured, final_id}
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(s.saw_stops(wanted) for s in subscribers)), 10)
        events_lost = sum(len(wanted - s.stopped) for s in subscribers)
        final = next(
            (s.provisioned[final_id] for s in subscribers if final_id in s.provisioned), {}
        )

        zombies, live = daemon.zombies_and_live()
        files_left = listing(tmp_file_loc)
        held_ports = [p for p in range(fwd_first, fwd_first + 64) if not tcp_port_is_free(p)]
        held_vnc = [
            d for d in range(vnc_base, vnc_base + 16) if not tcp_port_is_free(VNC_BASE_PORT + d)
        ]
        listening_after = daemon.listening_ports()
        extra_listening = [p for p in listening_after if p != daemon.port]
        used: dict[str, set[int]] = {"cids": set(), "ports": set(), "displays": set()}
        for s in subscribers:
            for details in s.provisioned.values():
                used["cids"].add(details.get("guest_cid", -1))
                used["ports"].add(details.get("agent_port", -1))
                used["displays"].add(details.get("vnc_display", -1))

        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        for channel in channels:
            await channel.close()
    finally:
        if daemon.process is not None:
            returncode = await daemon.terminate(60)
    strays = stray_processes(tmp)

    # A fw_cfg VM (the stand-in's channel here) reports no CID: only a missing final Run fails.
    cid_offset = (final.get("guest_cid", BASE_CID) if final else BASE_CID + 10**6) - BASE_CID
    port_offset = final.get("agent_port", fwd_first + 10**6) - fwd_first
    display_offset = final.get("vnc_display", vnc_base + 10**6) - vnc_base
    rss_growth = 100.0 * (end["rss"] - baseline["rss"]) / baseline["rss"]
    state_files = listing(state_dir)
    return {
        "cycles": args.cycles + 1,
        "workers": args.workers,
        "subscribers": args.subscribers,
        "wall_seconds": round(time.monotonic() - wall, 1),
        "measured_cycles_per_second": round(len(measured) / measured_seconds, 1)
        if measured
        else None,
        "run_p50_ms": round(1000 * quantile(load.run_seconds, 0.5), 1),
        "run_p95_ms": round(1000 * quantile(load.run_seconds, 0.95), 1),
        "stop_p50_ms": round(1000 * quantile(load.stop_seconds, 0.5), 1),
        "stop_p95_ms": round(1000 * quantile(load.stop_seconds, 0.95), 1),
        "failed_cycles": len(load.failures),
        "failures": load.failures[:10],
        "events_per_subscriber": [s.messages for s in subscribers],
        "subscriber_errors": [s.error for s in subscribers if s.error],
        "events_lost": events_lost,
        "zombies": zombies,
        "qemu_left_running": live + len(strays),
        "leaked_files": len(files_left),
        "leaked_file_names": files_left[:10],
        "fds_baseline": baseline["fds"],
        "fds_end": end["fds"],
        "fd_growth": end["fds"] - baseline["fds"],
        "ports_held": len(held_ports) + len(held_vnc) + len(extra_listening),
        "ports_detail": {
            "host_fwd_held": held_ports,
            "vnc_displays_held": held_vnc,
            "daemon_listening_before": listening_before,
            "daemon_listening_after": listening_after,
        },
        "cids_held": max(cid_offset, 0),
        "final_run": {
            "guest_cid": final.get("guest_cid"),
            "cid_offset": cid_offset,
            "port_offset": port_offset,
            "display_offset": display_offset,
        },
        "distinct_used": {name: len(values) for name, values in used.items()},
        "rss_baseline_mib": round(baseline["rss"] / 2**20, 1),
        "rss_end_mib": round(end["rss"] / 2**20, 1),
        "rss_growth_pct": round(rss_growth, 2),
        "daemon_exit_code": returncode,
        "state_dir_entries": state_files[:10],
    }


CHECKS: list[tuple[str, str, str]] = [
    # (label, key, limit) -- each must be 0, except RSS growth (< RSS_LIMIT_PCT)
    ("zombies", "zombies", "0"),
    ("QEMU left running", "qemu_left_running", "0"),
    ("leaked files", "leaked_files", "0"),
    ("descriptor growth", "fd_growth", "0"),
    ("ports held", "ports_held", "0"),
    ("CIDs held", "cids_held", "0"),
    ("RSS growth %", "rss_growth_pct", f"< {RSS_LIMIT_PCT:g}"),
    ("failed cycles", "failed_cycles", "0"),
    ("events lost", "events_lost", "0"),
    ("daemon exit code", "daemon_exit_code", "0"),
]


def verdicts(report: dict[str, Any]) -> list[tuple[str, Any, str, bool]]:
    rows = []
    for label, key, limit in CHECKS:
        value = report[key]
        ok = value < RSS_LIMIT_PCT if key == "rss_growth_pct" else value == 0
        if key == "ports_held":
            offsets = report["final_run"]
            ok = ok and offsets["port_offset"] == 0 and offsets["display_offset"] == 0
        rows.append((label, value, limit, ok))
    return rows


def print_table(report: dict[str, Any]) -> bool:
    rows = verdicts(report)
    print()
    print(f"{'figure':<20} {'value':>10}  {'limit':>6}  verdict")
    print(f"{'-' * 20} {'-' * 10}  {'-' * 6}  -------")
    for label, value, limit, ok in rows:
        print(f"{label:<20} {value!s:>10}  {limit:>6}  {'ok' if ok else 'FAIL'}")
    print()
    print(
        f"{report['cycles']} cycles, {report['workers']} workers, {report['subscribers']} "
        f"subscribers in {report['wall_seconds']} s ({report['measured_cycles_per_second']} "
        f"cycles/s measured); Run p50/p95 {report['run_p50_ms']}/{report['run_p95_ms']} ms, "
        f"Stop p50/p95 {report['stop_p50_ms']}/{report['stop_p95_ms']} ms"
    )
    print(
        f"RSS {report['rss_baseline_mib']} -> {report['rss_end_mib']} MiB, descriptors "
        f"{report['fds_baseline']} -> {report['fds_end']}, distinct used {report['distinct_used']}"
    )
    if report["failures"]:
        print("failures:", *report["failures"], sep="\n  ")
    print(json.dumps(report, sort_keys=True))
    return all(ok for *_, ok in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=1000, help="Run/Stop cycles (with warm-up)")
    parser.add_argument("--workers", type=int, default=4, help="concurrent Run/Stop loops")
    parser.add_argument("--subscribers", type=int, default=3, help="concurrent Events streams")
    parser.add_argument("--warmup", type=int, default=50, help="cycles before the baseline")
    parser.add_argument("--progress", type=int, default=100, help="print every N cycles (0: off)")
    parser.add_argument("--log-level", default="warn", help="the daemon's MANAGER_LOG_LEVEL")
    parser.add_argument("--json", type=Path, help="also write the report to this file")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    if args.cycles < 1 or args.workers < 1:
        parser.error("--cycles and --workers must be at least 1")

    tmp = Path(tempfile.mkdtemp(prefix="cocos-soak-"))
    print(f"soak: {args.cycles} cycles, {args.workers} workers, {args.subscribers} subscribers")
    try:
        report = asyncio.run(soak(args, tmp))
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"work directory kept: {tmp}")
    ok = print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
