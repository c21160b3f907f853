"""VM records on disk, so a restarted daemon can find the VMs an earlier run left behind.

A record is written before anything of the VM exists on disk and removed only once all of it
is gone, so after any crash every per-VM file and process is accounted for. A record names
its process by PID *and* identity (start time and command line): a PID alone can be reused.
Writes are atomic renames; fsync is skipped on purpose, since VMs do not survive the power
loss that it would protect against.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cocos_manager.logging import get_logger

RECORD_VERSION = 1
_log = get_logger()


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
    files: dict[str, str] = field(default_factory=dict)
    expires_at: float | None = None  # TTL deadline, seconds since the epoch
    version: int = RECORD_VERSION


def process_start_time(pid: int) -> int:
    """Clock ticks since boot when `pid` started (0 if gone); exec does not change it."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return int(stat.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return 0


def process_identity(pid: int) -> tuple[int, list[str]] | None:
    """(start time in clock ticks since boot, argv) of a live process; None if gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            raw = cmdline.read()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    if fields[0] == b"Z" or not raw:
        return None
    argv = [part.decode("utf-8", "surrogateescape") for part in raw.rstrip(b"\0").split(b"\0")]
    return int(fields[19]), argv


class StateStore:
    """One file per VM and version: vm-<uuid>.<generation>.json.

    A new version is written under a new name before the old one is unlinked, rather than
    renamed over it: ext4 flushes a file renamed over another (auto_da_alloc), which cost
    each Run 1.5-3.5 ms (make bench); a new name and an unlink cost 0.4 ms. After a crash in
    between, the newest version that parses wins.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._generation: dict[str, int] = {}

    def open(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _path(self, vm_uuid: str, generation: int) -> Path:
        return self.directory / f"vm-{vm_uuid}.{generation}.json"

    def save(self, record: VmRecord) -> None:
        previous = self._generation.get(record.uuid)
        generation = (previous or 0) + 1
        path = self._path(record.uuid, generation)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        try:
            fd = os.open(path, flags, 0o600)
        except FileNotFoundError:  # removed under us, or never opened: make it again
            self.open()
            fd = os.open(path, flags, 0o600)
        try:
            with os.fdopen(fd, "w") as out:
                json.dump(asdict(record), out, separators=(",", ":"))
        except BaseException:  # e.g. ENOSPC: no half-written version left for a restart
            path.unlink(missing_ok=True)
            raise
        self._generation[record.uuid] = generation
        if previous is not None:
            self._path(record.uuid, previous).unlink(missing_ok=True)

    def remove(self, vm_uuid: str) -> None:
        generation = self._generation.pop(vm_uuid, None)
        if generation is not None:
            self._path(vm_uuid, generation).unlink(missing_ok=True)

    @staticmethod
    def _parse_name(path: Path) -> tuple[str, int]:
        stem = path.name.removeprefix("vm-").removesuffix(".json")
        uuid_part, _, generation = stem.rpartition(".")
        return (uuid_part, int(generation)) if generation.isdigit() else (stem, 0)

    def _read(self, path: Path) -> VmRecord | None:
        try:
            doc = json.loads(path.read_text())
            if doc.get("version") != RECORD_VERSION:
                raise ValueError(f"unknown record version {doc.get('version')!r}")
            return VmRecord(**doc)
        except (OSError, ValueError, TypeError) as error:
            _log.error("unreadable VM record set aside", path=str(path), error=str(error))
            with contextlib.suppress(OSError):
                path.rename(path.with_suffix(".bad"))
            return None

    def load_all(self) -> list[VmRecord]:
        versions: dict[str, list[tuple[int, Path]]] = {}
        for path in self.directory.glob("vm-*.json"):
            vm_uuid, generation = self._parse_name(path)
            versions.setdefault(vm_uuid, []).append((generation, path))
        records = []
        for _, found in sorted(versions.items()):
            found.sort(reverse=True)
            for index, (generation, path) in enumerate(found):
                record = self._read(path)
                if record is not None:
                    records.append(record)
                    canonical = self._path(record.uuid, generation)
                    if path != canonical:  # named by hand: take it over under our name
                        path.rename(canonical)
                    self._generation[record.uuid] = generation
                    for _, older in found[index + 1 :]:
                        older.unlink(missing_ok=True)
                    break
        return records
