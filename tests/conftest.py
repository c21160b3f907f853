"""Shared fixtures. Every test starts from an environment without MANAGER_*/COCOS_* variables,
and ends with no process left that was started for it."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import hypothesis  # noqa: F401  (see below)
import pytest

# Imported here, not first in hypothesis' pytest plugin at the end of a session that ran no
# property test: that late import trips CPython 3.11.7's "AST constructor recursion depth
# mismatch" SystemError under pytest's assertion rewriting and fails the whole run.


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith(("MANAGER_", "COCOS_")):
            monkeypatch.delenv(name)
    yield


def processes_mentioning(text: str) -> list[int]:
    """Live processes (not zombies) whose command line names `text`."""
    found = []
    needle = text.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                if needle not in cmdline.read():
                    continue
            with open(f"/proc/{entry}/stat", "rb") as stat:
                if stat.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    continue
        except OSError:
            continue
        found.append(int(entry))
    return found


@pytest.fixture(autouse=True)
def no_process_left_behind(tmp_path: Path) -> Iterator[None]:
    """A test whose VMs outlive it leaks: fail it, and kill them so later tests start clean."""
    yield
    leftovers = processes_mentioning(str(tmp_path))
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not leftovers, f"processes left running by this test: {leftovers}"
