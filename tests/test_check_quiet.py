"""`cocos-manager check` speaks only of what matters: on the README's own TCG block it printed
six WARNs about SEV, SEV-SNP and TDX, which that block turns off, one of them advising
`MANAGER_QEMU_ENABLE_SEV_SNP=false` while it was false. A probe of a feature the settings do not
ask for is `info` (hidden without --verbose), and no advice names a value already set."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from enum import Enum
from pathlib import Path

import pytest

from cocos_manager.check import log_startup_warnings, run_checks
from cocos_manager.config.settings import (
    QemuSettings,
    ServiceSettings,
    Settings,
    env_name,
    load_settings,
)
from cocos_manager.host.check_result import Check, hidden_note, render
from cocos_manager.host.probes import Host
from cocos_manager.qemu.probes import check_qemu
from tests.support.readme import env_block

EXE = str(Path(sys.executable).with_name("cocos-manager"))


def tcg_env(tmp_path: Path) -> dict[str, str]:
    """The README's TCG block as written, run from a directory with the test guest's files."""
    guest = tmp_path / "build" / "guest"
    guest.mkdir(parents=True)
    (guest / "bzImage").write_bytes(b"kernel")
    (guest / "rootfs.cpio.gz").write_bytes(b"rootfs")
    # The block's port may be held by another daemon on a test host: check binds it (a FAIL
    # there is another test's subject, tests/test_check_refusals.py).
    return {**env_block("tcg", pwd=tmp_path), "MANAGER_GRPC_PORT": "0"}


def run_check(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MANAGER_", "COCOS_"))}
    return subprocess.run(
        [EXE, "check", *args], env={**base, **env}, capture_output=True, text=True, timeout=120
    )


def test_the_readme_tcg_block_gets_a_check_without_warnings(tmp_path: Path) -> None:
    env = tcg_env(tmp_path)
    plain = run_check(env)
    assert plain.returncode == 0, plain.stdout + plain.stderr
    assert not [line for line in plain.stdout.splitlines() if line.startswith(("WARN", "FAIL"))]
    report = json.loads(run_check(env, "--json").stdout)
    status = {c["name"]: c["status"] for c in report}
    # The confidential probes are still made, and reported as what they are.
    for name in ("kvm_amd sev", "kvm_amd sev_snp", "/dev/sev", "kvm_intel tdx", "QEMU tdx-guest"):
        assert status[name] in ("pass", "info"), (name, status[name])
    infos = [c for c in report if c["status"] == "info"]
    verbose = run_check(env, "--verbose").stdout
    for item in infos:  # hidden by default, shown with --verbose
        assert f"  {item['name']}  " not in plain.stdout
        assert re.search(rf"^INFO\s+{re.escape(item['name'])}\s", verbose, re.M), verbose
    if infos:  # said on stderr: stdout stays one check per line
        assert "--verbose shows them" in plain.stderr
    assert all(line.split()[0] in ("PASS", "INFO") for line in verbose.splitlines())


def _value_text(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, Enum):
        return str(value.value)
    return str(value)


def current_values(settings: Settings) -> dict[str, str]:
    values = {}
    for model, instance in ((ServiceSettings, settings.service), (QemuSettings, settings.qemu)):
        for field in type(instance).model_fields:
            values[env_name(model, field)] = _value_text(getattr(instance, field))
    return values


_ADVICE = re.compile(r"\bset (MANAGER_[A-Z0-9_]+)=([^\s,;:)]+)")


def advice_naming_current_values(checks: list[Check], settings: Settings) -> list[str]:
    values = current_values(settings)
    return [
        f"{check.name}: {check.detail}"
        for check in checks
        for name, value in _ADVICE.findall(check.detail)
        if values.get(name) == value
    ]


_PLACES = ("KERNEL_FILE", "ROOTFS_FILE", "TMP_FILE_LOC", "STATE_DIR", "JAEGER_URL", "GRPC_HOST")


@pytest.mark.parametrize(
    "extra",
    [
        None,  # the README's TCG block, as written
        {},  # the defaults: SEV-SNP in the seed's syntax, KVM, vsock
        {"MANAGER_QEMU_ENABLE_SEV_SNP": "false"},
        {"MANAGER_QEMU_ENABLE_SEV_SNP": "false", "MANAGER_QEMU_ENABLE_SEV": "true"},
        {"MANAGER_QEMU_SEV_SNP_SYNTAX": "upstream"},
        {"MANAGER_QEMU_ENABLE_SEV_SNP": "false", "MANAGER_QEMU_ENABLE_TDX": "true"},
    ],
    ids=["readme-tcg", "defaults", "sev-snp-off", "sev", "snp-upstream", "tdx"],
)
def test_advice_never_names_a_value_already_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: dict[str, str] | None
) -> None:
    tcg = tcg_env(tmp_path)
    places = {k: v for k, v in tcg.items() if k.endswith(_PLACES)}
    for name, value in (tcg if extra is None else {**places, **extra}).items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    # A host without SEV, SNP or TDX (whatever this one has): every probe has something to say.
    sys_module = tmp_path / "sys" / "module" / "kvm_intel" / "parameters"
    sys_module.mkdir(parents=True)
    (sys_module / "tdx").write_text("N\n")
    (tmp_path / "dev").mkdir()
    host = Host(dev=tmp_path / "dev", sys_module=tmp_path / "sys" / "module", environ={})
    checks = run_checks(settings, host)
    assert checks, "no checks ran"
    assert advice_naming_current_values(checks, settings) == []


def test_the_tcg_block_has_advice_only_for_what_it_asks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The confidential probes on a host without any of it: info lines, without a fix."""
    for name, value in tcg_env(tmp_path).items():
        monkeypatch.setenv(name, value)
    from cocos_manager.confidential.checks import confidential_host_checks

    results = confidential_host_checks(load_settings().qemu, sys_root=tmp_path)
    assert {status for _, status, _ in results} == {"info"}
    assert not [detail for _, _, detail in results if "set MANAGER_" in detail]


def test_the_seed_snp_failure_names_the_setting_not_the_original(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The defaults ask for SEV-SNP in the seed's syntax; on a QEMU without AMD's fork the line
    says which setting writes those objects and what to change, in the operator's terms."""
    qemu = shutil.which("qemu-system-x86_64")
    assert qemu is not None

    def runner(argv: list[str]) -> str:
        if argv[1:] == ["-version"]:
            return "QEMU emulator version 7.2.22\n"
        return 'name "virtio-net-pci"\nq35\nx86 EPYC\n'

    checks = check_qemu(load_settings(), runner)
    (missing,) = [c for c in checks if "memory-backend-memfd-private" in c.detail]
    assert missing.status == "fail"
    assert "original" not in missing.detail
    assert "MANAGER_QEMU_SEV_SNP_SYNTAX" in missing.detail
    assert "MANAGER_QEMU_ENABLE_SEV_SNP=false" in missing.detail


def test_info_lines_are_not_start_up_warnings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MANAGER_QEMU_ENABLE_SEV_SNP", "false")
    params = tmp_path / "sys" / "module" / "kvm_intel" / "parameters"
    params.mkdir(parents=True)
    (params / "tdx").write_text("N\n")
    (tmp_path / "dev").mkdir()
    host = Host(dev=tmp_path / "dev", sys_module=tmp_path / "sys" / "module", environ={})
    logged: list[tuple[str, dict[str, str]]] = []

    class Log:
        def warning(self, message: str, **fields: str) -> None:
            logged.append((message, fields))

    log_startup_warnings(load_settings(), Log(), host)
    assert not [fields for _, fields in logged if fields["check"] == "tdx"]


def test_render_hides_info_unless_verbose() -> None:
    checks = [Check("a", "pass", "fine"), Check("b", "info", "the host lacks TDX")]
    assert "lacks TDX" not in render(checks, as_json=False)
    assert hidden_note(checks, verbose=False).startswith("1 info line about")
    assert hidden_note(checks, verbose=True) == ""
    assert "INFO  b  the host lacks TDX" in render(checks, as_json=False, verbose=True)
    assert json.loads(render(checks, as_json=True))[1]["status"] == "info"
