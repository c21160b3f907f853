"""A full MANAGER_STATE_DIR at admission fails the Run with RESOURCE_EXHAUSTED, and (like every
other failed start) is told on Events as vm-provision starting then failed with the error:
before, the Run's caller was told and nobody else (an Events follower, the dial-out's
computations server heard nothing of the request)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest

from cocos_manager.proto import manager_pb2 as pb
from tests.support.harness import run_request, running_manager
from tests.test_faults import assert_nothing_left, run_error, tmpfs


async def test_a_full_state_dir_at_admission_publishes_the_failed_event(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with tmpfs(tmp_path / "state", "16k") as state:
        async with running_manager(tmp_path, monkeypatch) as m:
            with (  # the tmpfs to its last byte
                open(state / "filler", "wb", buffering=0) as out,
                pytest.raises(OSError, match="No space left"),
            ):
                while True:
                    out.write(b"\0" * 4096)
            error = await run_error(m.stub.Run(run_request("no-room")))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            stream = m.stub.Events(pb.EventsRequest(computation_id="no-room", since=0))
            seen = []
            async with asyncio.timeout(10):
                async for message in stream:
                    event = message.agent_event
                    seen.append((event.event_type, event.status, event.details))
                    if len(seen) == 2:
                        break
            stream.cancel()
            assert [(t, s) for t, s, _ in seen] == [
                ("vm-provision", "starting"),
                ("vm-provision", "failed"),
            ]
            details = json.loads(seen[1][2])
            assert details["reason"] == "failed"
            assert "MANAGER_STATE_DIR: no space left" in details["error"]
            await assert_nothing_left(m)
