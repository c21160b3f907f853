"""scripts/upstream-qemu.sh fetches the QEMU 10 the confidential command-line tests run. On a
fresh clone every test worker that draws one of those tests asks for it at the same moment."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "upstream-qemu.sh"


def test_two_fetches_into_one_fresh_folder_at_once_both_succeed_and_fetch_once(
    tmp_path: Path,
) -> None:
    """Two at once fought over apt's lock and one extraction folder: one of them failed."""
    dest = tmp_path / "qemu-upstream"
    shims = tmp_path / "shims"
    shims.mkdir()
    calls = tmp_path / "apt-get.calls"
    # apt-get as the script finds it on PATH, noting each call (the script runs it as root).
    (shims / "apt-get").write_text(f'#!/bin/sh\necho "$*" >> {calls}\nexec /usr/bin/apt-get "$@"\n')
    (shims / "apt-get").chmod(0o755)
    sources = [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]
    known = any("bookworm-backports" in f.read_text() for f in sources if f.is_file())
    env = {**os.environ, "PATH": f"{shims}{os.pathsep}{os.environ['PATH']}"}
    runs = [
        subprocess.Popen(
            ["bash", str(SCRIPT), str(dest)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=600) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err for _, err in outputs]
    binary = dest / "usr" / "bin" / "qemu-system-x86_64"
    assert [out.strip().splitlines()[-1] for out, _ in outputs] == [str(binary)] * 2
    assert sum("downloading" in err for _, err in outputs) == 1  # the other found it fetched
    assert not list(tmp_path.glob("qemu-upstream.partial*"))
    # apt's lists are updated only when the script adds bookworm-backports to apt's sources (on
    # a fresh host), never again once it is known (a `| grep -q` under pipefail updated them
    # on every fetch).
    updates = [line for line in calls.read_text().splitlines() if line.startswith("update")]
    assert len(updates) <= (0 if known else 1), updates  # (another worker's fetch may do it)
