"""Paths that reach QEMU inside an option list (`-drive ...,file=PATH,...`) must double their
commas, or QEMU splits the path into options: a TMP_FILE_LOC or OVMF path with a comma made
every Run fail (found in review)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from cocos_manager.config.settings import QemuSettings
from cocos_manager.qemu.argv import VmResources, derive_vm_settings, qemu_args


def _drives(args: list[str]) -> list[str]:
    return [args[i + 1] for i, arg in enumerate(args) if arg == "-drive"]


def test_pflash_paths_with_commas_are_escaped(tmp_path: Path) -> None:
    tmp = tmp_path / "vms,1"
    code = tmp_path / "fw,x" / "OVMF_CODE.fd"
    base = QemuSettings(TMP_FILE_LOC=str(tmp), OVMF_CODE_FILE=str(code))  # type: ignore[call-arg]
    vm = derive_vm_settings(base, VmResources("u1", 40000, 3, 0))
    drives = _drives(qemu_args(vm))
    assert drives == [
        f"if=pflash,format=raw,unit=0,file={str(code).replace(',', ',,')},readonly=on",
        f"if=pflash,format=raw,unit=1,file={str(tmp).replace(',', ',,')}/OVMF_VARS-u1.fd",
    ]


def test_qemu_opens_the_vars_file_in_a_directory_with_a_comma(tmp_path: Path) -> None:
    """QEMU itself: the drive opens (the run then stops at the missing kernel, not at the drive)."""
    tmp = tmp_path / "vms,1"
    tmp.mkdir()
    (tmp / "OVMF_VARS-u1.fd").write_bytes(Path("/usr/share/OVMF/OVMF_VARS.fd").read_bytes())
    full = derive_vm_settings(
        QemuSettings(TMP_FILE_LOC=str(tmp)),  # type: ignore[call-arg]
        VmResources("u1", 40000, 3, 0),
    )
    drives = _drives(qemu_args(full))
    argv = ["qemu-system-x86_64", "-machine", "q35", "-display", "none", "-S"]
    for drive in drives:
        argv += ["-drive", drive]
    argv += ["-kernel", str(tmp_path / "no-kernel"), "-monitor", "none", "-serial", "none"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0
    assert "Could not open" not in done.stderr, done.stderr
    assert "no-kernel" in done.stderr, done.stderr


def test_romfile_path_with_a_comma_is_escaped() -> None:
    args = qemu_args(QemuSettings(VIRTIO_NET_PCI_ROMFILE="/roms/a,b.rom"))  # type: ignore[call-arg]
    device = next(a for a in args if a.startswith("virtio-net-pci,"))
    assert device.endswith(",romfile=/roms/a,,b.rom")
