"""`cocos-manager check` on a correctly set-up upstream SEV-SNP host (QEMU 9.1+,
MANAGER_QEMU_SEV_SNP_SYNTAX=upstream) failed: its QEMU probe still required the old fork's
memory-backend-memfd-private ("set MANAGER_QEMU_ENABLE_SEV_SNP=false"), and it checked the
pflash OVMF files the upstream line does not use instead of MANAGER_QEMU_BIOS_FILE (found in
review, with Debian's QEMU 10.0 from bookworm-backports)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cocos_manager.check import check_files
from cocos_manager.config.settings import load_settings
from cocos_manager.qemu.probes import check_qemu

# What QEMU 10's help listings say, trimmed to what the probe looks for.
LISTINGS = {
    "-version": "QEMU emulator version 10.0.2\n",
    "-object": "List of user creatable objects:\n  memory-backend-memfd\n  sev-guest\n"
    "  sev-snp-guest\n",
    "-device": 'Network devices:\nname "virtio-net-pci", bus PCI\nname "vhost-vsock-pci"\n',
    "-machine": "Supported machines are:\nq35                  Standard PC\n",
    "-cpu": "Available CPUs:\nx86 EPYC              AMD EPYC Processor\n",
}


def _run(argv: list[str]) -> str:
    return LISTINGS[argv[1]]


def test_upstream_snp_needs_no_fork_object(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MANAGER_QEMU_SEV_SNP_SYNTAX", "upstream")
    checks = check_qemu(load_settings(), _run)
    assert [c for c in checks if c.status == "fail"] == []


def test_the_seed_syntax_still_needs_it(monkeypatch: pytest.MonkeyPatch) -> None:
    checks = check_qemu(load_settings(), _run)
    assert any("memory-backend-memfd-private" in c.detail for c in checks if c.status == "fail")


def test_upstream_snp_checks_the_bios_file_not_pflash(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    bios = tmp_path / "OVMF.fd"
    bios.write_bytes(b"\0")
    monkeypatch.setenv("MANAGER_QEMU_SEV_SNP_SYNTAX", "upstream")
    monkeypatch.setenv("MANAGER_QEMU_BIOS_FILE", str(bios))
    monkeypatch.setenv("MANAGER_QEMU_OVMF_CODE_FILE", str(tmp_path / "absent-code.fd"))
    monkeypatch.setenv("MANAGER_QEMU_OVMF_VARS_FILE", str(tmp_path / "absent-vars.fd"))
    checks = {c.name: c for c in check_files(load_settings())}
    assert checks["bios"].status == "pass"
    assert "ovmf-code" not in checks and "ovmf-vars" not in checks
