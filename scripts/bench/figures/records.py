"""Figure 7: what a Run pays for records that survive a power cut (fsync of each new version
and of the state directory before the version it replaces goes, docs/decisions.md).

Two daemons of the same settings, real QEMU, Runs alternating between them: one keeps its
records on the disk the bench runs on, the other on tmpfs (/dev/shm), where fsync returns at
once. The difference is what the fsyncs cost a Run (no Run waits for them: they run in a
thread and contend only for the disk and the CPUs). Beside it in the JSON: one save awaited
until durable, by the daemon's StateStore in this process, on the disk and on tmpfs.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from cocos_manager.host.state_store import StateStore, VmRecord
from scripts.bench.common import log
from scripts.bench.daemon import BenchDaemon, DaemonConfig
from scripts.bench.report import Figure, summary


async def fig_records(
    config: DaemonConfig,
    work: Path,
    jaeger_port: int,
    reps: int,
    per_rep: int,
    figures: list[Figure],
) -> None:
    log(f"records: {reps} x {per_rep} Runs with the state directory on disk and on tmpfs")
    tmpfs = Path(tempfile.mkdtemp(prefix="cocos-bench-state-", dir="/dev/shm"))
    disk_cfg = config.renamed("records-disk")
    shm_cfg = config.renamed("records-tmpfs")
    shm_cfg.extra = {**config.extra, "MANAGER_STATE_DIR": str(tmpfs)}
    disk, shm = BenchDaemon(disk_cfg, work, jaeger_port), BenchDaemon(shm_cfg, work, jaeger_port)
    values: list[float] = []
    bases: list[float] = []
    try:
        for daemon in (disk, shm):
            await daemon.start_serving()
            await daemon.warm_up()
        for rep in range(reps):
            on_disk, on_tmpfs = [], []
            for i in range(per_rep):
                order = [(disk, on_disk), (shm, on_tmpfs)]
                if i % 2:
                    order.reverse()
                for daemon, into in order:
                    cid = f"rec-{rep}-{i}"
                    latency, _ = await daemon.run(cid)
                    into.append(latency * 1000)
                    await daemon.stop_vm(cid)
            values.append(statistics.median(on_disk))
            bases.append(statistics.median(on_tmpfs))
    finally:
        for daemon in (disk, shm):
            await daemon.close()
        shutil.rmtree(tmpfs, ignore_errors=True)
    waits = {
        where: summary(await durable_waits(Path(tempfile.mkdtemp(dir=base)), 50))
        for where, base in (("disk", work), ("tmpfs", "/dev/shm"))
    }
    figures.append(
        Figure(
            key="records.durable",
            label="Run latency, records fsynced (state on disk)",
            unit="ms",
            values=values,
            baseline=bases,
            baseline_label="Run latency, same settings, state directory on tmpfs (fsync free)",
            note="informational, no target: what making each record durable costs a Run",
            extra={
                "runs_per_repetition": per_rep,
                "added_ms": summary([v - b for v, b in zip(values, bases, strict=True)]),
                "save_until_durable_ms": waits,
            },
        )
    )


async def durable_waits(directory: Path, count: int) -> list[float]:
    """The daemon's own StateStore, in this process: one new record saved and awaited until
    durable, as a Run's admission is (ms each)."""
    store = StateStore(directory / "state")
    store.open()
    times = []
    try:
        for _ in range(count):
            record = VmRecord("bench", str(uuid.uuid4()), "admitted", 7020, 3, 0)
            started = time.perf_counter()
            store.save(record)
            await store.durable(record.uuid)
            times.append((time.perf_counter() - started) * 1000)
            store.remove(record.uuid)
    finally:
        store.close()
        shutil.rmtree(directory, ignore_errors=True)
    return times
