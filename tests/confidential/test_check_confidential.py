"""`cocos-manager check` is where an operator learns what the host lacks, yet with settings
asking for a confidential mode its QEMU lacks (here MANAGER_QEMU_SEV_SNP_SYNTAX=upstream on
Debian's QEMU 7.2) it stopped at the daemon's start-up refusal: one line, exit 2, none of the
report, and its own "QEMU sev-snp-guest (upstream)" FAIL line could never show (found in
review). Impossible combinations still stop it with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

EXE = str(Path(sys.executable).with_name("cocos-manager"))


def _check(**env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MANAGER_", "COCOS_"))}
    return subprocess.run(
        [EXE, "check", "--json"], env={**base, **env},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_check_reports_what_qemu_lacks_for_the_mode() -> None:
    done = _check(MANAGER_QEMU_SEV_SNP_SYNTAX="upstream")
    assert done.returncode == 1, done.stderr
    report = {c["name"]: c for c in json.loads(done.stdout)}
    assert report["QEMU sev-snp-guest (upstream)"]["status"] == "fail"


def test_impossible_combinations_still_stop_check_with_one_line() -> None:
    done = _check(MANAGER_QEMU_ENABLE_TDX="true")  # with the default ENABLE_SEV_SNP=true
    assert done.returncode == 2
    assert done.stderr.startswith("cocos-manager: MANAGER_QEMU_ENABLE_TDX:")
