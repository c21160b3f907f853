"""The daemon's worker threads for blocking work of a VM start (file preparation, spawning QEMU).

asyncio's default executor has min(32, CPUs + 4) threads: 6 on a 2-CPU host, so a burst of 32
Runs queued behind 6 of them. Threads are made only when work is waiting and none is idle,
so this costs nothing until a burst comes.
"""

from __future__ import annotations

import concurrent.futures

START_WORKERS = 64

pool = concurrent.futures.ThreadPoolExecutor(
    max_workers=START_WORKERS, thread_name_prefix="vm-start"
)
