"""The `cocos-manager` console script as an operator runs it: real processes, real environment."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXE = str(Path(sys.executable).with_name("cocos-manager"))


def run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MANAGER_", "COCOS_"))}
    return subprocess.run([EXE, *args], env={**base, **(env or {})}, capture_output=True,
                          text=True, timeout=timeout, check=False)  # fmt: skip


def test_print_json_defaults() -> None:
    done = run("print-qemu-cmd", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert list(doc) == ["exe", "args"]
    assert doc["exe"] == shutil.which("qemu-system-x86_64")
    assert doc["args"][:2] == ["-enable-kvm", "-machine"]
    assert doc["args"][-2:] == ["-monitor", "pty"]


def test_print_json_with_sudo() -> None:
    done = run("print-qemu-cmd", "--json", env={"MANAGER_QEMU_USE_SUDO": "true"})
    doc = json.loads(done.stdout)
    assert doc["exe"] == "sudo"
    assert doc["args"][0] == shutil.which("qemu-system-x86_64")


def test_print_shell_line_round_trips(tmp_path: Path) -> None:
    done = run("print-qemu-cmd")
    assert done.returncode == 0
    import shlex

    doc = json.loads(run("print-qemu-cmd", "--json").stdout)
    assert shlex.split(done.stdout) == [doc["exe"], *doc["args"]]


@pytest.mark.parametrize(
    ("name", "value"),
    [("MANAGER_QEMU_SMP_COUNT", "many"), ("MANAGER_QEMU_ENABLE_SEV", "yes"),
     ("MANAGER_GRPC_PORT", "70000"), ("MANAGER_LOG_LEVEL", "verbose")],
)  # fmt: skip
@pytest.mark.parametrize("command", [["print-qemu-cmd", "--json"], []])
def test_bad_values_stop_with_one_line(name: str, value: str, command: list[str]) -> None:
    done = run(*command, env={name: value})
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and name in lines[0] and value in lines[0]
    assert "Traceback" not in done.stderr
    assert done.stdout == ""


def test_missing_binary_is_refused() -> None:
    done = run("print-qemu-cmd", "--json", env={"MANAGER_QEMU_BIN_PATH": "no-such-qemu"})
    assert done.returncode != 0
    assert "MANAGER_QEMU_BIN_PATH" in done.stderr and "no-such-qemu" in done.stderr
    done = run(env={"MANAGER_QEMU_BIN_PATH": "no-such-qemu"})
    assert done.returncode != 0 and "no-such-qemu" in done.stderr
