"""Every variable of the original (docs/contracts.md, "Settings parsing"): name, default, and the original's parsing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cocos_manager.config.choices import AgentChannel, LogLevel
from cocos_manager.config.go_parse import PortRange
from cocos_manager.config.settings import (
    QemuSettings,
    ServiceSettings,
    SettingsError,
    load_settings,
)

QEMU_DEFAULTS: dict[str, object] = {
    "BIN_PATH": "qemu-system-x86_64",
    "TMP_FILE_LOC": "tmp",
    "USE_SUDO": False,
    "ENABLE_SEV": False,
    "ENABLE_SEV_SNP": True,
    "ENABLE_KVM": True,
    "MACHINE": "q35",
    "CPU": "EPYC",
    "SMP_COUNT": 4,
    "SMP_MAXCPUS": 64,
    "MEM_ID": "ram1",
    "MEMORY_SIZE": "2048M",
    "MEMORY_SLOTS": 5,
    "MAX_MEMORY": "30G",
    "OVMF_CODE_IF": "pflash",
    "OVMF_CODE_FORMAT": "raw",
    "OVMF_CODE_UNIT": 0,
    "OVMF_CODE_FILE": "/usr/share/OVMF/OVMF_CODE.fd",
    "OVMF_CODE_READONLY": "on",
    "OVMF_VARS_IF": "pflash",
    "OVMF_VARS_FORMAT": "raw",
    "OVMF_VARS_UNIT": 1,
    "OVMF_VARS_FILE": "/usr/share/OVMF/OVMF_VARS.fd",
    "NETDEV_ID": "vmnic",
    "HOST_FWD_AGENT": 7020,
    "GUEST_FWD_AGENT": 7002,
    "VIRTIO_NET_PCI_DISABLE_LEGACY": "on",
    "VIRTIO_NET_PCI_IOMMU_PLATFORM": True,
    "VIRTIO_NET_PCI_ADDR": "0x2",
    "VIRTIO_NET_PCI_ROMFILE": "",
    "DISK_IMG_KERNEL_FILE": "img/bzImage",
    "DISK_IMG_ROOTFS_FILE": "img/rootfs.cpio.gz",
    "KERNEL_HASH": False,
    "NO_GRAPHIC": True,
    "MONITOR": "pty",
    "SEV_ID": "sev0",
    "SEV_CBITPOS": 51,
    "SEV_REDUCED_PHYS_BITS": 1,
    "VSOCK_ID": "vhost-vsock-pci0",
    "VSOCK_GUEST_CID": 3,
    "VSOCK_VNC": 0,
}

SERVICE_DEFAULTS: dict[str, object] = {
    "LOG_LEVEL": LogLevel.INFO,
    "GRPC_HOST": "",
    "GRPC_PORT": 7001,
    "GRPC_SERVER_CERT": "",
    "GRPC_SERVER_KEY": "",
    "GRPC_SERVER_CA_CERTS": "",
    "GRPC_CLIENT_CA_CERTS": "",
    "JAEGER_URL": "http://localhost:14268/api/traces",
    "INSTANCE_ID": "",
}

BOOL_FIELDS = [k for k, v in QEMU_DEFAULTS.items() if isinstance(v, bool)]
INT_FIELDS = [k for k, v in QEMU_DEFAULTS.items() if isinstance(v, int) and not isinstance(v, bool)]
STR_FIELDS = [k for k, v in QEMU_DEFAULTS.items() if isinstance(v, str)]


RESOLVED_PATHS = {"TMP_FILE_LOC", "STATE_DIR"}
"""Relative paths the daemon resolves once at start (absolute from then on)."""


def _as_loaded(name: str, value: object) -> object:
    return os.path.abspath(str(value)) if name in RESOLVED_PATHS else value


def test_qemu_defaults() -> None:
    qemu = load_settings().qemu
    for name, default in QEMU_DEFAULTS.items():
        assert getattr(qemu, name) == _as_loaded(name, default), name


def test_service_defaults() -> None:
    settings = load_settings()
    for name, default in SERVICE_DEFAULTS.items():
        assert getattr(settings.service, name) == default, name


def test_every_original_variable_is_a_field() -> None:
    assert set(QEMU_DEFAULTS) <= set(QemuSettings.model_fields)
    assert set(SERVICE_DEFAULTS) <= set(ServiceSettings.model_fields)


@pytest.mark.parametrize("name", STR_FIELDS)
def test_string_variables_are_honoured(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv(f"MANAGER_QEMU_{name}", "custom-value")
    assert getattr(load_settings().qemu, name) == _as_loaded(name, "custom-value")


@pytest.mark.parametrize("name", INT_FIELDS)
def test_integer_variables_are_honoured(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv(f"MANAGER_QEMU_{name}", "42")
    assert getattr(load_settings().qemu, name) == 42


@pytest.mark.parametrize("name", BOOL_FIELDS)
@pytest.mark.parametrize(
    ("text", "value"),
    [(t, True) for t in ("1", "t", "T", "TRUE", "true", "True")]
    + [(f, False) for f in ("0", "f", "F", "FALSE", "false", "False")],
)
def test_boolean_spellings(
    monkeypatch: pytest.MonkeyPatch, name: str, text: str, value: bool
) -> None:
    monkeypatch.setenv(f"MANAGER_QEMU_{name}", text)
    assert getattr(load_settings().qemu, name) is value


@pytest.mark.parametrize("text", ["yes", "no", "on", "off", "tRUE", " true", "2", "y"])
def test_booleans_the_original_refuses(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setenv("MANAGER_QEMU_ENABLE_KVM", text)
    with pytest.raises(SettingsError, match="MANAGER_QEMU_ENABLE_KVM") as info:
        load_settings()
    assert repr(text) in str(info.value)


@pytest.mark.parametrize(
    ("text", "value"), [("+7", 7), ("-3", -3), ("007", 7), ("2147483647", 2**31 - 1)]
)
def test_integers_parse_base_10(monkeypatch: pytest.MonkeyPatch, text: str, value: int) -> None:
    monkeypatch.setenv("MANAGER_QEMU_SMP_COUNT", text)
    assert load_settings().qemu.SMP_COUNT == value


@pytest.mark.parametrize("text", ["4x", "0x10", "1_000", "1.5", " 4", "2147483648", "four"])
def test_integers_the_original_refuses(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setenv("MANAGER_QEMU_SMP_COUNT", text)
    with pytest.raises(SettingsError, match="MANAGER_QEMU_SMP_COUNT"):
        load_settings()


def test_set_but_empty_takes_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MANAGER_QEMU_CPU", "")
    monkeypatch.setenv("MANAGER_QEMU_SMP_COUNT", "")
    monkeypatch.setenv("MANAGER_QEMU_ENABLE_KVM", "")
    qemu = load_settings().qemu
    assert (qemu.CPU, qemu.SMP_COUNT, qemu.ENABLE_KVM) == ("EPYC", 4, True)


@pytest.mark.parametrize(
    ("name", "text", "attr", "value"),
    [
        ("MANAGER_LOG_LEVEL", "debug", "LOG_LEVEL", LogLevel.DEBUG),
        ("MANAGER_LOG_LEVEL", "warn", "LOG_LEVEL", LogLevel.WARN),
        ("MANAGER_GRPC_HOST", "127.0.0.1", "GRPC_HOST", "127.0.0.1"),
        ("MANAGER_GRPC_PORT", "7100", "GRPC_PORT", 7100),
        ("MANAGER_GRPC_SERVER_CERT", "c.pem", "GRPC_SERVER_CERT", "c.pem"),
        ("MANAGER_GRPC_SERVER_KEY", "k.pem", "GRPC_SERVER_KEY", "k.pem"),
        ("MANAGER_GRPC_SERVER_CA_CERTS", "ca.pem", "GRPC_SERVER_CA_CERTS", "ca.pem"),
        ("MANAGER_GRPC_CLIENT_CA_CERTS", "cca.pem", "GRPC_CLIENT_CA_CERTS", "cca.pem"),
        (
            "COCOS_JAEGER_URL",
            "http://127.0.0.1:4318/v1/traces",
            "JAEGER_URL",
            "http://127.0.0.1:4318/v1/traces",
        ),
        ("MANAGER_INSTANCE_ID", "host-7", "INSTANCE_ID", "host-7"),
    ],
)
def test_service_variables_are_honoured(
    monkeypatch: pytest.MonkeyPatch, name: str, text: str, attr: str, value: object
) -> None:
    monkeypatch.setenv(name, text)
    assert getattr(load_settings().service, attr) == value


@pytest.mark.parametrize("text", ["trace", "INFO", "warning", "fatal"])
def test_log_level_refuses_other_names(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setenv("MANAGER_LOG_LEVEL", text)
    with pytest.raises(SettingsError, match="MANAGER_LOG_LEVEL"):
        load_settings()


def test_instance_id_is_generated_when_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = load_settings().instance_id, load_settings().instance_id
    assert first and second and first != second
    monkeypatch.setenv("MANAGER_INSTANCE_ID", "fixed")
    assert load_settings().instance_id == "fixed"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30.0), ("1m30s", 90.0), ("250ms", 0.25), ("1.5h", 5400.0), ("0", 0.0)],
)
def test_stop_timeout_is_a_go_duration(
    monkeypatch: pytest.MonkeyPatch, text: str, seconds: float
) -> None:
    monkeypatch.setenv("MANAGER_QEMU_STOP_TIMEOUT", text)
    assert load_settings().qemu.STOP_TIMEOUT == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["30", "s", "1x", "-1s", "1m 30s"])
def test_bad_durations_are_refused(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setenv("MANAGER_QEMU_STOP_TIMEOUT", text)
    with pytest.raises(SettingsError, match="MANAGER_QEMU_STOP_TIMEOUT"):
        load_settings()


def test_port_additions(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().qemu.HOST_FWD_RANGE is None
    assert load_settings().qemu.AGENT_CHANNEL is AgentChannel.VSOCK
    monkeypatch.setenv("MANAGER_QEMU_HOST_FWD_RANGE", "6100-6200")
    monkeypatch.setenv("MANAGER_QEMU_AGENT_CHANNEL", "fw_cfg")
    qemu = load_settings().qemu
    assert qemu.HOST_FWD_RANGE == PortRange(6100, 6200)
    assert qemu.AGENT_CHANNEL is AgentChannel.FW_CFG


@pytest.mark.parametrize("text", ["6200-6100", "0-10", "6100", "a-b", "6100-70000"])
def test_bad_port_ranges(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setenv("MANAGER_QEMU_HOST_FWD_RANGE", text)
    with pytest.raises(SettingsError, match="MANAGER_QEMU_HOST_FWD_RANGE"):
        load_settings()


# -- hardening: paths resolved once, out-of-range numbers refused ---------------------------


def test_relative_paths_are_resolved_once_at_load(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A restart from another working directory finds the same state and per-VM files."""
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    monkeypatch.setenv("MANAGER_STATE_DIR", "state")
    monkeypatch.setenv("MANAGER_QEMU_TMP_FILE_LOC", "../vms")
    monkeypatch.chdir(first)
    settings = load_settings()
    assert settings.service.STATE_DIR == str(first / "state")
    assert settings.qemu.TMP_FILE_LOC == str(tmp_path / "vms")
    monkeypatch.chdir(second)
    assert settings.service.STATE_DIR == str(first / "state")  # a loaded value stays put
    assert load_settings().service.STATE_DIR == str(second / "state")
    monkeypatch.setenv("MANAGER_STATE_DIR", str(first / "state"))
    assert load_settings().service.STATE_DIR == str(first / "state")


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("MANAGER_METRICS_PORT", "65536"),
        ("MANAGER_METRICS_PORT", "-1"),
        ("MANAGER_GRPC_PORT", "65536"),
        ("MANAGER_LOG_RETENTION", "-1s"),
        ("MANAGER_QEMU_VSOCK_GUEST_CID", "-3"),
        ("MANAGER_QEMU_VSOCK_GUEST_CID", "2"),
        ("MANAGER_QEMU_VSOCK_VNC", "-1"),
        ("MANAGER_QEMU_VSOCK_VNC", "59636"),
        ("MANAGER_GRPC_MAX_MESSAGE_SIZE", "0"),
        ("MANAGER_EVENTS_MAX_SUBSCRIBERS", "-1"),
        ("MANAGER_EVENTS_QUEUE_BYTES", "0"),
        ("MANAGER_EVENTS_HOLD_TIMEOUT", "-1s"),
        ("MANAGER_AGENT_MAX_CONNECTIONS_PER_CID", "-1"),
        ("MANAGER_QEMU_PASS_ENV", "GOOD,not-a-name"),
    ],
)
def test_out_of_range_values_stop_start_up_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, text: str
) -> None:
    monkeypatch.setenv(name, text)
    with pytest.raises(SettingsError, match=f"^invalid value for {name}: "):
        load_settings()


def test_edge_values_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MANAGER_METRICS_PORT", "65535")
    monkeypatch.setenv("MANAGER_QEMU_VSOCK_GUEST_CID", "3")
    monkeypatch.setenv("MANAGER_QEMU_VSOCK_VNC", "59635")
    settings = load_settings()
    assert settings.service.METRICS_PORT == 65535
    assert (settings.qemu.VSOCK_GUEST_CID, settings.qemu.VSOCK_VNC) == (3, 59635)


def test_hardening_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings()
    service, qemu = settings.service, settings.qemu
    assert service.GRPC_MAX_MESSAGE_SIZE == 8 * 1024 * 1024
    assert service.METRICS_HOST == ""
    assert (qemu.HOST_FWD_ADDR, qemu.VNC_ADDR, qemu.PASS_ENV) == ("", "", ())
    monkeypatch.setenv("MANAGER_QEMU_PASS_ENV", " LD_LIBRARY_PATH, ,QEMU_AUDIO_DRV")
    assert load_settings().qemu.PASS_ENV == ("LD_LIBRARY_PATH", "QEMU_AUDIO_DRV")


# --- COCOS_JAEGER_URL and unknown variables -------------------------------------------------


@pytest.mark.parametrize("text", ["off", "OFF", "none", "disabled", "false"])
def test_tracing_can_be_turned_off(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setenv("COCOS_JAEGER_URL", text)
    assert load_settings().service.JAEGER_URL == "off"


def test_empty_jaeger_url_keeps_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COCOS_JAEGER_URL", "")
    assert load_settings().service.JAEGER_URL == "http://localhost:14268/api/traces"


@pytest.mark.parametrize(
    "text", ["localhost:14268/api/traces", "ftp://collector/api/traces", "http://", "jaeger"]
)
def test_a_jaeger_url_that_is_not_http_is_refused(
    monkeypatch: pytest.MonkeyPatch, text: str
) -> None:
    monkeypatch.setenv("COCOS_JAEGER_URL", text)
    with pytest.raises(SettingsError, match=r"^invalid value for COCOS_JAEGER_URL: ") as info:
        load_settings()
    assert "'off'" in str(info.value)


def test_unknown_variables_get_the_closest_known_name() -> None:
    from cocos_manager.config.unknown import known_variables, unknown_variables

    env = {
        "MANAGER_QEMU_MEMORY": "1G",
        "MANAGER_QEMU_AGENT_CHANEL": "fw_cfg",
        "MANAGER_QEMU_ENABLE_SEVSNP": "false",
        "MANAGER_WHATEVER": "1",
        "MANAGER_QEMU_CPU": "max",  # known
        "MANAGER_GRPC_URL": "localhost:7011",  # the dial-out client's, known
        "MANAGER_GRPC_CLIENT_CERT": "c.pem",
        "PATH": "/bin",
    }
    found = {u.name: u.closest for u in unknown_variables(env)}
    assert found == {
        "MANAGER_QEMU_MEMORY": "MANAGER_QEMU_MEMORY_SIZE",
        "MANAGER_QEMU_AGENT_CHANEL": "MANAGER_QEMU_AGENT_CHANNEL",
        "MANAGER_QEMU_ENABLE_SEVSNP": "MANAGER_QEMU_ENABLE_SEV_SNP",
        "MANAGER_WHATEVER": None,
    }
    assert {"COCOS_JAEGER_URL", "MANAGER_QEMU_VSOCK_VNC", "MANAGER_STATE_DIR"} <= known_variables()


def test_settings_come_from_the_environment_only(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """As the original read them: an env file in the working directory is not read (the
    models' one source of values is the environment)."""
    (tmp_path / ".env").write_text("MANAGER_QEMU_CPU=from-dotenv\nMANAGER_GRPC_PORT=1234\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MANAGER_QEMU_CPU", raising=False)
    monkeypatch.delenv("MANAGER_GRPC_PORT", raising=False)
    settings = load_settings()
    assert settings.qemu.CPU == "EPYC" and settings.service.GRPC_PORT == 7001
    monkeypatch.setenv("MANAGER_QEMU_CPU", "from-env")
    assert load_settings().qemu.CPU == "from-env"
