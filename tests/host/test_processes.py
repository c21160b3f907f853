"""Processes found by what their command line names (host/processes.py), as the start-up sweep
finds the QEMUs of lost records: the same processes, start times and argv with the filter as
without it."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from cocos_manager.host import live_processes


def test_naming_finds_what_the_whole_scan_finds(tmp_path: Path) -> None:
    # A byte that is not UTF-8 in the path: command lines are bytes, and so may the paths be.
    where = str(tmp_path / "vms\udcff")
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()", f"-kernel={where}/bzImage-x"],
        stdin=subprocess.PIPE,
    )
    try:
        # Between fork and exec its command line is still the parent's.
        while not (everything := [p for p in live_processes() if f"{where}/" in " ".join(p[2])]):
            time.sleep(0.001)
        assert [pid for pid, _, _ in everything] == [child.pid]
        assert list(live_processes(naming=f"{where}/")) == everything
        assert list(live_processes(naming=f"{where}/elsewhere")) == []
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait()
