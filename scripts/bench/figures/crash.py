"""Figure 5: SIGKILL of a running QEMU to `vm-exit` on Events, beside a parent's waitpid."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time

from scripts.bench.baselines import DirectQemu, VmFileStash, strip_qmp
from scripts.bench.common import log
from scripts.bench.daemon import BenchDaemon
from scripts.bench.report import Figure


async def fig_crash(daemon: BenchDaemon, reps: int, figures: list[Figure]) -> None:
    log(f"crash detection: {reps} x SIGKILL of a running QEMU")
    assert daemon.events is not None
    stash = VmFileStash(daemon.tmp, daemon.root / "stash-crash")
    detect, base = [], []
    for rep in range(reps):
        cid = f"crash-{rep}"
        _, response = await daemon.run(cid)
        qemu = daemon.qemu_for_port(int(response.agent_port))
        argv = qemu.cmdline()
        stash.keep()
        exited = daemon.events.expect(cid, "vm-exit")
        await asyncio.sleep(0.05)
        started = time.perf_counter()
        os.kill(qemu.pid, signal.SIGKILL)
        arrived, _ = await asyncio.wait_for(exited, 10)
        detect.append((arrived - started) * 1000)
        stash.restore()
        direct = DirectQemu(strip_qmp(argv), daemon.root / "direct-qmp.sock")
        try:
            direct.start()
            await asyncio.sleep(0.05)
        finally:
            base.append(direct.kill() * 1000)
            stash.remove_restored()
    shutil.rmtree(stash.stash, ignore_errors=True)
    figures.append(
        Figure(
            key="crash_detection",
            label="SIGKILL of QEMU to vm-exit on Events",
            unit="ms",
            values=detect,
            baseline=base,
            baseline_label="SIGKILL to waitpid() in the parent of a directly started QEMU",
            target=("ratio", "<=", 1.3),
        )
    )
