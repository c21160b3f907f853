"""The daemon's start-up warnings and start-up line, shown by the real `cocos-manager`
(docs/decisions.md, "Host checks"): each finding once, as JSON, naming the setting and the fix."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import pytest

from cocos_manager.check import startup_checks
from cocos_manager.config.settings import load_settings
from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.proto import manager_pb2_grpc as pb_grpc
from tests.support.logged_daemon import EXE, daemon_env, logged_daemon


def base(tmp_path: Path) -> dict[str, str]:
    return {
        "MANAGER_GRPC_PORT": "0",
        "MANAGER_STATE_DIR": str(tmp_path / "state"),
        "MANAGER_QEMU_TMP_FILE_LOC": str(tmp_path / "vms"),
        "COCOS_JAEGER_URL": "off",
    }


def expected_warnings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """What this host should make the daemon say, from the same probes run here."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    checks = startup_checks(load_settings())
    return Counter(c.detail for c in checks if c.status != "pass")


def test_each_warning_once_naming_the_setting_and_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {
        **base(tmp_path),
        "MANAGER_GRPC_HOST": "",  # all interfaces, and no TLS
        "MANAGER_QEMU_MEMORY": "1G",
        "MANAGER_QEMU_AGENT_CHANEL": "fw_cfg",
    }
    expected = expected_warnings(env, monkeypatch)
    with logged_daemon(tmp_path / "d", env) as daemon:
        records = daemon.records()
    # The host findings (other parts of the daemon may warn too, e.g. about AF_VSOCK).
    warnings = Counter(r["message"] for r in records if r["level"] == "warn" and "check" in r)
    assert warnings == expected
    assert all(count == 1 for count in warnings.values())
    by_check = {r["message"]: r["check"] for r in records if r["level"] == "warn" and "check" in r}
    assert (
        by_check[
            "MANAGER_QEMU_MEMORY is not a setting of the manager and is ignored; "
            "did you mean MANAGER_QEMU_MEMORY_SIZE?"
        ]
        == "unknown-variable"
    )
    assert (
        by_check[
            "MANAGER_QEMU_AGENT_CHANEL is not a setting of the manager and is ignored; "
            "did you mean MANAGER_QEMU_AGENT_CHANNEL?"
        ]
        == "unknown-variable"
    )
    assert any(
        check == "grpc-listen" and "MANAGER_GRPC_HOST" in message
        for message, check in by_check.items()
    )
    # With the defaults, SNP is asked for: on a host without it the daemon says so.
    if not Path("/dev/sev").exists():
        assert any(
            check == "sev-snp" and "MANAGER_QEMU_ENABLE_SEV_SNP=false" in message
            for message, check in by_check.items()
        )
    if not Path("/dev/vhost-vsock").exists():
        assert any(
            check == "agent-channel" and "MANAGER_QEMU_AGENT_CHANNEL=fw_cfg" in message
            for message, check in by_check.items()
        )
    # The QEMU line: the default vsock channel gives the device.
    assert "-device vhost-vsock-pci," in qemu_line_of(records)


def test_the_start_line_names_grpc_metrics_and_traces_and_fw_cfg_has_no_vsock(
    tmp_path: Path,
) -> None:
    env = {
        **base(tmp_path),
        "MANAGER_GRPC_HOST": "127.0.0.1",
        "MANAGER_METRICS_PORT": "0",
        "MANAGER_QEMU_AGENT_CHANNEL": "fw_cfg",
        "MANAGER_QEMU_ENABLE_SEV_SNP": "false",
        "MANAGER_QEMU_ENABLE_KVM": "false",
    }
    with logged_daemon(tmp_path / "d", env) as daemon:
        start = daemon.start_record()
        qemu_line = qemu_line_of(daemon.records())
    assert start["grpc"] == f"127.0.0.1:{daemon.port()}"
    assert start["metrics"].startswith("http://127.0.0.1:") and start["metrics"].endswith(
        "/metrics"
    )
    assert start["traces"] == "off"
    assert start["grpc"] in start["message"] and "metrics http://" in start["message"]
    assert "traces off" in start["message"]
    assert "vhost-vsock" not in qemu_line
    assert "-fw_cfg name=opt/cocos/agent-config.json,file=" in qemu_line


def test_a_jaeger_url_that_is_not_http_refuses_start_up(tmp_path: Path) -> None:
    env = {**base(tmp_path), "COCOS_JAEGER_URL": "localhost:14268"}
    done = subprocess.run(
        [EXE], env=daemon_env(env), cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "cocos-manager: invalid value for COCOS_JAEGER_URL: 'localhost:14268' (expected an "
        "http(s) URL such as http://localhost:14268/api/traces, or 'off' to turn tracing off)"
    ]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_without_a_collector_one_clear_line(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_free_port()}/api/traces"  # nobody listens
    env = {**base(tmp_path), "MANAGER_GRPC_HOST": "127.0.0.1", "COCOS_JAEGER_URL": url}
    with logged_daemon(tmp_path / "d", env) as daemon:
        assert daemon.start_record()["traces"] == f"{url} (jaeger.thrift)"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{daemon.port()}") as channel:
            stub = pb_grpc.ManagerServiceStub(channel)

            async def calls(count: int) -> None:
                for _ in range(count):
                    with pytest.raises(grpc.aio.AioRpcError):
                        await stub.Stop(pb.StopRequest(computation_id="nobody"), timeout=5)

            await calls(3)
            first = daemon.wait_for("trace export failed")
            # More batches fail while the collector stays down: still that one line.
            ends = time.monotonic() + 2.5
            while time.monotonic() < ends:
                await calls(2)
                await asyncio.sleep(0.2)
        lines = [r for r in daemon.records() if r["message"].startswith("trace export failed")]
    assert lines == [first]
    assert url in first["message"] and "COCOS_JAEGER_URL=off" in first["message"]
    assert first["level"] == "warn"


def test_json_only_on_stdout_and_nothing_raw_on_stderr(tmp_path: Path) -> None:
    env = {**base(tmp_path), "MANAGER_GRPC_HOST": "127.0.0.1"}
    with logged_daemon(tmp_path / "d", env) as daemon:
        pass
    assert daemon.process.returncode == 0
    for line in daemon.lines():
        json.loads(line)
    assert daemon.stderr.read_text() == ""
    assert os.path.getsize(daemon.stdout) > 0


def qemu_line_of(records: list[dict[str, Any]]) -> str:
    """The daemon's QEMU command line: its first log line after the state directory's lock."""
    return next(r["message"] for r in records if " -machine " in r["message"])
