"""`cocos-manager check` says what the daemon would make of MANAGER_AUTOGROUP_NICE: a non-root
daemon without CAP_SYS_NICE, or a kernel without autogroups, slows under busy guests and was
told only in the daemon's log."""

from __future__ import annotations

from pathlib import Path

import pytest

from cocos_manager.check import run_checks
from cocos_manager.config.settings import load_settings
from cocos_manager.host.sched_weight import weight_check
from tests.host.test_host_check import fake_host

ON = "1\n"
ROOT_CAPS = "Name:\tpython\nCapEff:\t000001ffffffffff\n"
NO_CAPS = "Name:\tpython\nCapEff:\t0000000000000000\n"
NICE_ONLY = f"CapEff:\t{1 << 23:016x}\n"


def files(tmp_path: Path, flag: str, status: str) -> tuple[Path, Path]:
    (tmp_path / "flag").write_text(flag)
    (tmp_path / "status").write_text(status)
    return tmp_path / "flag", tmp_path / "status"


def test_check_reports_the_scheduling_weight(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    checks = run_checks(load_settings(), fake_host(tmp_path), run=lambda argv: "")
    [weight] = [c for c in checks if c.name == "scheduling-weight"]
    said = ("nice to -10", "MANAGER_AUTOGROUP_NICE=-10")  # the default, as this host takes it
    assert weight.status in ("pass", "warn") and any(words in weight.detail for words in said)


@pytest.mark.parametrize(
    ("nice", "flag", "status", "expected", "words"),
    [
        (-10, ON, ROOT_CAPS, "pass", "nice to -10"),
        (-10, ON, NICE_ONLY, "pass", "nice to -10"),
        (-10, ON, NO_CAPS, "warn", "AmbientCapabilities=CAP_SYS_NICE"),
        (5, ON, NO_CAPS, "pass", "nice to 5"),  # a lower weight needs no capability
        (-10, "0\n", ROOT_CAPS, "warn", "kernel.sched_autogroup_enabled=0"),
        (0, "0\n", NO_CAPS, "pass", "MANAGER_AUTOGROUP_NICE=0"),
    ],
    ids=["root", "cap-sys-nice", "no-cap", "positive", "autogroup-off", "zero"],
)
def test_what_check_says(
    tmp_path: Path, nice: int, flag: str, status: str, expected: str, words: str
) -> None:
    got, detail = weight_check(nice, *files(tmp_path, flag, status))
    assert got == expected and words in detail, detail


def test_a_kernel_without_autogroups_is_a_warning(tmp_path: Path) -> None:
    got, detail = weight_check(-10, tmp_path / "absent", *files(tmp_path, ON, ROOT_CAPS)[1:])
    assert got == "warn" and "autogroup scheduling is off" in detail
