"""`cocos-manager-cli` answers malformed input with one line and exit 2, never a traceback
(found in review: `events --since -1`, and a manifest file that is JSON but not an object, or
whose datasets are not objects, ended in Python tracebacks)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

CLI = str(Path(sys.executable).with_name("cocos-manager-cli"))


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, *args, "--address", "127.0.0.1:1"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("since", ["-1", str(2**64)])
def test_since_out_of_range(since: str) -> None:
    done = _cli("events", "--since", since)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "--since" in done.stderr


@pytest.mark.parametrize(
    "document", ["[1, 2]", '"text"', '{"datasets": 5}', '{"datasets": [5]}', '{"id": {"a": 1}}']
)
def test_manifest_of_the_wrong_shape(tmp_path: Path, document: str) -> None:
    manifest = tmp_path / "m.json"
    manifest.write_text(document)
    done = _cli("run", "--manifest", str(manifest))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith(f"cocos-manager-cli: {manifest}: ")
    assert len(done.stderr.strip().splitlines()) <= 2


def test_a_negative_count_is_refused() -> None:
    """`--count -1` stopped after the first message instead of being refused."""
    done = _cli("events", "--count", "-1")
    assert done.returncode == 2 and "--count" in done.stderr, done.stderr
