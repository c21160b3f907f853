"""The test computations server as an operator runs it from the README: a file of
--seed-request that is missing is said at once, naming it (before, nothing was printed and
each connecting Manager's stream failed), and without a terminal or pipe on stdin it serves
until Ctrl-C/SIGTERM (before: a traceback, or it stopped at once)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.readme import REPO

SERVER = REPO / "tests" / "support" / "computations_server.py"


def test_a_missing_seed_request_file_is_named_at_start(tmp_path: Path) -> None:
    algo = tmp_path / "lin_reg.py"
    algo.write_text("print(1)\n")
    done = subprocess.run(
        [sys.executable, str(SERVER), "--port", "0", "--seed-request", "iris.csv", str(algo)],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1].endswith(
        "error: --seed-request: iris.csv: No such file or directory"
    )
    assert done.stdout == ""


@pytest.mark.parametrize("stdin", ["devnull", "file", "closed"])
def test_without_a_terminal_it_serves_until_interrupted(tmp_path: Path, stdin: str) -> None:
    source = {"devnull": subprocess.DEVNULL, "file": open(SERVER, "rb"), "closed": None}[stdin]  # noqa: SIM115
    server = subprocess.Popen(
        [sys.executable, str(SERVER), "--port", "0"],
        stdin=source, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        pass_fds=(), close_fds=True,
        preexec_fn=(lambda: __import__("os").close(0)) if stdin == "closed" else None,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        first = json.loads(server.stdout.readline())
        assert "listening" in first
        assert server.poll() is None, "it stopped without being asked"
        server.send_signal(signal.SIGINT)
        _, err = server.communicate(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        if stdin == "file":
            source.close()  # type: ignore[union-attr]
    assert server.returncode == 0
    assert err == b""
