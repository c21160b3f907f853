"""A TTL fires by the wall clock: when the host's clock is stepped (NTP at boot, an operator's
`date -s`), the VM still stops when List's `expires_at` says, not an hour early or late.

The real daemon runs under libfaketime (installed by scripts/setup.sh), which moves its
CLOCK_REALTIME by what the test writes in a file, while its CLOCK_MONOTONIC (asyncio's timers)
runs on untouched, as in a real clock step. Nothing of the host's clock changes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.vm import ttl
from tests.support.daemon_process import Daemon
from tests.support.harness import base_env, run_request
from tests.support.waiting import GUARD, subscribed, unavailable, wait_for

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")


class SteppedDaemon(Daemon):
    """The daemon with a wall clock the test can step."""

    def step(self, seconds: float) -> None:
        """From now on the daemon's wall clock reads the real time plus `seconds`. Replaced
        in one rename: libfaketime reads the file at every clock reading, never half of it."""
        staged = self.clock_file.with_suffix(".new")
        staged.write_text(f"{seconds:+.0f}\n")
        staged.replace(self.clock_file)

    @property
    def clock_file(self) -> Path:
        return Path(self.env["FAKETIME_TIMESTAMP_FILE"])


def clock_file(tmp_path: Path) -> Path:
    """The file that sets the daemon's wall clock, at the real time to begin with."""
    if not LIBFAKETIME.exists():
        unavailable(f"{LIBFAKETIME} is missing (Debian's libfaketime: scripts/setup.sh)")
    clock = tmp_path / "faketime"
    clock.write_text("+0\n")
    return clock


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[SteppedDaemon]:
    clock = clock_file(tmp_path)
    env = base_env(tmp_path) | {
        "LD_PRELOAD": str(LIBFAKETIME),
        "FAKETIME_TIMESTAMP_FILE": str(clock),
        "FAKETIME_NO_CACHE": "1",  # the file is read at each clock reading: steps are seen
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }
    d = SteppedDaemon(env=env, log=tmp_path / "daemon.log")
    await d.start()
    yield d
    if d.process is not None and d.process.poll() is None:
        await d.terminate()


async def listed(daemon: Daemon) -> list[pb.ComputationInfo]:
    return list((await daemon.stub.List(pb.ListRequest())).computations)


async def ttl_stop(events: object) -> pb.AgentEvent:
    async for message in events:  # type: ignore[attr-defined]
        event = message.agent_event
        if event.event_type == "vm-stop" and event.status == "starting":
            return event  # type: ignore[no-any-return]
    raise AssertionError("the stream ended without a vm-stop")


async def test_a_clock_stepped_past_the_deadline_stops_the_vm(daemon: SteppedDaemon) -> None:
    run = run_request("stepped-forward")
    run.ttl = "1h"
    await daemon.stub.Run(run)
    [info] = await listed(daemon)
    events = daemon.stub.Events(pb.EventsRequest(computation_id="stepped-forward"))
    await subscribed(events)
    daemon.step(+3700)  # NTP finds the host an hour and more behind
    event = await asyncio.wait_for(ttl_stop(events), 2 * GUARD)
    assert b'"reason":"ttl"' in event.details
    assert b'"expires_at":%d' % info.expires_at.seconds in event.details
    # The stop came at the daemon's (stepped) wall time past expires_at, not an hour later.
    assert event.timestamp.seconds >= info.expires_at.seconds


async def test_a_clock_stepped_back_does_not_stop_the_vm_early(daemon: SteppedDaemon) -> None:
    run = run_request("stepped-back")
    run.ttl = "3s"
    await daemon.stub.Run(run)
    [info] = await listed(daemon)
    deadline = info.expires_at.ToNanoseconds() / 1e9
    daemon.step(-3600)  # the clock is set back an hour: expires_at is an hour away again
    # Past the deadline by the real (and monotonic) clock, the VM runs on, its deadline the same.
    while time.time() < deadline + 2:
        await asyncio.sleep(0.2)
    still = await listed(daemon)
    assert len(still) == 1, daemon.log_tail()
    assert still[0].state == "running" and still[0].expires_at == info.expires_at
    events = daemon.stub.Events(pb.EventsRequest(computation_id="stepped-back"))
    await subscribed(events)
    daemon.step(0)  # and set right again: the deadline has passed, the VM stops
    event = await asyncio.wait_for(ttl_stop(events), 2 * GUARD)
    assert b'"reason":"ttl"' in event.details
    assert [c.state for c in await listed(daemon)] in ([], ["stopping"])


async def test_alarms_follow_steps_of_an_injected_wall_clock() -> None:
    """The same in the loop of the test, with the wall clock a number the test sets."""
    wall = [1_000_000.0]
    alarms = ttl.WallClockAlarms(
        asyncio.get_running_loop(), now=lambda: wall[0], check_interval=0.01
    )
    fired: list[str] = []
    alarms.arm(wall[0] + 3600, lambda: fired.append("an hour away"))
    alarms.arm(wall[0] + 0.05, lambda: fired.append("soon"))
    cancelled = alarms.arm(wall[0] + 0.05, lambda: fired.append("cancelled"))
    cancelled.cancel()
    wall[0] -= 3600  # stepped back: "soon" is an hour away too
    await asyncio.sleep(0.2)
    assert fired == [] and len(alarms) == 2
    wall[0] += 3600 + 3600  # stepped forward past both deadlines: they fire, earliest first
    await wait_for(lambda: len(fired) == 2, "both alarms to fire")
    assert fired == ["soon", "an hour away"] and len(alarms) == 0
