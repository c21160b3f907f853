"""Background tasks of the daemon: named, their failures logged as JSON, awaited at shutdown.

A bare `asyncio.ensure_future` loses a task's exception until garbage collection prints it as
a traceback on stderr, outside the JSON log; every task the daemon starts on its own goes
through a TaskSet instead.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any

from cocos_manager.telemetry import get_logger

_log = get_logger()


async def done_within(future: asyncio.Future[Any], seconds: float) -> bool:
    """Waits up to `seconds` for `future`, never cancelling it; True once it is done. In the
    caller's own task (`asyncio.timeout`), so the caller's cancellation is never lost
    (docs/decisions.md, "Timeouts")."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await asyncio.shield(future)
    return future.done()


async def outlast(future: asyncio.Future[Any]) -> None:
    """Waits until `future` is done, whatever cancels the caller meanwhile; never cancels it.
    Only for the clean-up of a caller already ending cancelled (it re-raises that cancellation
    after): a second cancellation (a Stop, the shutdown) must not end the caller before what
    it cleans up, or that outlives the release that counted on it (a VM's files made, its QEMU
    spawned after its numbers were let go)."""
    while not future.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait([future])


def outcome_seen(future: asyncio.Future[Any]) -> None:
    """A done-callback for a future whose outcome nobody may look at (its awaiter gone, or
    never waiting): marks an exception as seen, so asyncio never prints it at collection."""
    if not future.cancelled():
        future.exception()


class TaskSet:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            _log.error(
                "background task failed", task=task.get_name(), error=repr(error), exc_info=error
            )

    async def join(self, timeout: float | None = None) -> None:
        """Waits for the tasks still running (including ones they start meanwhile)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while self._tasks:
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            done, _ = await asyncio.wait(set(self._tasks), timeout=remaining)
            if not done:
                return
