"""The daemon's worker threads for blocking work of a VM start (file preparation, spawning QEMU).

Few on purpose: what they do is mostly waiting in the kernel (exec, links, copies) with the
GIL released, but each also runs some Python, and in a burst every extra thread is one more
contender for the GIL against the event loop while the guests take the CPUs. Paired bursts
of 32 Runs on 2 CPUs (ratio to the same argvs started at once by a client, 4 pairs each):
64 threads 1.68, 4 threads 1.44; 4 threads 1.41, 1 thread 1.57. Threads are made only when
work is waiting and none is idle.
"""

from __future__ import annotations

import concurrent.futures
import os

START_WORKERS = min(8, (os.cpu_count() or 1) + 2)

start_pool = concurrent.futures.ThreadPoolExecutor(
    max_workers=START_WORKERS, thread_name_prefix="vm-start"
)
