"""SIGHUP (and the other signals whose default is to end a process without a word) against the
real daemon: logged, and the daemon serves on. Settings are read at start only
(docs/decisions.md, "Signals")."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from cocos_manager.proto import manager_pb2 as pb
from tests.support.daemon_process import Daemon
from tests.support.harness import base_env, run_request
from tests.support.waiting import wait_for


def logged(log: Path, word: str) -> list[dict[str, object]]:
    found = []
    for line in log.read_text(errors="replace").splitlines():
        if word in line:
            found.append(json.loads(line))
    return found


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2])
async def test_a_hangup_is_logged_and_the_daemon_serves_on(
    tmp_path: Path, sig: signal.Signals
) -> None:
    log = tmp_path / "daemon.log"
    daemon = Daemon(env=base_env(tmp_path), log=log)
    await daemon.start()
    try:
        await daemon.stub.Run(run_request("survivor"))
        assert daemon.process is not None
        daemon.process.send_signal(sig)
        process = daemon.process
        await wait_for(
            lambda: logged(log, sig.name) or process.poll() is not None,
            f"a log line naming {sig.name}",
        )
        assert process.poll() is None, f"the daemon died of {sig.name}: {daemon.log_tail()}"
        [record] = logged(log, sig.name)
        assert record["level"] == "warn"
        if sig is signal.SIGHUP:
            assert "settings are read at start only" in str(record["message"])
        assert process.poll() is None, daemon.log_tail()
        listed = await daemon.stub.List(pb.ListRequest())
        assert [c.computation_id for c in listed.computations] == ["survivor"]
        await daemon.stub.Stop(pb.StopRequest(computation_id="survivor"))
    finally:
        code = await daemon.terminate()
    assert code == 0, daemon.log_tail()
