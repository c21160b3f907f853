"""The systemd unit passes systemd-analyze verify, and sd_notify reaches a real socket."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic_settings import BaseSettings

from cocos_manager.config.settings import QemuSettings, ServiceSettings
from cocos_manager.telemetry.sdnotify import READY, STOPPING, notify
from tests.support.waiting import unavailable

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "init" / "systemd" / "cocos-manager.service"
ENV_EXAMPLE = ROOT / "init" / "systemd" / "manager.env.example"


def _directives(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every line; keys repeat (DeviceAllow=, Environment=)."""
    section, found = "", []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.append((section, key, value))
    return found


def _values(key: str, section: str = "Service") -> list[str]:
    return [v for s, k, v in _directives(UNIT.read_text()) if s == section and k == key]


def _env_names(model: type[BaseSettings]) -> set[str]:
    prefix = str(model.model_config.get("env_prefix", ""))
    names = set()
    for field, info in model.model_fields.items():
        alias = info.validation_alias
        names.add(alias if isinstance(alias, str) else prefix + field)
    return names


SETTINGS = _env_names(ServiceSettings) | _env_names(QemuSettings)


# --- systemd-analyze verify ---------------------------------------------------------------


def _verify(unit_text: str, directory: Path) -> subprocess.CompletedProcess[str]:
    """Verifies the unit with ExecStart pointing at this checkout's console script.

    verify insists that ExecStart exists; /usr/local/bin/cocos-manager does not on a build
    machine, so the copy names the script installed next to this Python instead.
    """
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        unavailable("systemd-analyze is not installed (make install installs systemd)")
    script = Path(sys.executable).parent / "cocos-manager"
    assert script.exists(), "install the package (pip install -e .) first"
    text = re.sub(r"(?m)^ExecStart=.*$", f"ExecStart={script}", unit_text)
    copy = directory / UNIT.name
    copy.write_text(text)
    copy.chmod(0o644)  # systemd refuses a world-writable unit (a runner's umask may be 000)
    return subprocess.run(
        [analyze, "verify", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0"},
    )


def test_systemd_analyze_verify_passes(tmp_path: Path) -> None:
    result = _verify(UNIT.read_text(), tmp_path)
    # verify reports directives it ignores on stderr with exit status 0: silence is the pass.
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == "", result.stdout + result.stderr


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above would see a mistake: an unknown value is reported."""
    broken = UNIT.read_text().replace("ProtectHome=yes", "ProtectHome=perhaps")
    result = _verify(broken, tmp_path)
    assert "ProtectHome" in result.stderr or "protect home" in result.stderr.lower()


# --- what the unit promises ---------------------------------------------------------------


def test_unit_essentials() -> None:
    assert _values("Type") == ["notify"]
    assert _values("ExecStart") == ["/usr/local/bin/cocos-manager"]
    assert _values("EnvironmentFile") == ["-/etc/cocos/manager.env"]
    assert _values("Restart") == ["on-failure"]
    assert _values("NoNewPrivileges") == ["yes"]
    assert _values("ProtectSystem") == ["strict"]
    assert _values("WantedBy", "Install") == ["multi-user.target"]


def test_qemu_can_reach_its_devices() -> None:
    allowed = {value.split()[0]: value.split()[1] for value in _values("DeviceAllow")}
    for device in ("/dev/kvm", "/dev/vhost-vsock", "/dev/sev", "char-pts"):
        assert allowed.get(device) == "rw", device
    assert _values("DevicePolicy") == ["closed"]
    assert "PrivateDevices" not in {k for _, k, _ in _directives(UNIT.read_text())}


def test_stop_waits_longer_than_a_vm_stop() -> None:
    (timeout,) = _values("TimeoutStopSec")
    assert timeout.endswith("s") and int(timeout[:-1]) > QemuSettings().STOP_TIMEOUT


def test_writable_paths_are_the_state_and_image_directories() -> None:
    environment = dict(value.split("=", 1) for value in _values("Environment"))
    assert environment["MANAGER_STATE_DIR"] == "/run/cocos-manager"
    assert environment["MANAGER_QEMU_TMP_FILE_LOC"] == "/var/lib/cocos-manager/tmp"
    assert set(environment) - {"PYTHONUNBUFFERED"} <= SETTINGS
    writable = _values("ReadWritePaths")[0].split()
    assert {"/run/cocos-manager", "/var/lib/cocos-manager"} <= set(writable)
    assert _values("RuntimeDirectory") == ["cocos-manager"]
    assert "cocos-manager/tmp" in _values("StateDirectory")[0].split()


def test_env_example_lists_every_setting() -> None:
    listed = set(re.findall(r"(?m)^#?([A-Z][A-Z0-9_]+)=", ENV_EXAMPLE.read_text()))
    assert listed == SETTINGS


# --- sd_notify ----------------------------------------------------------------------------


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


def test_notify_sends_ready_and_stopping(notify_socket: socket.socket) -> None:
    assert notify(READY)
    assert notify_socket.recv(4096) == b"READY=1"
    assert notify(STOPPING)
    assert notify_socket.recv(4096) == b"STOPPING=1"


def test_notify_reaches_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"cocos-manager-test-{uuid.uuid4()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify(READY)
        assert sock.recv(4096) == b"READY=1"


def test_notify_without_systemd_is_a_no_op(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify(READY) is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert notify(READY) is False
