"""Shared fixtures. Every test starts from an environment without MANAGER_*/COCOS_* variables,
and ends with no process left that was started for it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import hypothesis
import pytest

from tests.support.processes import processes_mentioning

# Imported here, not first in hypothesis' pytest plugin at the end of a session that ran no
# property test: that late import trips CPython 3.11.7's "AST constructor recursion depth
# mismatch" SystemError under pytest's assertion rewriting and fails the whole run.


# What a CI runner's environment may carry that changes the tests' own loopback gRPC: a proxy
# (gRPC honours these for 127.0.0.1 too) or gRPC's tracing on stderr.
RUNNER_ENV = frozenset(
    {
        "http_proxy",
        "https_proxy",
        "grpc_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "GRPC_VERBOSITY",
        "GRPC_TRACE",
    }
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith(("MANAGER_", "COCOS_")) or name in RUNNER_ENV:
            monkeypatch.delenv(name)
    yield


@pytest.fixture(autouse=True)
def no_process_left_behind(tmp_path: Path) -> Iterator[None]:
    """A test whose VMs outlive it leaks: fail it, and kill them so later tests start clean."""
    yield
    leftovers = processes_mentioning(str(tmp_path))
    named = {pid: _cmdline(pid) for pid in leftovers}
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not leftovers, f"processes left running by this test: {named}"


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return "?"


# -- property tests: new inputs on each commit, reproducibly ------------------------------------
#
# Hypothesis' "ci" profile (loaded when CI is set) derandomizes: every CI run would try the
# same inputs forever. Here the seed is derived from the commit under test instead, so each
# commit explores new inputs and any run can be repeated: HYPOTHESIS_SEED=N (or pytest's
# --hypothesis-seed=N) reruns with the seed printed in the header of the failing run.

SEED_VARIABLE = "HYPOTHESIS_SEED"


def _commit_seed() -> int | None:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        return int(head[:8], 16)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def property_seed(config: pytest.Config) -> tuple[int, str]:
    """The seed for this run and where it came from."""
    given = config.getoption("hypothesis_seed", None)
    if given is not None:
        return int(given), "--hypothesis-seed"
    if os.environ.get(SEED_VARIABLE):
        return int(os.environ[SEED_VARIABLE]), SEED_VARIABLE
    commit = _commit_seed()
    if commit is not None:
        return commit, "the commit under test"
    return int.from_bytes(os.urandom(4), "big"), "random (no git checkout)"


@pytest.hookimpl(trylast=True)  # after hypothesis' own plugin has read its options
def pytest_configure(config: pytest.Config) -> None:
    seed, source = property_seed(config)
    settings = hypothesis.settings
    settings.register_profile(
        "cocos-seeded", parent=settings.get_profile(settings.get_current_profile_name()),
        derandomize=False, print_blob=True,
    )  # fmt: skip
    settings.load_profile("cocos-seeded")
    hypothesis.core.global_force_seed = seed  # type: ignore[assignment]
    config.stash[_SEED] = (seed, source)


_SEED = pytest.StashKey[tuple[int, str]]()


def pytest_report_header(config: pytest.Config) -> str:
    seed, source = config.stash[_SEED]
    return f"hypothesis seed {seed} (from {source}; rerun with {SEED_VARIABLE}={seed})"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Also under -q (which hides the header), so a failing CI log always names the seed."""
    if terminalreporter.stats.get("failed") or terminalreporter.stats.get("error"):
        terminalreporter.write_line(pytest_report_header(terminalreporter.config))
