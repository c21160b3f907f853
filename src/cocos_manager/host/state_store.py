"""VM records on disk, so a restarted daemon can find the VMs an earlier run left behind.

A record is written before anything of the VM exists on disk and removed only once all of it
is gone, so after any crash every per-VM file and process is accounted for. A record names
its process by PID *and* identity (start time and command line): a PID alone can be reused.
Each version is written whole under a new name and made durable (fsync of the file and the
directory, in record_sync.py) before the version it replaces is unlinked, so a power cut at
any instant leaves a complete version of every record: after it, recovery cleans the VM's
files by it (its QEMU died with the host).

Records are not trusted blindly (docs/decisions.md, "Restarts: the records are not trusted"): the
directory must be private to the daemon's user, every field is checked on load (a record that
does not parse or holds nonsense is set aside as `.bad` with one log line), file paths are
derived from the validated UUID and the settings, never read from the record, and each record
names the boot it was written in.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import os
import stat
import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from cocos_manager.errors import FailedPreconditionError
from cocos_manager.host.record_sync import RecordSync, unlink, unlink_soon
from cocos_manager.telemetry import get_logger

RECORD_VERSION = 1
_log = get_logger()
# The states a record can be saved in: machine.VmState without "released" (a released VM has
# no record). Kept here, not imported, because vm/machine.py imports this module; a test checks
# both lists agree.
RECORD_STATES = frozenset({"admitted", "starting", "running", "paused", "stopping"})
_PID_MAX = 1 << 22  # the kernel's PID_MAX_LIMIT on 64-bit
_CID_MAX = 0xFFFFFFFE  # VMADDR_CID_ANY (-1U) is not a guest's
_MAX_RECORD_BYTES = 1 << 20  # a record is a few KiB; anything bigger is not ours
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


@functools.cache
def current_boot_id() -> str:
    """This boot's random id: PIDs and start times (ticks since boot) mean nothing in another."""
    try:
        return _BOOT_ID.read_text().strip()
    except OSError:
        return ""


@dataclass
class VmRecord:
    computation_id: str
    uuid: str
    state: str  # "starting" until the Run has answered, then "running"
    host_port: int
    guest_cid: int
    vnc_display: int
    pid: int = 0
    start_time: int = 0
    argv: list[str] = field(default_factory=list)
    cmdline: list[str] = field(default_factory=list)  # as /proc shows it once QEMU is ready
    # For humans reading the directory only: recovery derives every path from `uuid` and the
    # settings, so an edited record cannot make the daemon delete someone else's file.
    files: dict[str, str] = field(default_factory=dict)
    # MANAGER_QEMU_TMP_FILE_LOC (absolute) when the VM was launched: its files are there even
    # if the setting changed since. Trusted only once recovery has checked the directory.
    tmp_dir: str = ""
    expires_at: float | None = None  # TTL deadline, seconds since the epoch
    boot_id: str = field(default_factory=current_boot_id)  # the boot its PID belongs to
    # What the VM was launched with, for AttestationPolicy (vm/launch.py owns the shape and
    # checks it where it is used); None in records of daemons before it was kept.
    launch: dict[str, Any] | None = None
    version: int = RECORD_VERSION
    # Added with Pause and Get: a pause the operator asked for (not QEMU's halt), the size its
    # Run asked for (0 = the settings'), and the MANAGER_QEMU_* settings it was launched with.
    operator_paused: bool = False
    vcpus: int = 0
    memory_mib: int = 0
    settings: dict[str, str] = field(default_factory=dict)


class BadRecordError(ValueError):
    """A record that does not parse or holds values the daemon never writes."""


def _int_in(doc: dict[str, Any], name: str, low: int, high: int) -> None:
    value = doc[name]
    if type(value) is not int or not low <= value <= high:
        raise BadRecordError(f"{name}: {value!r} is not an integer in {low}..{high}")


def _strings(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(part, str) for part in value)


def validate_record(doc: object, name_uuid: str | None = None) -> VmRecord:
    """The record a file holds, if every field is one the daemon could have written."""
    if not isinstance(doc, dict):
        raise BadRecordError("not a JSON object")
    if doc.get("version") != RECORD_VERSION:
        raise BadRecordError(f"unknown record version {doc.get('version')!r}")
    known = {f.name for f in fields(VmRecord)}
    if unknown := sorted(set(doc) - known):
        raise BadRecordError(f"unknown fields {unknown}")
    required = {"computation_id", "uuid", "state", "host_port", "guest_cid", "vnc_display"}
    if missing := sorted(required - set(doc)):
        raise BadRecordError(f"missing fields {missing}")
    vm_uuid = doc["uuid"]
    try:
        canonical = isinstance(vm_uuid, str) and str(uuid.UUID(vm_uuid)) == vm_uuid
    except ValueError:
        canonical = False
    if not canonical:
        raise BadRecordError(f"uuid: {vm_uuid!r} is not a UUID in canonical form")
    if name_uuid is not None and name_uuid != vm_uuid:
        raise BadRecordError(f"uuid: {vm_uuid!r} is not the one in the file name")
    computation_id = doc["computation_id"]
    if not isinstance(computation_id, str) or not computation_id:
        raise BadRecordError(f"computation_id: {computation_id!r} is not a non-empty string")
    if doc["state"] not in RECORD_STATES:
        raise BadRecordError(f"state: {doc['state']!r} is not one of {sorted(RECORD_STATES)}")
    _int_in(doc, "host_port", 1, 65535)
    _int_in(doc, "guest_cid", 3, _CID_MAX)
    _int_in(doc, "vnc_display", 0, 65535)
    doc.setdefault("pid", 0)
    doc.setdefault("start_time", 0)
    if doc["pid"] != 0:  # 0: no QEMU yet (admitted); 1 is init, never a QEMU of ours
        _int_in(doc, "pid", 2, _PID_MAX)
    _int_in(doc, "start_time", 0, 1 << 62)
    for name in ("argv", "cmdline"):
        if not _strings(doc.get(name, [])):
            raise BadRecordError(f"{name}: not a list of strings")
    if not isinstance(doc.get("files", {}), dict):
        raise BadRecordError("files: not an object")
    tmp_dir = doc.get("tmp_dir", "")
    if not isinstance(tmp_dir, str) or (tmp_dir and not os.path.isabs(tmp_dir)):
        raise BadRecordError(f"tmp_dir: {tmp_dir!r} is not an absolute path")
    expires_at = doc.get("expires_at")
    if expires_at is not None and (
        type(expires_at) not in (int, float) or not math.isfinite(expires_at)
    ):
        raise BadRecordError(f"expires_at: {expires_at!r} is not a time")
    _check_additions(doc)
    boot_id = doc.get("boot_id", "")  # missing: a boot nobody can vouch for, never signalled
    if not isinstance(boot_id, str):
        raise BadRecordError(f"boot_id: {boot_id!r} is not a string")
    doc["boot_id"] = boot_id
    launch = doc.get("launch")
    if launch is not None and not isinstance(launch, dict):
        raise BadRecordError("launch: not an object")
    return VmRecord(**doc)


def _check_additions(doc: dict[str, Any]) -> None:
    """The fields added with Pause and Get; a record written before them has none."""
    if type(doc.get("operator_paused", False)) is not bool:
        raise BadRecordError(f"operator_paused: {doc['operator_paused']!r} is not a boolean")
    for name in ("vcpus", "memory_mib"):
        doc.setdefault(name, 0)
        _int_in(doc, name, 0, 2**32 - 1)
    settings = doc.get("settings", {})
    if not isinstance(settings, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in settings.items()
    ):
        raise BadRecordError("settings: not an object of strings")


_RECORD_FIELDS = tuple(f.name for f in fields(VmRecord))


class StateStore:
    """One file per VM and version: vm-<uuid>.<generation>.json.

    A new version is written under a new name before the old one is unlinked, rather than
    renamed over it: ext4 flushes a file renamed over another (auto_da_alloc), which cost
    each Run 1.5-3.5 ms (make bench); a new name and an unlink cost 0.4 ms. The old one is
    unlinked once the new one is durable (record_sync.py), so for a moment both are there;
    after a crash in between, the newest version that parses wins.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._generation: dict[str, int] = {}
        # One counter for all records: a name is never written twice in a run, so a version
        # the sync thread unlinks late can never be a newer record's (a UUID used again).
        self._last_generation = 0
        self._sync = RecordSync(directory)

    def open(self) -> None:
        """Creates the directory if missing; refuses one another user could write to, since
        its records decide which processes the daemon signals and which files it deletes."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        check_private_dir(self.directory)

    def _path(self, vm_uuid: str, generation: int) -> Path:
        return self.directory / f"vm-{vm_uuid}.{generation}.json"

    def save(self, record: VmRecord) -> None:
        """On the event loop, 3-4 times per Run: one C-encoded string and one write. With
        `json.dump(asdict(record), file)` (a deep copy, then a write per token) the saves
        were about half of the daemon's CPU in a burst of 32 Runs (make bench)."""
        doc = {name: getattr(record, name) for name in _RECORD_FIELDS}  # shallow: dumped now
        data = json.dumps(doc, separators=(",", ":")).encode()
        previous = self._generation.get(record.uuid)
        self._last_generation += 1
        generation = self._last_generation
        path = self._path(record.uuid, generation)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        try:
            fd = os.open(path, flags, 0o600)
        except FileNotFoundError:  # removed under us, or never opened: make it again
            self.open()
            fd = os.open(path, flags, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        except BaseException:  # a full disk: no empty or half record left to trip a restart
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(fd)
        self._generation[record.uuid] = generation
        superseded = None if previous is None else self._path(record.uuid, previous)
        self._sync.submit(record.uuid, path, superseded)

    async def durable(self, vm_uuid: str) -> None:
        """Returns once a version of the record is on the disk (two fsyncs in a thread, begun
        when its first version was written). Raises the OSError of a failed fsync."""
        await asyncio.shield(asyncio.wrap_future(self._sync.waiter(vm_uuid)))

    def remove(self, vm_uuid: str) -> None:
        """Not made durable: a record a power cut brings back is of another boot, and the
        next start cleans up after it."""
        unlink(self._forget(vm_uuid))

    def remove_soon(self, vm_uuid: str) -> asyncio.Future[None]:
        """remove(), the record this store's no more at once and its files unlinked in a
        thread (record_sync.unlink_soon): done once they are gone."""
        return unlink_soon(self._forget(vm_uuid))

    def _forget(self, vm_uuid: str) -> list[Path]:
        generation = self._generation.pop(vm_uuid, None)
        paths = self._sync.forget(vm_uuid)
        return paths if generation is None else [*paths, self._path(vm_uuid, generation)]

    def uuids(self) -> set[str]:
        """The VMs with a record here now."""
        return set(self._generation)

    def flush(self, timeout: float = 10.0) -> bool:
        """Blocks until every version written so far is durable (tests, and the shutdown
        through close); False if `timeout` ran out."""
        return self._sync.flush(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """At shutdown: the records left for the next start (VMs left running) are durable."""
        self._sync.close(timeout)

    @staticmethod
    def _parse_name(path: Path) -> tuple[str, int]:
        stem = path.name.removeprefix("vm-").removesuffix(".json")
        uuid_part, _, generation = stem.rpartition(".")
        return (uuid_part, int(generation)) if generation.isdigit() else (stem, 0)

    def _read(self, path: Path, name_uuid: str) -> VmRecord | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as file:
                if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                    raise BadRecordError("not a regular file")
                raw = file.read(_MAX_RECORD_BYTES + 1)
            if len(raw) > _MAX_RECORD_BYTES:
                raise BadRecordError(f"larger than {_MAX_RECORD_BYTES} bytes")
            return validate_record(json.loads(raw), name_uuid)
        except (OSError, ValueError, TypeError, RecursionError) as error:
            # One line, and the file out of the way: the next start does not trip on it again.
            aside = path.with_name(path.name.removesuffix(".json") + ".bad")
            _log.error(
                "VM record set aside: not one this daemon wrote",
                path=str(path),
                moved_to=str(aside),
                error=getattr(error, "strerror", None) or str(error),
            )
            with contextlib.suppress(OSError):
                path.rename(aside)
            return None

    def load_all(self) -> list[VmRecord]:
        versions: dict[str, list[tuple[int, Path]]] = {}
        for path in self.directory.glob("vm-*.json"):
            vm_uuid, generation = self._parse_name(path)
            versions.setdefault(vm_uuid, []).append((generation, path))
        records = []
        for vm_uuid, found in sorted(versions.items()):
            found.sort(reverse=True)
            for index, (generation, path) in enumerate(found):
                record = self._read(path, vm_uuid)
                if record is not None:
                    records.append(record)
                    canonical = self._path(record.uuid, generation)
                    with contextlib.suppress(OSError):
                        if path != canonical:  # named by hand: take it over under our name
                            path.rename(canonical)
                        for _, older in found[index + 1 :]:
                            older.unlink(missing_ok=True)
                    self._generation[record.uuid] = generation
                    self._last_generation = max(self._last_generation, generation)
                    break
        return records


def check_private_dir(directory: Path) -> None:
    """MANAGER_STATE_DIR must be a directory of the daemon's own user that nobody else can
    write to: whoever can write a record there could have the daemon signal a process or
    delete a file of their choice."""
    where = str(directory)
    try:
        info = os.stat(directory)
    except OSError as error:
        raise FailedPreconditionError(
            f"MANAGER_STATE_DIR: cannot use {where!r}: {error.strerror}"
        ) from None
    if not stat.S_ISDIR(info.st_mode):
        raise FailedPreconditionError(f"MANAGER_STATE_DIR: {where!r} is not a directory")
    if info.st_uid != os.geteuid():
        raise FailedPreconditionError(
            f"MANAGER_STATE_DIR: {where!r} is owned by uid {info.st_uid}, not by this daemon's "
            f"uid {os.geteuid()}: chown it to that user (and chmod 700), or point "
            "MANAGER_STATE_DIR at a directory of its own"
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise FailedPreconditionError(
            f"MANAGER_STATE_DIR: {where!r} is writable by group or others (mode "
            f"{stat.S_IMODE(info.st_mode):04o}): chmod 700 {where!r}"
        )
