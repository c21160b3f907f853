"""`cocos-manager check` says FAIL for every setting the daemon refuses to start with, in the
daemon's own words (check.STARTUP_REFUSALS: one code path for both), binds what the daemon
will bind, and says how much room a VM needs in MANAGER_QEMU_TMP_FILE_LOC against what is
there (docs/decisions.md, "Host checks").

Each case runs the real daemon and the real `cocos-manager check` with the same environment:
the daemon must exit 2 with one line, and check must print that line as a FAIL. Before, check
said PASS (or had no line at all) for each of them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cocos_manager.host.state_lock import StateLock
from cocos_manager.telemetry.grpc_log import HEADER
from tests.support.certs import issue
from tests.support.daemon_process import clean_environ, free_port
from tests.support.harness import base_env

EXE = str(Path(sys.executable).with_name("cocos-manager"))


def settings_env(tmp: Path, **env: str) -> dict[str, str]:
    """The stand-in's images and directories, with the real QEMU: check asks it for help texts,
    which the stand-in does not answer."""
    return base_env(tmp) | {
        "MANAGER_QEMU_BIN_PATH": "qemu-system-x86_64",
        "COCOS_JAEGER_URL": "off",
        **env,
    }


def check(env: dict[str, str]) -> tuple[int, dict[str, dict[str, str]]]:
    done = subprocess.run(
        [EXE, "check", "--json"],
        env=clean_environ() | env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout, done.stderr
    return done.returncode, {item["name"]: item for item in json.loads(done.stdout)}


def daemon_refusal(env: dict[str, str], cwd: Path) -> str:
    """The one line the daemon exits with (status 2); fails if it starts instead."""
    process = subprocess.Popen(
        [EXE], env=clean_environ() | env, cwd=cwd, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise AssertionError("the daemon started with settings check should refuse") from None
    assert process.returncode == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cocos-manager: "), stderr
    return lines[0].removeprefix("cocos-manager: ")


@contextlib.contextmanager
def listening(port: int) -> Iterator[None]:
    """Another process's listener, as the daemon would meet it (no SO_REUSEPORT)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        yield


def own_listener(tmp: Path, env: dict[str, str]) -> contextlib.AbstractContextManager[None]:
    port = free_port()
    env |= {"MANAGER_GRPC_PORT": str(port), "MANAGER_GRPC_URL": f"127.0.0.1:{port}"}
    return contextlib.nullcontext()


def attested_tls(tmp: Path, env: dict[str, str]) -> contextlib.AbstractContextManager[None]:
    env |= {"MANAGER_GRPC_URL": f"127.0.0.1:{free_port()}", "MANAGER_GRPC_ATTESTED_TLS": "true"}
    return contextlib.nullcontext()


def cert_without_key(tmp: Path, env: dict[str, str]) -> contextlib.AbstractContextManager[None]:
    cert, _ = issue("manager").write(tmp, "client")
    env |= {"MANAGER_GRPC_URL": f"127.0.0.1:{free_port()}", "MANAGER_GRPC_CLIENT_CERT": cert}
    return contextlib.nullcontext()


def grpc_port_held(tmp: Path, env: dict[str, str]) -> contextlib.AbstractContextManager[None]:
    port = free_port()
    env["MANAGER_GRPC_PORT"] = str(port)
    return listening(port)


def metrics_port_held(tmp: Path, env: dict[str, str]) -> contextlib.AbstractContextManager[None]:
    port = free_port()
    env |= {"MANAGER_METRICS_PORT": str(port), "MANAGER_METRICS_HOST": "127.0.0.1"}
    return listening(port)


def state_dir_0777(tmp: Path, env: dict[str, str]) -> contextlib.AbstractContextManager[None]:
    state = Path(env["MANAGER_STATE_DIR"])
    state.mkdir()
    state.chmod(0o777)
    return contextlib.nullcontext()


def state_dir_in_use(tmp: Path, env: dict[str, str]) -> contextlib.AbstractContextManager[None]:
    return StateLock(env["MANAGER_STATE_DIR"])  # held by this test's process


Case = Callable[[Path, dict[str, str]], contextlib.AbstractContextManager[None]]


@pytest.mark.parametrize(
    ("case", "line", "named"),
    [
        (own_listener, "dial-out", "MANAGER_GRPC_URL"),
        (attested_tls, "dial-out", "MANAGER_GRPC_ATTESTED_TLS"),
        (cert_without_key, "dial-out", "MANAGER_GRPC_CLIENT_KEY"),
        (grpc_port_held, "grpc-listen", "MANAGER_GRPC_HOST/MANAGER_GRPC_PORT"),
        (metrics_port_held, "metrics-listen", "MANAGER_METRICS_PORT"),
        (state_dir_0777, "state-dir", "MANAGER_STATE_DIR"),
        (state_dir_in_use, "state-dir", "MANAGER_STATE_DIR"),
    ],
)
def test_check_fails_what_the_daemon_refuses_in_its_words(
    tmp_path: Path, case: Case, line: str, named: str
) -> None:
    env = settings_env(tmp_path)
    with case(tmp_path, env):
        refusal = daemon_refusal(env, tmp_path)
        status, lines = check(env)
    assert refusal.startswith(named), refusal
    assert status == 1
    assert lines[line] == {
        "name": line,
        "status": "fail",
        "detail": f"{refusal}: the daemon refuses to start",
    }


def test_check_passes_those_lines_when_the_daemon_starts(tmp_path: Path) -> None:
    """The other side: with none of the faults, the same lines pass (and bind nothing for
    good: the ports are free again after check)."""
    port, metrics = free_port(), free_port()
    env = settings_env(
        tmp_path,
        MANAGER_GRPC_PORT=str(port),
        MANAGER_METRICS_PORT=str(metrics),
        MANAGER_METRICS_HOST="127.0.0.1",
        MANAGER_GRPC_URL=f"127.0.0.1:{free_port()}",
    )
    Path(env["MANAGER_STATE_DIR"]).mkdir(mode=0o700)
    _, lines = check(env)
    for name in ("tls", "dial-out", "grpc-listen", "metrics-listen", "state-dir"):
        assert lines[name]["status"] == "pass", lines[name]
    with listening(port), listening(metrics):
        pass  # check let both go


# -- room in TMP_FILE_LOC ----------------------------------------------------------------------


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def test_a_tmp_file_loc_without_room_for_one_vm_fails_saying_how_much_is_needed(
    tmp_path: Path,
) -> None:
    env = settings_env(tmp_path)
    rootfs = Path(env["MANAGER_QEMU_DISK_IMG_ROOTFS_FILE"])
    rootfs.write_bytes(os.urandom(1024 * 1024))  # on disk: copied into the tmpfs per VM
    with small_tmpfs(tmp_path / "small", "64k") as small:
        env["MANAGER_QEMU_TMP_FILE_LOC"] = str(small / "vms")
        status, lines = check(env)
    assert status == 1
    line = lines["tmp-file-loc"]
    assert line["status"] == "fail", line
    assert "64.0 KiB free" in line["detail"], line
    assert "a VM needs 1." in line["detail"] and "MiB" in line["detail"], line
    assert "rootfs 1048576 bytes, copied from another filesystem" in line["detail"], line
    assert "no room for one VM" in line["detail"], line


def test_room_for_fewer_vms_than_max_vms_warns(tmp_path: Path) -> None:
    env = settings_env(tmp_path, MANAGER_MAX_VMS="1000")
    with small_tmpfs(tmp_path / "small", "1m") as small:
        env["MANAGER_QEMU_TMP_FILE_LOC"] = str(small)
        _, lines = check(env)
    line = lines["tmp-file-loc"]
    assert line["status"] == "warn", line
    assert "of MANAGER_MAX_VMS=1000" in line["detail"], line


# -- the trace collector -------------------------------------------------------------------------


def test_an_unreachable_trace_collector_warns_and_names_no_credentials(tmp_path: Path) -> None:
    port = free_port()  # nobody listens there
    env = settings_env(tmp_path, COCOS_JAEGER_URL=f"http://user:secret@127.0.0.1:{port}/api/traces")
    _, lines = check(env)
    line = lines["tracing"]
    assert line["status"] == "warn", line
    assert f"127.0.0.1:{port} does not take connections" in line["detail"], line
    assert "secret" not in line["detail"], line
    with socket.socket() as collector:
        collector.bind(("127.0.0.1", port))
        collector.listen()
        _, lines = check(env)
    assert lines["tracing"]["status"] == "pass", lines["tracing"]


def test_a_held_grpc_port_fails_without_grpc_core_noise_on_stderr(tmp_path: Path) -> None:
    """gRPC core logged its failed bind on check's stderr ("E1207 ... add_port.cc:83] Failed
    to add port to server ..."), beside the FAIL line that already says it; what else is on
    stderr still gets there."""
    env = settings_env(tmp_path)
    with grpc_port_held(tmp_path, env):
        done = subprocess.run(
            [EXE, "check"], env=clean_environ() | env, capture_output=True, text=True, timeout=120
        )
    assert re.search(r"^FAIL\s+grpc-listen\s", done.stdout, re.M), done.stdout
    assert not [line for line in done.stderr.splitlines() if HEADER.match(line)], done.stderr
    assert "--verbose shows them" in done.stderr  # check's own stderr line is kept
