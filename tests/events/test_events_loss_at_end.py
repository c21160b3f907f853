"""A subscriber that lost messages is told so when its queue drains, not only in front of the
next message it is offered: a loss at the very end of a computation (its `vm-stop` events
dropped while the client was not reading) would otherwise never be announced, and a control
plane waiting for `vm-stop` would wait for ever on an idle stream.

Against the real daemon wiring and gRPC on loopback. The stand-in QEMU plays a chatty guest
(60,000 short console lines); the subscriber is grpcurl, stopped (SIGSTOP, as a paused pipe
reader) so that it reads nothing at all, not even what its own gRPC library would buffer,
until the guest has printed its last line.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from cocos_manager.events.bus import EventBus, log_message, manager_event
from cocos_manager.proto import manager_pb2 as pb
from tests.support.harness import run_request, running_manager
from tests.support.waiting import GUARD, wait_for

LINES = 60_000
GRPCURL = shutil.which("grpcurl") or str(Path(sys.executable).with_name("grpcurl"))


class JsonLines:
    """The JSON objects grpcurl writes to a file, read as they come."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._offset = 0
        self._buffer = ""
        self._decoder = json.JSONDecoder()

    async def next(self) -> dict[str, Any]:
        """The next object, or a failure naming what never came (the stream went idle)."""
        deadline = time.monotonic() + GUARD
        while True:
            text = self._buffer.lstrip()
            if text:
                try:
                    value, end = self._decoder.raw_decode(text)
                except json.JSONDecodeError:
                    pass  # half written
                else:
                    self._buffer = text[end:]
                    assert isinstance(value, dict)
                    return value
            with open(self._path, "rb") as file:
                file.seek(self._offset)
                chunk = file.read()
            self._offset += len(chunk)
            self._buffer += chunk.decode()
            if not chunk:
                if time.monotonic() > deadline:
                    raise AssertionError(
                        "the Events stream went idle without an events-lost notice"
                    )
                await asyncio.sleep(0.01)


async def test_a_loss_at_the_end_is_told_when_the_queue_drains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_manager(
        tmp_path, monkeypatch, FAKE_QEMU_MODE=f"chatty:{LINES}:24"
    ) as manager:
        out = tmp_path / "events.json"
        with open(out, "wb") as sink:
            client = await asyncio.create_subprocess_exec(
                GRPCURL, "-plaintext", "-d", '{"computation_id": "c1"}', manager.address,
                "manager.ManagerService/Events",
                stdout=sink,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # a group of its own: stopped and continued as one
            )  # fmt: skip
        try:
            await wait_for(
                lambda: manager.service.bus.subscriber_count == 1, "grpcurl to subscribe"
            )
            os.killpg(client.pid, signal.SIGSTOP)
            await manager.stub.Run(run_request("c1"), timeout=30)
            console = manager.service.console("c1")
            await wait_for(
                lambda: any(line.text == "CHATTY DONE" for line in console.tail(1)),
                "the guest to print all its lines",
                within=120,
            )
            end = manager.service.bus.last_seq  # the guest's last line was published
            os.killpg(client.pid, signal.SIGCONT)
            # What was queued, with the losses told in between and at the end, until every
            # message up to `end` was either received or told lost.
            stream = JsonLines(out)
            # The guest's last lines are lost (the queue is full when they come: a gRPC flush
            # in that very moment could let them in, rarely), and nothing follows them: before,
            # the stream went idle here without a notice.
            covered, notices = 0, []
            while covered < end:
                message = await stream.next()
                event = message.get("agent_event", {})
                if event.get("event_type") != "events-lost":
                    covered = int(message["seq"])
                    continue
                details = json.loads(base64.b64decode(event["details"]))
                assert (event["status"], event["originator"]) == ("dropped", "manager")
                assert event["computation_id"] == "c1" and "seq" not in message  # seq 0
                assert details["lost"] > 0 and covered <= details["since"] < details["last"]
                covered = details["last"]
                notices.append(details)
            assert sum(n["lost"] for n in notices) > LINES // 2
            # The stream goes on: the vm-stop of a Stop now reaches the reading client.
            await manager.stub.Stop(pb.StopRequest(computation_id="c1"), timeout=30)
            while (event.get("event_type"), event.get("status")) != ("vm-stop", "complete"):
                event = (await stream.next()).get("agent_event", {})
        finally:
            os.killpg(client.pid, signal.SIGCONT)
            os.killpg(client.pid, signal.SIGKILL)
            await client.wait()

        # The last notice says where the loss began: a replay from there has what is retained.
        replay = manager.stub.Events(
            pb.EventsRequest(computation_id="c1", since=notices[-1]["since"])
        )
        first = await asyncio.wait_for(replay.read(), GUARD)
        assert first is not grpc.aio.EOF
        assert first.seq == notices[-1]["since"] + 1 or (
            first.agent_event.event_type == "events-lost"  # beyond MANAGER_EVENTS_RETAIN
        )
        replay.cancel()


async def test_a_dropped_vm_stop_is_told_once_the_queue_is_read() -> None:
    """The issue's ending on the bus itself: the queue is full when the computation stops, so
    its vm-stop events are lost and nothing is offered after them."""
    bus = EventBus(queue_size=4)
    stream = aiter(bus.subscribe("c1"))
    for i in range(4):
        bus.publish(log_message("c1", "info", f"line {i}"))
    starting, complete = (
        manager_event("c1", "vm-stop", "starting"),
        manager_event("c1", "vm-stop", "complete"),
    )
    bus.publish(starting)
    bus.publish(complete)
    bus.publish(log_message("c2", "info", "another computation's"))  # not this stream's
    lines = [await anext(stream) for _ in range(4)]
    assert [m.agent_log.message for m in lines] == [f"line {i}" for i in range(4)]
    notice = await asyncio.wait_for(anext(stream), GUARD)
    assert (notice.agent_event.event_type, notice.agent_event.status) == ("events-lost", "dropped")
    assert json.loads(notice.agent_event.details) == {
        "lost": 2,
        "since": lines[-1].seq,
        "last": complete.seq,
    }
    assert notice.seq == 0 and bus.dropped == 2
