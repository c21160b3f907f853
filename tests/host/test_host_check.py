"""`cocos-manager check` and the probes behind it (docs/decisions.md, "Host checks").

Device and sysfs probes run against a fake /dev and /sys/module made in the test, so each
finding is shown whatever this host has; the QEMU probes run the real qemu-system-x86_64;
the command itself runs as the installed console script.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from cocos_manager.check import (
    check_directories,
    check_files,
    check_ports,
    run_checks,
    startup_checks,
)
from cocos_manager.config.settings import Settings, load_settings
from cocos_manager.host.check_result import Check, exit_code, render
from cocos_manager.host.probes import Host, kvm_creates_vm
from cocos_manager.qemu.probes import check_qemu, check_sudo

EXE = str(Path(sys.executable).with_name("cocos-manager"))
REPO = Path(__file__).resolve().parents[2]
GUEST = REPO / "build" / "guest"


def settings(monkeypatch: pytest.MonkeyPatch, **env: str) -> Settings:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return load_settings()


def fake_host(
    tmp_path: Path,
    *,
    devices: tuple[str, ...] = (),
    params: dict[str, str] | None = None,
    modules: tuple[str, ...] = (),
    guest: bool = False,
    environ: dict[str, str] | None = None,
) -> Host:
    dev, sysmod = tmp_path / "dev", tmp_path / "sys" / "module"
    dev.mkdir(parents=True, exist_ok=True)
    sysmod.mkdir(parents=True, exist_ok=True)
    for name in devices:
        (dev / name).write_bytes(b"")
    for module in modules:
        (sysmod / module).mkdir(exist_ok=True)
    for path, value in (params or {}).items():
        module, name = path.split(".")
        (sysmod / module / "parameters").mkdir(parents=True, exist_ok=True)
        (sysmod / module / "parameters" / name).write_text(value + "\n")
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"flags\t\t: fpu vme sse2{' hypervisor' if guest else ''} svm\n")
    return Host(dev=dev, sys_module=sysmod, cpuinfo=cpuinfo, environ=environ or {})


def by_name(checks: list[Check], name: str) -> list[Check]:
    return [c for c in checks if c.name == name]


def one(checks: list[Check], name: str) -> Check:
    (found,) = by_name(checks, name)
    return found


# -- KVM ------------------------------------------------------------------------------------


def test_kvm_asked_for_but_missing_fails_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    check = one(startup_checks(settings(monkeypatch), fake_host(tmp_path)), "kvm")
    assert check.status == "fail"
    assert "MANAGER_QEMU_ENABLE_KVM=true" in check.detail
    assert "/dev/kvm is missing" in check.detail
    assert "MANAGER_QEMU_ENABLE_KVM=false" in check.detail


def test_kvm_that_cannot_make_a_vm_fails(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A regular file opens, but the KVM ioctls fail on it.
    host = fake_host(tmp_path, devices=("kvm",), modules=("kvm_amd",))
    check = one(startup_checks(settings(monkeypatch), host), "kvm")
    assert check.status == "fail" and "MANAGER_QEMU_ENABLE_KVM=false" in check.detail


def test_kvm_off_passes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    s = settings(monkeypatch, MANAGER_QEMU_ENABLE_KVM="false")
    check = one(startup_checks(s, fake_host(tmp_path)), "kvm")
    assert check.status == "pass" and "TCG" in check.detail


def test_a_working_kvm_without_kvm_amd_or_intel_warns(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """This host's case: /dev/kvm makes VMs, but no hardware KVM module backs it (nested)."""
    host = replace(fake_host(tmp_path, devices=("kvm",)), kvm_probe=lambda path: None)
    check = one(startup_checks(settings(monkeypatch), host), "kvm")
    assert check.status == "warn"
    assert "neither kvm_amd nor kvm_intel" in check.detail
    assert "MANAGER_QEMU_ENABLE_KVM=false" in check.detail
    nested = replace(
        fake_host(tmp_path / "n", modules=("kvm_amd",), guest=True), kvm_probe=lambda p: None
    )
    check = one(startup_checks(settings(monkeypatch), nested), "kvm")
    assert check.status == "warn" and "nested" in check.detail
    bare_metal = replace(fake_host(tmp_path / "b", modules=("kvm_amd",)), kvm_probe=lambda p: None)
    assert one(startup_checks(settings(monkeypatch), bare_metal), "kvm").status == "pass"


def test_the_real_kvm_probe_on_missing_and_non_kvm_files(tmp_path: Path) -> None:
    assert kvm_creates_vm(tmp_path / "kvm") == "is missing"
    (tmp_path / "kvm").write_bytes(b"")
    assert (kvm_creates_vm(tmp_path / "kvm") or "").startswith("cannot create a VM")


# -- the agent channel ------------------------------------------------------------------------


def test_vsock_without_vhost_vsock_fails_and_names_fw_cfg(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    check = one(startup_checks(settings(monkeypatch), fake_host(tmp_path)), "agent-channel")
    assert check.status == "fail"
    assert "/dev/vhost-vsock is missing" in check.detail
    assert "MANAGER_QEMU_AGENT_CHANNEL=fw_cfg" in check.detail


def test_vsock_with_the_device_passes_and_fw_cfg_needs_none(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    host = fake_host(tmp_path, devices=("vhost-vsock",))
    assert one(startup_checks(settings(monkeypatch), host), "agent-channel").status == "pass"
    s = settings(monkeypatch, MANAGER_QEMU_AGENT_CHANNEL="fw_cfg")
    check = one(startup_checks(s, fake_host(tmp_path / "bare")), "agent-channel")
    assert check.status == "pass" and "fw_cfg" in check.detail


# -- SEV, SEV-SNP, TDX --------------------------------------------------------------------------


def test_snp_by_default_on_a_host_without_it_fails(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    check = one(startup_checks(settings(monkeypatch), fake_host(tmp_path)), "sev-snp")
    assert check.status == "fail"
    assert "MANAGER_QEMU_ENABLE_SEV_SNP=true (the default)" in check.detail
    assert "kvm_amd is not loaded" in check.detail and "/sev is missing" in check.detail
    assert "MANAGER_QEMU_ENABLE_SEV_SNP=false" in check.detail


def test_snp_disabled_in_kvm_amd_fails(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    host = fake_host(tmp_path, devices=("sev",), params={"kvm_amd.sev_snp": "N"})
    check = one(startup_checks(settings(monkeypatch), host), "sev-snp")
    assert check.status == "fail" and "sev_snp is N" in check.detail


def test_snp_on_a_host_with_it_passes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    host = fake_host(tmp_path, devices=("sev",), params={"kvm_amd.sev_snp": "Y"})
    assert one(startup_checks(settings(monkeypatch), host), "sev-snp").status == "pass"


def test_plain_sev(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    s = settings(monkeypatch, MANAGER_QEMU_ENABLE_SEV_SNP="false", MANAGER_QEMU_ENABLE_SEV="true")
    check = one(startup_checks(s, fake_host(tmp_path)), "sev")
    assert check.status == "fail" and "MANAGER_QEMU_ENABLE_SEV=false" in check.detail
    host = fake_host(tmp_path / "amd", devices=("sev",), params={"kvm_amd.sev": "1"})
    assert one(startup_checks(s, host), "sev").status == "pass"


def test_confidential_off_reports_what_the_host_offers(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    s = settings(monkeypatch, MANAGER_QEMU_ENABLE_SEV_SNP="false")
    host = fake_host(tmp_path, params={"kvm_amd.sev_snp": "Y", "kvm_intel.tdx": "N"})
    checks = startup_checks(s, host)
    check = one(checks, "confidential")
    assert check.status == "pass" and "not confidential" in check.detail
    assert "SEV-SNP" in check.detail
    assert one(checks, "tdx").detail.startswith("kvm_intel tdx=N")


# -- listening, unknown variables ---------------------------------------------------------------


def test_all_interfaces_without_tls_warns(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    check = one(startup_checks(settings(monkeypatch), fake_host(tmp_path)), "grpc-listen")
    assert check.status == "warn"
    assert "all interfaces without TLS" in check.detail and "MANAGER_GRPC_HOST" in check.detail
    s = settings(monkeypatch, MANAGER_GRPC_HOST="127.0.0.1")
    assert one(startup_checks(s, fake_host(tmp_path)), "grpc-listen").status == "pass"


def test_unknown_variables_warn_with_the_closest_name(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env = {"MANAGER_QEMU_MEMORY": "1G", "MANAGER_QEMU_AGENT_CHANEL": "fw_cfg", "HOME": "/"}
    checks = by_name(
        startup_checks(settings(monkeypatch), fake_host(tmp_path, environ=env)),
        "unknown-variable",
    )
    assert [c.status for c in checks] == ["warn", "warn"]
    assert [c.detail for c in checks] == [
        "MANAGER_QEMU_AGENT_CHANEL is not a setting of the manager and is ignored; "
        "did you mean MANAGER_QEMU_AGENT_CHANNEL?",
        "MANAGER_QEMU_MEMORY is not a setting of the manager and is ignored; "
        "did you mean MANAGER_QEMU_MEMORY_SIZE?",
    ]


# -- QEMU -----------------------------------------------------------------------------------------


def test_debian_qemu_lacks_the_originals_snp_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    checks = check_qemu(settings(monkeypatch))
    assert one(checks, "qemu").status == "pass"
    assert one(checks, "qemu").detail.split(", QEMU ")[1][0].isdigit()
    missing = {c.detail for c in by_name(checks, "qemu-object")}
    assert any("'memory-backend-memfd-private'" in d for d in missing)
    assert all("MANAGER_QEMU_ENABLE_SEV_SNP=false" in d for d in missing)


def test_tcg_settings_pass_every_qemu_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    s = settings(
        monkeypatch,
        MANAGER_QEMU_ENABLE_KVM="false",
        MANAGER_QEMU_ENABLE_SEV_SNP="false",
        MANAGER_QEMU_CPU="max",
        MANAGER_QEMU_AGENT_CHANNEL="fw_cfg",
    )
    checks = check_qemu(s)
    assert [c.status for c in checks] == ["pass", "pass"], checks
    assert "cpu max" in checks[1].detail and "machine q35" in checks[1].detail


def test_epyc_under_tcg_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    s = settings(monkeypatch, MANAGER_QEMU_ENABLE_KVM="false", MANAGER_QEMU_ENABLE_SEV_SNP="false")
    check = one(check_qemu(s), "qemu-cpu")
    assert check.status == "warn" and "MANAGER_QEMU_CPU=max" in check.detail


def test_missing_qemu_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    s = settings(monkeypatch, MANAGER_QEMU_BIN_PATH="no-such-qemu")
    (check,) = check_qemu(s)
    assert check.status == "fail" and "MANAGER_QEMU_BIN_PATH=no-such-qemu" in check.detail


def test_sudo_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    s = settings(monkeypatch, MANAGER_QEMU_USE_SUDO="true")
    denied = check_sudo(s, lambda argv: "sudo: a password is required\n")
    assert denied is not None and denied.status == "fail" and "NOPASSWD" in denied.detail
    assert "closefrom_override" in denied.detail and "-C 4" in denied.detail

    def allowed(kill: bool) -> Callable[[list[str]], str]:
        def run(argv: list[str]) -> str:
            if argv[-1] == "-version":
                assert argv[:5] == ["sudo", "-n", "-C", "4", "--"]
                return "QEMU emulator version 7.2.22\n"
            return "KILL\n" if kill else "sudo: a password is required\n"

        return run

    passed = check_sudo(s, allowed(kill=True))
    assert passed is not None and passed.status == "pass", passed
    warned = check_sudo(s, allowed(kill=False))
    assert warned is not None and warned.status == "warn" and "kill" in warned.detail
    assert check_sudo(settings(monkeypatch, MANAGER_QEMU_USE_SUDO="false")) is None

    def no_sudo(argv: list[str]) -> str:
        raise FileNotFoundError(argv[0])

    missing = check_sudo(s, no_sudo)
    assert missing is not None and "sudo is not installed" in missing.detail


# -- files, directories, ports --------------------------------------------------------------------


def test_missing_kernel_and_rootfs_say_where_to_get_them(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    checks = check_files(settings(monkeypatch, MANAGER_QEMU_DISK_IMG_KERNEL_FILE=str(tmp_path)))
    kernel = one(checks, "kernel")
    assert kernel.status == "fail" and "make guest" in kernel.detail
    assert "Cocos" in one(checks, "rootfs").detail


def test_directories_must_be_writable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    s = settings(
        monkeypatch,
        MANAGER_QEMU_TMP_FILE_LOC=str(blocker / "vms"),
        MANAGER_STATE_DIR=str(tmp_path / "new" / "state"),
    )
    tmp_check, state_check = check_directories(s)
    assert tmp_check.status == "fail" and "MANAGER_QEMU_TMP_FILE_LOC" in tmp_check.detail
    assert state_check.status == "pass" and "will be made in" in state_check.detail


def test_a_port_range_with_nothing_free_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as taken:
        taken.bind(("", 0))
        port = taken.getsockname()[1]
        s = settings(monkeypatch, MANAGER_QEMU_HOST_FWD_RANGE=f"{port}-{port}")
        check = check_ports(s)
    assert check.status == "fail" and "MANAGER_QEMU_HOST_FWD_RANGE" in check.detail


def test_render_and_exit_code() -> None:
    checks = [Check("a", "pass", "fine"), Check("bb", "warn", "hmm")]
    assert exit_code(checks) == 0
    assert render(checks, False).splitlines() == ["PASS  a   fine", "WARN  bb  hmm"]
    assert exit_code([*checks, Check("c", "fail", "no")]) == 1
    assert json.loads(render(checks, True)) == [
        {"name": "a", "status": "pass", "detail": "fine"},
        {"name": "bb", "status": "warn", "detail": "hmm"},
    ]


# -- the command ----------------------------------------------------------------------------------


def run_check(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MANAGER_", "COCOS_"))}
    return subprocess.run(
        [EXE, "check", *args], env={**base, **env}, capture_output=True, text=True, timeout=60
    )


def test_check_json_with_the_defaults_fails_on_a_host_without_snp(tmp_path: Path) -> None:
    done = run_check({"MANAGER_STATE_DIR": str(tmp_path / "s")}, "--json")
    doc = json.loads(done.stdout)
    assert all(set(item) == {"name", "status", "detail"} for item in doc)
    assert all(item["status"] in ("pass", "info", "warn", "fail") for item in doc)
    names = {item["name"] for item in doc}
    assert {"kvm", "agent-channel", "qemu", "ovmf-code", "kernel", "state-dir"} <= names
    # The kernel is img/bzImage relative to the current directory: not there.
    assert done.returncode == 1
    assert any(i["name"] == "kernel" and i["status"] == "fail" for i in doc)


def test_check_passes_with_the_tcg_settings_and_the_test_guest(tmp_path: Path) -> None:
    env = {
        "MANAGER_QEMU_ENABLE_KVM": "false",
        "MANAGER_QEMU_ENABLE_SEV_SNP": "false",
        "MANAGER_QEMU_CPU": "max",
        "MANAGER_QEMU_MEMORY_SIZE": "512M",
        "MANAGER_QEMU_AGENT_CHANNEL": "fw_cfg",
        "MANAGER_QEMU_DISK_IMG_KERNEL_FILE": str(GUEST / "bzImage"),
        "MANAGER_QEMU_DISK_IMG_ROOTFS_FILE": str(GUEST / "rootfs.cpio.gz"),
        "MANAGER_QEMU_TMP_FILE_LOC": str(tmp_path / "vms"),
        "MANAGER_STATE_DIR": str(tmp_path / "state"),
        "MANAGER_GRPC_HOST": "127.0.0.1",
        "MANAGER_GRPC_PORT": "0",  # check binds it: any free port, whatever holds 7001 here
        "COCOS_JAEGER_URL": "off",
    }
    done = run_check(env)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines and all(line.split()[0] in ("PASS", "WARN") for line in lines)
    assert not any(line.startswith("FAIL") for line in lines)


def test_run_checks_covers_every_area(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    s = settings(monkeypatch, MANAGER_QEMU_USE_SUDO="true")
    names = [c.name for c in run_checks(s, fake_host(tmp_path), run=lambda argv: "")]
    for name in ("kvm", "agent-channel", "sev-snp", "grpc-listen", "qemu", "ovmf-code",
                 "ovmf-vars", "kernel", "rootfs", "tmp-file-loc", "state-dir", "host-ports",
                 "sudo", "tls", "tracing"):  # fmt: skip
        assert name in names, name


def test_tls_settings_are_checked_as_the_daemon_does(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from cocos_manager.check import check_tls

    assert check_tls(settings(monkeypatch)) == Check("tls", "pass", "gRPC without TLS")
    s = settings(monkeypatch, MANAGER_GRPC_SERVER_CERT=str(tmp_path / "missing.pem"))
    check = check_tls(s)
    assert check.status == "fail"
    assert check.detail.startswith("MANAGER_GRPC_SERVER_KEY: not set")
