"""Per-VM files under MANAGER_QEMU_TMP_FILE_LOC: kernel, rootfs, OVMF vars, manifest, QMP socket.

Kernel and rootfs are only read by QEMU, so each VM gets a hard link (or a reflink, or as a
last resort a copy): preparing a VM costs the same for a 1 MB and a 512 MB image. The OVMF
vars file is written by the guest, so it is always a private copy (reflink where possible).
Whatever fails half-way removes what it made: a failed Run leaves no file behind.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from cocos_manager.confidential.modes import uses_bios
from cocos_manager.config.settings import QemuSettings
from cocos_manager.errors import FailedPreconditionError, ManagerError, ResourceExhaustedError
from cocos_manager.qemu.argv import vm_file_paths
from cocos_manager.qemu.console_file import ConsoleFiles
from cocos_manager.telemetry.logging import get_logger

_FICLONE = 0x40049409  # linux/fs.h
_log = get_logger()


def required_images(q: QemuSettings) -> dict[str, str]:
    """The host files a VM needs, by the variable that names them."""
    images = {
        "MANAGER_QEMU_DISK_IMG_KERNEL_FILE": q.DISK_IMG_KERNEL_FILE,
        "MANAGER_QEMU_DISK_IMG_ROOTFS_FILE": q.DISK_IMG_ROOTFS_FILE,
    }
    if uses_bios(q):  # upstream SEV-SNP and TDX: one firmware image, no pflash drives
        images["MANAGER_QEMU_BIOS_FILE"] = q.BIOS_FILE
        return images
    images["MANAGER_QEMU_OVMF_CODE_FILE"] = q.OVMF_CODE_FILE
    if not q.KERNEL_HASH:
        images["MANAGER_QEMU_OVMF_VARS_FILE"] = q.OVMF_VARS_FILE
    return images


def check_images(q: QemuSettings) -> None:
    for variable, path in required_images(q).items():
        if not os.path.isfile(path):
            raise FailedPreconditionError(f"{variable}: {path!r} does not exist or is not a file")
        if not os.access(path, os.R_OK):
            raise FailedPreconditionError(f"{variable}: {path!r} is not readable")


PRIVATE_MODE = 0o600
"""Mode of every file the manager writes for a VM, whatever the daemon's umask: OVMF vars
hold the guest's UEFI variables and the manifest names its keys and peers."""


def _create_private(path: str) -> int:
    """A new file, 0600 even under a umask such as 0 or 0277 (the mode is set, not masked)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, PRIVATE_MODE)
    try:
        os.fchmod(fd, PRIVATE_MODE)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    return fd


def _reflink(src: str, dst: str) -> None:
    with open(src, "rb") as source, os.fdopen(_create_private(dst), "wb") as target:
        try:
            fcntl.ioctl(target.fileno(), _FICLONE, source.fileno())
        except OSError:
            target.close()
            os.unlink(dst)
            raise


def _copy(src: str, dst: str) -> None:
    # Made private first; copyfile then writes into that inode (keeping its mode) with the
    # kernel's fast copy.
    os.close(_create_private(dst))
    try:
        shutil.copyfile(src, dst)
    except BaseException:
        os.unlink(dst)
        raise


def _private_copy(src: str, dst: str) -> str:
    try:
        _reflink(src, dst)
        return "reflink"
    except OSError:
        _copy(src, dst)
        return "copy"


class WouldCopy(Exception):
    """A shared image cannot be hard-linked: preparing the files would copy it."""


def _shared_link(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:
        raise WouldCopy(src) from None
    return "hardlink"


def _shared_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
        return "hardlink"
    except OSError:
        return _private_copy(src, dst)


def _storage_error(variable: str, path: Path, error: OSError) -> ManagerError:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhaustedError(
            f"{variable}: no space left for per-VM files in {str(path)!r}"
        )
    return FailedPreconditionError(
        f"{variable}: cannot write per-VM files in {str(path)!r}: {error.strerror}"
    )


@dataclass
class VmFiles:
    """What one VM owns on disk. remove() is idempotent."""

    directory: Path
    paths: dict[str, Path] = field(default_factory=dict)
    methods: dict[str, str] = field(default_factory=dict)

    @property
    def qmp_socket(self) -> Path:
        return self.paths["qmp"]

    @property
    def manifest(self) -> Path | None:
        return self.paths.get("manifest")

    def console(self, max_bytes: int) -> ConsoleFiles:
        """QEMU's output as its keeper writes it (console_file.py), MAX_BYTES at most."""
        return ConsoleFiles(self.paths["console"], max_bytes)

    def remove(self) -> None:
        """Best effort, never raises: it runs on every release path, where an error would hide
        the real one or keep the VM's numbers held. A read-only TMP_FILE_LOC answers EROFS even
        for a file that was never made, so only a file still there is worth a warning."""
        for path in self.paths.values():
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as error:
                if os.path.lexists(path):
                    _log.warning(
                        "cannot remove a per-VM file", path=str(path), error=error.strerror
                    )


def vm_paths(q: QemuSettings, vm_uuid: str, *, with_manifest: bool) -> dict[str, Path]:
    tmp = Path(q.TMP_FILE_LOC)
    paths = vm_file_paths(q, vm_uuid)
    paths["qmp"] = tmp / f"qmp-{vm_uuid}.sock"
    paths["console"] = tmp / f"console-{vm_uuid}.log"  # written by the VM's console keeper
    paths["console_rotated"] = tmp / f"console-{vm_uuid}.log.1"
    if with_manifest:
        paths["manifest"] = tmp / f"agent-config-{vm_uuid}.json"
    return paths


def check_tmp_dir(q: QemuSettings) -> Path:
    """Creates TMP_FILE_LOC if missing."""
    tmp = Path(q.TMP_FILE_LOC)
    try:
        tmp.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as error:
        raise _storage_error("MANAGER_QEMU_TMP_FILE_LOC", tmp, error) from None
    return tmp


def prepare_vm_files(
    q: QemuSettings, vm_uuid: str, manifest: bytes | None, *, copy_shared: bool = True
) -> VmFiles:
    """Blocking (may copy a large image): run it in a worker thread. With copy_shared=False it
    only links kernel and rootfs (a few system calls, fine on the event loop) and raises
    WouldCopy, leaving nothing behind, where one of them would need a copy."""
    tmp = check_tmp_dir(q)
    files = VmFiles(directory=tmp)
    planned = vm_paths(q, vm_uuid, with_manifest=manifest is not None)
    try:
        for name, src, how in (
            ("kernel", q.DISK_IMG_KERNEL_FILE, _shared_copy if copy_shared else _shared_link),
            ("rootfs", q.DISK_IMG_ROOTFS_FILE, _shared_copy if copy_shared else _shared_link),
            ("ovmf_vars", q.OVMF_VARS_FILE, _private_copy),
        ):
            if name in planned:
                files.paths[name] = planned[name]
                files.methods[name] = how(src, str(planned[name]))
        if manifest is not None:
            files.paths["manifest"] = planned["manifest"]
            with os.fdopen(_create_private(str(planned["manifest"])), "wb") as out:
                out.write(manifest)
        for name in ("qmp", "console", "console_rotated"):
            files.paths[name] = planned[name]
    except OSError as error:
        files.remove()
        raise _storage_error("MANAGER_QEMU_TMP_FILE_LOC", tmp, error) from None
    except BaseException:
        files.remove()
        raise
    return files
