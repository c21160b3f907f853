"""QEMU's environment is a small explicit set (qemu_environment), not the daemon's."""

from __future__ import annotations

from cocos_manager.config.settings import QemuSettings
from cocos_manager.qemu.environment import DEFAULT_PATH, qemu_environment

DAEMON_ENV = {
    "PATH": "/opt/qemu/bin:/usr/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "LC_MESSAGES": "fr_FR.UTF-8",
    "TZ": "UTC",
    "TMPDIR": "/var/tmp",
    "XDG_RUNTIME_DIR": "/run/user/0",
    "HOME": "/root",
    "MANAGER_GRPC_SERVER_KEY": "-----BEGIN PRIVATE KEY-----\nMIIE...\n-----END PRIVATE KEY-----",
    "COCOS_JAEGER_URL": "https://user:secret@collector/api/traces",
    "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer xyz",
    "AWS_SECRET_ACCESS_KEY": "abc",
    "LD_LIBRARY_PATH": "/opt/qemu/lib",
}


def test_only_the_small_set_is_passed() -> None:
    env = qemu_environment(QemuSettings(), DAEMON_ENV)
    assert env == {
        "PATH": "/opt/qemu/bin:/usr/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "LC_MESSAGES": "fr_FR.UTF-8",
        "TZ": "UTC",
        "TMPDIR": "/var/tmp",
        "XDG_RUNTIME_DIR": "/run/user/0",
    }
    assert not any("PRIVATE KEY" in value or "secret" in value for value in env.values())


def test_pass_env_adds_names_that_are_set() -> None:
    settings = QemuSettings(PASS_ENV="LD_LIBRARY_PATH,QEMU_AUDIO_DRV")  # type: ignore[arg-type]
    env = qemu_environment(settings, DAEMON_ENV)
    assert env["LD_LIBRARY_PATH"] == "/opt/qemu/lib"
    assert "QEMU_AUDIO_DRV" not in env  # listed but not set: not invented
    assert "MANAGER_GRPC_SERVER_KEY" not in env


def test_path_has_a_fallback() -> None:
    assert qemu_environment(QemuSettings(), {"HOME": "/root"}) == {"PATH": DEFAULT_PATH}
