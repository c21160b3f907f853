"""`make install` (scripts/setup.sh) hides pip's "WARNING: Location '...' is ignored" lines
(one per package and location when pip's configuration names index locations that do not
exist, as on this project's build hosts), and nothing else: pip's other words and its exit
status pass through."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support.readme import REPO

FAKE_PIP = """#!/bin/sh
echo "Collecting grpcio"
echo "WARNING: Location 'file:///opt/pypi-more/simple/grpcio/' is ignored: it is neither a file nor a directory." >&2
echo "ERROR: something pip really means" >&2
exit $FAKE_PIP_STATUS
"""


@pytest.mark.parametrize("status", [0, 1])
def test_pip_quietly_drops_only_the_ignored_location_warnings(tmp_path: Path, status: int) -> None:
    pip = tmp_path / "bin" / "pip"
    pip.parent.mkdir()
    pip.write_text(FAKE_PIP)
    pip.chmod(0o755)
    script = f'set -euo pipefail; source "{REPO / "scripts" / "setup.sh"}"; venv="{tmp_path}"; pip_quietly install x'
    done = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "FAKE_PIP_STATUS": str(status)},
    )  # fmt: skip
    assert done.returncode == status
    assert done.stdout == "Collecting grpcio\n"
    assert done.stderr == "ERROR: something pip really means\n"
