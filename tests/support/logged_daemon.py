"""The real `cocos-manager` started with exactly the environment a test gives, its JSON log
(stdout) and its stderr in separate files, ready once its start-up line is logged."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXE = str(Path(sys.executable).with_name("cocos-manager"))
START_LINE = "manager service gRPC server listening at "


@dataclass
class LoggedDaemon:
    process: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path

    def lines(self) -> list[str]:
        return self.stdout.read_text(errors="replace").splitlines()

    def records(self) -> list[dict[str, Any]]:
        """Every stdout line, each of which must be JSON."""
        return [json.loads(line) for line in self.lines()]

    def start_record(self) -> dict[str, Any]:
        return next(r for r in self.records() if r["message"].startswith(START_LINE))

    def port(self) -> int:
        return int(self.start_record()["grpc"].rsplit(":", 1)[1])

    def wait_for(self, message: str, timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines():
                if message in line:
                    record: dict[str, Any] = json.loads(line)
                    return record
            if self.process.poll() is not None:
                raise AssertionError(
                    f"daemon exited ({self.process.returncode}) before {message!r}:\n"
                    + self.stdout.read_text()[-2000:]
                    + self.stderr.read_text()[-2000:]
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"no {message!r} within {timeout:g}s")
            time.sleep(0.02)


def daemon_env(env: dict[str, str]) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MANAGER_", "COCOS_"))}
    return {**base, **env}


@contextmanager
def logged_daemon(tmp: Path, env: dict[str, str]) -> Iterator[LoggedDaemon]:
    tmp.mkdir(parents=True, exist_ok=True)
    stdout, stderr = tmp / "daemon.out", tmp / "daemon.err"
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        process = subprocess.Popen([EXE], env=daemon_env(env), cwd=tmp, stdout=out, stderr=err)
    daemon = LoggedDaemon(process, stdout, stderr)
    try:
        daemon.wait_for(START_LINE, timeout=60)  # a loaded 2-CPU host starts slowly
        yield daemon
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
