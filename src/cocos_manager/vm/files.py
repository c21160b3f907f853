"""Per-VM files under MANAGER_QEMU_TMP_FILE_LOC: kernel, rootfs, OVMF vars, manifest, QMP socket,
and a CreateVm'd VM's 9p shares (a directory of its own).

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
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cocos_manager.confidential import uses_bios
from cocos_manager.config import QemuSettings
from cocos_manager.errors import FailedPreconditionError, ManagerError, ResourceExhaustedError
from cocos_manager.qemu import ConsoleFiles, vm_file_paths
from cocos_manager.telemetry import get_logger

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


def _private_copy(src: str, dst: str) -> str:
    """A private copy: a reflink where the file system shares extents, else the kernel's copy
    into the same new file. One file made, not one per way tried: a failed reflink's file
    unlinked and made again cost two more journalled metadata changes per Run on ext4."""
    with open(src, "rb") as source:
        fd = _create_private(dst)
        try:
            try:
                fcntl.ioctl(fd, _FICLONE, source.fileno())
                return "reflink"
            except OSError:
                _sendfile_all(source.fileno(), fd)
                return "copy"
        except BaseException:
            os.unlink(dst)
            raise
        finally:
            os.close(fd)


def _sendfile_all(source: int, target: int) -> None:
    """The whole source, or an error: a file system without `sendfile` for these files
    (EINVAL, ENOSYS) is copied by reads and writes instead; an image that shrank while it was
    copied (replaced in place) fails the copy rather than give the VM part of it."""
    size, offset = os.fstat(source).st_size, 0
    try:
        while offset < size and (sent := os.sendfile(target, source, offset, size - offset)):
            offset += sent
    except OSError as error:
        if offset or error.errno not in (errno.EINVAL, errno.ENOSYS):
            raise
        while offset < size and (chunk := os.pread(source, min(1 << 20, size - offset), offset)):
            view = memoryview(chunk)
            while view:
                view = view[os.write(target, view) :]
            offset += len(chunk)
    if offset < size:
        raise OSError(errno.EIO, f"the image shrank while it was copied ({offset} of {size} bytes)")


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
    # A CreateVm'd VM's 9p shares (shares_dir). Not among `paths`, which the VM record lists:
    # the record never names what holds the agent's keys. Recovery derives it from the UUID.
    shares: Path | None = None

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
        if self.shares is not None:
            remove_shares(self.shares)


def vm_paths(q: QemuSettings, vm_uuid: str, *, with_manifest: bool) -> dict[str, Path]:
    tmp = Path(q.TMP_FILE_LOC)
    paths = vm_file_paths(q, vm_uuid)
    paths["qmp"] = tmp / f"qmp-{vm_uuid}.sock"
    paths["console"] = tmp / f"console-{vm_uuid}.log"  # written by the VM's console keeper
    paths["console_rotated"] = tmp / f"console-{vm_uuid}.log.1"
    if with_manifest:
        paths["manifest"] = tmp / f"agent-config-{vm_uuid}.json"
    return paths


def launch_dir_problem(where: str) -> str:
    """Why a VM's recorded launch directory (MANAGER_QEMU_TMP_FILE_LOC when it was launched,
    since changed) is not one whose files the daemon may delete or whose QMP socket it may
    trust; "" when it is. As for every path the daemon derives: absolute and normalised, a
    real directory (not a symlink), the daemon's own and writable by nobody else."""
    if not os.path.isabs(where) or os.path.normpath(where) != where:
        return f"{where!r} is not an absolute, normalised path"
    try:
        info = os.lstat(where)
    except OSError as error:
        return f"{where!r}: {error.strerror}"
    if not stat.S_ISDIR(info.st_mode):
        return f"{where!r} is not a directory"
    if info.st_uid != os.geteuid():
        return f"{where!r} is owned by uid {info.st_uid}, not by the daemon's uid {os.geteuid()}"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{where!r} is writable by group or others (mode {stat.S_IMODE(info.st_mode):04o})"
    return ""


def launched_paths(
    q: QemuSettings, vm_uuid: str, where: str, recorded: dict[str, str]
) -> dict[str, Path]:
    """A VM's files in the directory it was launched in (checked by launch_dir_problem): the
    names the settings give, and those the record lists that are directly in that directory
    and name the VM's UUID (a file another setting made, say the OVMF vars copy)."""
    paths = vm_paths(q.model_copy(update={"TMP_FILE_LOC": where}), vm_uuid, with_manifest=True)
    for name, text in recorded.items():
        path = Path(text)
        if name not in paths and path.parent == Path(where) and vm_uuid in path.name:
            paths[name] = path
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


# -- a CreateVm'd VM's 9p shares ------------------------------------------------------------

PRIVATE_DIR_MODE = 0o700
CERTS_SUBDIR, ENV_SUBDIR = "certs", "env"


def shares_dir(q: QemuSettings, vm_uuid: str) -> Path:
    """The VM's own directory of shares: `certs/` (cert.pem, key.pem, ca.pem) and `env/`
    (environment), each exported to the guest by QEMU's 9p server."""
    return Path(q.TMP_FILE_LOC) / f"shares-{vm_uuid}"


def _private_dir(path: Path) -> None:
    """A new directory of the daemon's user only, whatever the umask (set, not masked)."""
    os.mkdir(path, PRIVATE_DIR_MODE)
    os.chmod(path, PRIVATE_DIR_MODE)


def write_shares(
    q: QemuSettings, vm_uuid: str, certs: dict[str, bytes], environment: bytes
) -> Path:
    """Creates the shares readable by the daemon's user only (QEMU, its child or run by root
    through sudo, reads them); all of it or nothing. A few small files: fine on the loop."""
    check_tmp_dir(q)
    root = shares_dir(q, vm_uuid)
    try:
        _private_dir(root)
        try:
            _private_dir(root / CERTS_SUBDIR)
            _private_dir(root / ENV_SUBDIR)
            for name, data in (*certs.items(), (f"{ENV_SUBDIR}/environment", environment)):
                target = root / name if "/" in name else root / CERTS_SUBDIR / name
                with os.fdopen(_create_private(str(target)), "wb") as out:
                    out.write(data)
        except BaseException:
            remove_shares(root)
            raise
    except OSError as error:
        raise _storage_error("MANAGER_QEMU_TMP_FILE_LOC", root.parent, error) from None
    return root


def remove_shares(root: Path) -> None:
    """Best effort and never raises, as VmFiles.remove; a symlink in its place is unlinked,
    never followed (the record cannot name it: the path comes from the UUID)."""
    try:
        info = os.lstat(root)
    except FileNotFoundError:
        return
    except OSError as error:
        _log.warning("cannot remove a VM's shares", path=str(root), error=error.strerror)
        return
    try:
        if stat.S_ISDIR(info.st_mode):
            shutil.rmtree(root)
        else:
            root.unlink()
    except OSError as error:
        if os.path.lexists(root):
            _log.warning("cannot remove a VM's shares", path=str(root), error=error.strerror)


MANIFEST_ROOM = 16 * 1024
"""Room counted for a VM's manifest: a few hundred bytes for a typical request, more with
thousands of datasets."""


@dataclass(frozen=True, slots=True)
class VmRoom:
    """What one VM's files take in TMP_FILE_LOC, and why (for `cocos-manager check`)."""

    needed: int
    parts: tuple[str, ...]


def _blocks(size: int, block: int) -> int:
    return -(-size // block) * block


def room_per_vm(q: QemuSettings, directory: Path) -> VmRoom:
    """Counted as prepare_vm_files makes them in `directory` (TMP_FILE_LOC, or the existing
    parent it will be made in): kernel and rootfs are hard links on the same filesystem and
    copies from another one; OVMF vars are always a copy; the manifest is MANIFEST_ROOM. An
    image that cannot be read counts nothing: its own check says so."""
    device = os.stat(directory).st_dev
    block = os.statvfs(directory).f_frsize or 4096
    needed = _blocks(MANIFEST_ROOM, block)
    parts = []
    planned = vm_file_paths(q, "room")
    sources = {
        "kernel": q.DISK_IMG_KERNEL_FILE,
        "rootfs": q.DISK_IMG_ROOTFS_FILE,
        "ovmf_vars": q.OVMF_VARS_FILE,
    }
    for name, source in sources.items():
        if name not in planned:
            continue
        try:
            info = os.stat(source)
        except OSError:
            continue
        if name != "ovmf_vars" and info.st_dev == device:
            parts.append(f"{name} hard-linked")
            continue
        needed += _blocks(info.st_size, block)
        why = "a private copy" if name == "ovmf_vars" else "copied from another filesystem"
        parts.append(f"{name} {info.st_size} bytes, {why}")
    parts.append(f"manifest up to {MANIFEST_ROOM} bytes")
    return VmRoom(needed, tuple(parts))
