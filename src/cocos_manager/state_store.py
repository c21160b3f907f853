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
    version: int = RECORD_VERSION


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
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def open(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _path(self, vm_uuid: str) -> Path:
        return self.directory / f"vm-{vm_uuid}.json"

    def save(self, record: VmRecord) -> None:
        path = self._path(record.uuid)
        scratch = path.with_suffix(".tmp")
        try:
            fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        except FileNotFoundError:  # removed under us, or never opened: make it again
            self.open()
            fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(asdict(record), out, separators=(",", ":"))
        os.replace(scratch, path)

    def remove(self, vm_uuid: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(vm_uuid).unlink()

    def load_all(self) -> list[VmRecord]:
        records = []
        for path in sorted(self.directory.glob("vm-*.json")):
            try:
                doc = json.loads(path.read_text())
                if doc.get("version") != RECORD_VERSION:
                    raise ValueError(f"unknown record version {doc.get('version')!r}")
                records.append(VmRecord(**doc))
            except (OSError, ValueError, TypeError) as error:
                _log.error("unreadable VM record set aside", path=str(path), error=str(error))
                with contextlib.suppress(OSError):
                    path.rename(path.with_suffix(".bad"))
        for stale in self.directory.glob("vm-*.tmp"):
            stale.unlink(missing_ok=True)
        return records
