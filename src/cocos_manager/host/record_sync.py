"""Making each new version of a VM record durable, off the event loop, before the version it
replaces is unlinked (docs/decisions.md, "Restarts: records survive a power cut").

A record version is written whole on the loop (a crash of the daemon alone loses nothing: the
page cache survives it). What a power cut can lose is a version not yet on the disk, so the
version it replaces is kept until the new one is: one thread fsyncs each new file, then the
directory once for all of them (its new entries), and only then unlinks the versions they
supersede. At any instant a power cut leaves at least one complete version of every record
whose first version has been made durable (within one fsync round of its admission; the files
of one younger than that are found by UUID at the next start, vm/orphans.py). The two fsyncs
cost about 5-13 ms on the build machines' ext4 (virtio disk), hundreds under load: on the
loop, four times per Run, they would stall everything else; here they overlap, one directory
fsync serves a whole burst, and no Run waits for them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from cocos_manager.telemetry import get_logger

_log = get_logger()
# On ext4 an unlink waits for a journal commit in progress (0.3-5 ms on this shared disk,
# measured in the release of a VM whose QEMU was killed): a released VM's final event need not.
_unlinker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="record-rm")


def unlink(paths: list[Path]) -> None:
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError as error:  # the next start cleans up after it
            _log.error("cannot remove a VM record", path=str(path), error=error.strerror)


def unlink_soon(paths: list[Path]) -> asyncio.Future[None]:
    """unlink() in a thread; done once the files are gone. Names are never used twice, so a
    late unlink never touches a newer record."""
    try:
        return asyncio.wrap_future(_unlinker.submit(unlink, paths))
    except RuntimeError:  # the interpreter is shutting down
        unlink(paths)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


@dataclass
class _Pending:
    newest: Path
    superseded: list[Path] = field(default_factory=list)
    waiters: list[Future[None]] = field(default_factory=list)


def _settle(waiters: list[Future[None]], error: BaseException | None) -> None:
    for waiter in waiters:
        if waiter.set_running_or_notify_cancel():  # False: its waiter gave up (cancelled)
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)


class RecordSync:
    """One thread per state directory; keys are VM UUIDs."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Condition()
        self._pending: dict[str, _Pending] = {}
        self._in_flight: dict[str, _Pending] = {}
        self._thread: threading.Thread | None = None
        self._closed = False
        self._on_disk: set[str] = set()  # keys with at least one version durable

    def submit(self, key: str, newest: Path, superseded: Path | None) -> None:
        """`newest` was just written; `superseded` (if any) goes once `newest` is durable."""
        with self._lock:
            entry = self._pending.setdefault(key, _Pending(newest))
            entry.newest = newest
            if superseded is not None:
                entry.superseded.append(superseded)
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name="record-sync", daemon=True)
                self._thread.start()
            self._lock.notify_all()
        if self._closed:  # after close (never in the daemon): done inline
            with self._lock:
                late = self._pending.pop(key, None)
            if late is not None:
                self._sync({key: late})

    def waiter(self, key: str) -> Future[None]:
        """Done once some version of `key` is durable: any one names the VM's UUID and launch
        directory, which is what the next boot's clean-up needs. Usually at once: the first
        version's fsyncs began when it was written."""
        future: Future[None] = Future()
        with self._lock:
            entry = self._in_flight.get(key) or self._pending.get(key)
            if key in self._on_disk or entry is None:
                future.set_result(None)
            else:
                entry.waiters.append(future)
        return future

    def forget(self, key: str) -> list[Path]:
        """The record is being removed: the versions still waiting to be unlinked, for the
        caller to unlink now; anyone waiting is released."""
        with self._lock:
            entry = self._pending.pop(key, None)
            in_flight = self._in_flight.get(key)
            self._on_disk.discard(key)
        paths = [] if in_flight is None else list(in_flight.superseded)  # names never reused
        if entry is not None:
            _settle(entry.waiters, None)
            paths += [entry.newest, *entry.superseded]
        return paths

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._pending and not self._closed:
                    self._lock.wait()
                if not self._pending:
                    return
                batch, self._pending = self._pending, {}
                self._in_flight = batch
            try:
                self._sync(batch)
            finally:
                with self._lock:
                    self._in_flight = {}
                    self._lock.notify_all()

    def _sync(self, batch: dict[str, _Pending]) -> None:
        failed: dict[str, OSError] = {}
        removed = set()
        for key, entry in batch.items():
            try:
                fd = os.open(entry.newest, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:  # removed meanwhile: nothing to keep
                removed.add(key)
                continue
            except OSError as error:
                failed[key] = error
                continue
            try:
                os.fsync(fd)
            except OSError as error:
                failed[key] = error
            finally:
                os.close(fd)
        try:
            fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as error:
            failed = dict.fromkeys(batch, error)
        for key, entry in batch.items():
            problem = failed.get(key)
            if problem is None:
                for path in entry.superseded:
                    path.unlink(missing_ok=True)
                if key not in removed:
                    with self._lock:
                        self._on_disk.add(key)
            else:  # the older version stays: it is the one a power cut would leave
                _log.error(
                    "VM record not made durable", path=str(entry.newest), error=problem.strerror
                )
            _settle(entry.waiters, problem)

    def flush(self, timeout: float) -> bool:
        """Waits until everything submitted is durable; False if `timeout` ran out."""
        with self._lock:
            return self._lock.wait_for(
                lambda: not self._pending and not self._in_flight, timeout=timeout
            )

    def close(self, timeout: float) -> None:
        """Flushes, then ends the thread; later submissions are synced inline."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
