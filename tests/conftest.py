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

from tests.support.processes import processes_mentioning

# Imported here, not first in hypothesis' pytest plugin at the end of a session that ran no
# property test: that late import trips CPython 3.11.7's "AST constructor recursion depth
# mismatch" SystemError under pytest's assertion rewriting and fails the whole run.


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith(("MANAGER_", "COCOS_")):
            monkeypatch.delenv(name)
    yield


@pytest.fixture(autouse=True)
def no_process_left_behind(tmp_path: Path) -> Iterator[None]:
    """A test whose VMs outlive it leaks: fail it, and kill them so later tests start clean."""
    yield
    leftovers = processes_mentioning(str(tmp_path))
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not leftovers, f"processes left running by this test: {leftovers}"
