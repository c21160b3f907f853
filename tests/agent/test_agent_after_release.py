"""A VM's final event is its computation's last message: an agent held back by pacing (a slow
Events subscriber) when its VM is stopped has nothing of it published after that event, and
loses nothing it was acked for: its pacing ends when the VM's end begins. The rest of its
batch, already acked, was published as the release closed its connection: after `vm-stop`
`complete`, to Events, replays and the dial-out."""

from __future__ import annotations

import asyncio
import os
import signal
import struct
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from cocos_manager.events import bus as events_module
from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.qemu.process import QemuProcess
from cocos_manager.telemetry import METRICS
from tests.support.harness import run_request, running_manager
from tests.support.waiting import wait_for
from tests.test_contracts import frame, vsock_manager


def seen_after_pidfd_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    """QEMU's exit seen 0.3 s late, so the console's last record is read first: the exit's
    release then waits for nothing (no turn of the loop of its own) before its final event."""
    original = QemuProcess._on_pidfd

    def later(self: QemuProcess) -> None:
        assert self._pidfd is not None
        self._loop.remove_reader(self._pidfd)
        self._loop.call_later(0.3, original, self)

    monkeypatch.setattr(QemuProcess, "_on_pidfd", later)


@pytest.mark.parametrize("end", ["stop", "exit"])
async def test_nothing_of_a_held_back_agent_is_published_after_its_vms_final_event(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, end: str
) -> None:
    """`stop`: a Stop; `exit`: QEMU ends on its own (the guest powered off). Before, the
    release published the exit's final event and only then cancelled the agent, which was
    still at its pace wait: the rest of its batch, acked, came after the event and was
    dropped (249 of 2,298 acked). The release now ends the VM's agent connections, and
    waits for them, before that event."""
    if end == "exit":
        seen_after_pidfd_delay(monkeypatch)
    env = {"MANAGER_EVENTS_HOLD_TIMEOUT": "60s"}  # the subscriber below reads nothing
    async with vsock_manager(tmp_path, monkeypatch, **env) as (m, agents, listener):
        await agents.listen(3)
        await m.stub.Run(run_request("held"))
        console = m.service.console("held")
        await wait_for(lambda: any("BOOTED" in line.text for line in console.tail()), "BOOTED")
        published: list[pb.ClientStreamMessage] = []
        untap = m.service.bus.tap(published.append)
        slow = m.service.subscribe("held")
        size = events_module.DEFAULT_QUEUE_SIZE
        task, (acks_in, writer) = await agents.connect_back(listener, 3)
        writer.write(b"".join(frame(i + 1, f"m{i}") for i in range(size)))  # one batch
        await wait_for(lambda: slow.qsize() > size // 2, "the backlog that holds it back")
        for _ in range(20):
            await asyncio.sleep(0)
        assert not task.done()  # held, with the rest of its batch
        if end == "stop":
            await m.stub.Stop(pb.StopRequest(computation_id="held"))
        else:
            process = m.service.computations()["held"].process
            assert process is not None
            os.kill(process.pid, signal.SIGTERM)
            await wait_for(lambda: "held" not in m.service.computations(), "its release")
        await asyncio.wait([task], timeout=10)  # ended by the release
        untap()
        slow.close()
        ack_bytes = await asyncio.wait_for(acks_in.read(), 10)  # to the EOF of its close
    final = next(
        i
        for i, message in enumerate(published)
        if message.agent_event.computation_id == "held"
        and message.agent_event.event_type == ("vm-stop" if end == "stop" else "vm-exit")
        and message.agent_event.status in ("complete", "failed")
    )
    sent = {f"m{i}" for i in range(size)}
    of_held = [
        (i, message.agent_log.message)
        for i, message in enumerate(published)
        if message.HasField("agent_log") and message.agent_log.computation_id == "held"
    ]
    assert all(i < final for i, _ in of_held)
    # What the daemon acked is what it published: an agent keeps (and would send again) only
    # what was not acked. Its pacing ended with the VM, so it went on past the held point.
    acked = {f"m{i - 1}" for (i,) in struct.iter_unpack("<I", ack_bytes)}
    assert acked <= sent
    assert {text for _, text in of_held} & sent == acked  # (QEMU's own lines are there too)
    assert len(acked) > size // 2


async def test_an_agent_message_after_the_release_is_not_published_and_is_said_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What comes anyway (a connection cancelled mid-batch at the release) is counted and
    logged once per computation, never published after the final event."""
    async with running_manager(tmp_path, monkeypatch) as m:
        await m.stub.Run(run_request("gone"))
        await m.stub.Stop(pb.StopRequest(computation_id="gone"))
        published = m.service.bus.published
        late_before = METRICS.registry.get_sample_value("manager_agent_messages_late_total")
        with capture_logs() as logs:
            for i in range(3):
                m.service.publish_agent_message(
                    pb.ClientStreamMessage(
                        agent_log=pb.AgentLog(computation_id="gone", message=f"late {i}")
                    )
                )
        assert m.service.bus.published == published
        told = [e for e in logs if e["event"].startswith("agent messages that came after")]
        assert [e["computation_id"] for e in told] == ["gone"]
        late = METRICS.registry.get_sample_value("manager_agent_messages_late_total")
        assert late is not None and late - (late_before or 0.0) == 3


@pytest.mark.parametrize("force", [False, True])
async def test_what_an_agent_was_acked_is_published_before_the_final_event(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, force: bool
) -> None:
    """An agent flooding small frames when its VM is stopped: every frame acked to it was
    published, and before the final event. (With a turn of the loop inside a batch, frames
    acked with the batch were cancelled unpublished at the release: lost, 200-1,500 a Stop.)"""
    count = 60_000
    async with vsock_manager(tmp_path, monkeypatch) as (m, agents, listener):
        await agents.listen(3)
        await m.stub.Run(run_request("flood"))
        published: list[int] = []
        final_at: list[int] = []

        def tap(message: pb.ClientStreamMessage) -> None:
            if message.HasField("agent_log") and message.agent_log.computation_id == "flood":
                if message.agent_log.message.startswith("m"):
                    published.append(int(message.agent_log.message[1:]))
            elif (message.agent_event.event_type, message.agent_event.status) == (
                "vm-stop",
                "complete",
            ):
                final_at.append(len(published))

        untap = m.service.bus.tap(tap)
        task, (reader, writer) = await agents.connect_back(listener, 3)
        acked: list[int] = []

        async def read_acks() -> None:
            pending = b""
            while chunk := await reader.read(65536):
                pending += chunk
                whole = len(pending) // 4 * 4
                acked.extend(i for (i,) in struct.iter_unpack("<I", pending[:whole]))
                pending = pending[whole:]

        acks_task = asyncio.ensure_future(read_acks())
        writer.write(b"".join(frame(i, f"m{i}") for i in range(1, count + 1)))
        await wait_for(lambda: len(published) > 5_000, "the flood under way")
        await m.stub.Stop(pb.StopRequest(computation_id="flood", force=force))
        await asyncio.wait([task], timeout=10)
        await asyncio.wait([acks_task], timeout=10)
        untap()
    assert final_at == [len(published)]  # nothing of it after the final event
    assert acked and set(acked) <= set(published)
