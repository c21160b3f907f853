"""Waiting for a condition instead of sleeping for a guess: fast when the condition holds
early, and a clear failure naming what never happened when it does not."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any, NoReturn

import grpc
import pytest

GUARD = 10.0


async def wait_for(
    condition: Callable[[], object],
    what: str,
    within: float = GUARD,
    *,
    detail: Callable[[], object] | None = None,
) -> None:
    """Polls `condition` every 5 ms until it is true; fails naming `what` after `within` s,
    with what `detail` returns then (what was left, a log's tail: a failure seen once in CI
    must say enough to be understood from its report alone)."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            said = f"\n{detail()}" if detail is not None else ""
            raise AssertionError(f"timed out waiting for {what}{said}")
        await asyncio.sleep(0.005)


async def subscribed(call: grpc.aio.UnaryStreamCall[Any, Any], within: float = GUARD) -> None:
    """An Events call is registered once its initial metadata arrives: the server sends it
    right after subscribing (api/servicer.py), so nothing published after this is missed."""
    await asyncio.wait_for(call.initial_metadata(), within)


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(reason: str) -> NoReturn:
    """A test whose prerequisite (root, tmpfs, a tool the install script installs) is missing:
    skipped on a developer's machine, failed under CI=true, where a skip would hide that the
    contract went untested."""
    if in_ci():
        pytest.fail(f"CI=true: {reason}", pytrace=False)
    pytest.skip(reason)
