"""`cocos-manager-cli` as an operator runs it, against a real server with the stand-in QEMU."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
from pathlib import Path

import grpc
import pytest

from tests.support.harness import Manager, running_manager
from tests.support.streams import read_agent
from tests.support.waiting import wait_for

CLI = str(Path(sys.executable).with_name("cocos-manager-cli"))


@pytest.fixture
async def manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    async with running_manager(tmp_path, monkeypatch) as m:
        yield m


async def cli(m: Manager, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        CLI, args[0], "--address", m.address, *args[1:],
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def agent_manifest(port: int) -> dict[str, object]:
    result: dict[str, object] = json.loads(read_agent(port))
    return result


async def test_run_from_files_hashes_them_with_sha3(manager: Manager, tmp_path: Path) -> None:
    algorithm, dataset = tmp_path / "algo.py", tmp_path / "data.csv"
    algorithm.write_bytes(b"print('hello')\n")
    dataset.write_bytes(b"a,b\n1,2\n")
    code, out, err = await cli(manager, "run", "--id", "files", "--algorithm", str(algorithm),
                               "--dataset", str(dataset), "--json")  # fmt: skip
    assert code == 0, err
    port = int(json.loads(out)["agent_port"])
    manifest = await asyncio.to_thread(agent_manifest, port)
    assert manifest["algorithms"]["hash"] == list(hashlib.sha3_256(algorithm.read_bytes()).digest())  # type: ignore[index]
    assert manifest["datasets"][0]["hash"] == list(hashlib.sha3_256(dataset.read_bytes()).digest())  # type: ignore[index]
    code, out, _ = await cli(manager, "stop", "files")
    assert code == 0 and "stopped" in out
    assert manager.service.computations() == {}


async def test_run_from_manifest_file(manager: Manager, tmp_path: Path) -> None:
    doc = {
        "id": "from-json",
        "algorithm": {"id": "a", "hash": hashlib.sha3_256(b"a").hexdigest()},
        "datasets": [{"id": "d", "hash": list(hashlib.sha3_256(b"d").digest())}],
        "agent_config": {"port": "7002", "attested_tls": True},
    }
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(doc))
    code, out, err = await cli(manager, "run", "--manifest", str(path))
    assert code == 0, err
    assert "from-json" in out
    assert "from-json" in manager.service.computations()


async def test_events_follow_the_stream(manager: Manager, tmp_path: Path) -> None:
    before = manager.service.bus.subscriber_count
    events = asyncio.ensure_future(cli(manager, "events", "ev", "--count", "3", "--json"))
    await wait_for(lambda: manager.service.bus.subscriber_count > before, "the CLI's subscription")
    algorithm = tmp_path / "algo"
    algorithm.write_bytes(b"x")
    assert (await cli(manager, "run", "--id", "ev", "--algorithm", str(algorithm)))[0] == 0
    code, out, _ = await events
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 3
    assert lines[0]["agent_event"]["event_type"] == "vm-provision"
    assert lines[0]["agent_event"]["status"] == "starting"
    assert all(
        (line.get("agent_event") or line.get("agent_log"))["computation_id"] == "ev"
        for line in lines
    )


async def test_errors_are_one_line_with_the_status(manager: Manager, tmp_path: Path) -> None:
    code, _, err = await cli(manager, "stop", "nobody")
    assert code == 1
    assert err.strip().splitlines() == [err.strip()]
    assert "NOT_FOUND" in err and "nobody" in err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"id": "x", "algorithm": {"hash": "zz"}, "agent_config": {}}))
    code, _, err = await cli(manager, "run", "--manifest", str(bad))
    assert code == 2 and "algorithm.hash" in err
    # A hash that decodes but is short is reported with its decoded length, before any call.
    short = tmp_path / "short.json"
    short.write_text(json.dumps({"id": "x", "algorithm": {"hash": "abcd"}, "agent_config": {}}))
    code, _, err = await cli(manager, "run", "--manifest", str(short))
    assert code == 2 and "algorithm.hash: 2 bytes (read as hex)" in err
    assert manager.service.computations() == {}


# -- operator queries: list, logs, run --ttl -------------------------------------------------


async def test_list_as_a_table_and_as_json(manager: Manager, tmp_path: Path) -> None:
    code, out, _ = await cli(manager, "list")
    assert (code, out) == (0, "no computations\n")
    algorithm = tmp_path / "algo"
    algorithm.write_bytes(b"x")
    for name in ("beta", "alpha"):
        assert (await cli(manager, "run", "--id", name, "--algorithm", str(algorithm)))[0] == 0
    code, out, err = await cli(manager, "list")
    assert code == 0, err
    header, *rows = out.splitlines()
    assert header.split() == [
        "ID", "STATE", "PID", "AGENT", "PORT", "CID", "VNC", "STARTED", "EXPIRES", "ADOPTED",
    ]  # fmt: skip
    assert [row.split()[:2] for row in rows] == [["alpha", "running"], ["beta", "running"]]
    alpha = manager.service.computations()["alpha"]
    assert alpha.process is not None
    cells = rows[0].split()
    assert cells[2:6] == [
        str(alpha.process.pid),
        str(alpha.resources.host_port),
        "-",  # the harness's VMs are on fw_cfg: no vsock device, no guest CID
        f":{alpha.resources.vnc_display}",
    ]
    assert cells[6].endswith("Z") and cells[7:] == ["-", "no"]
    assert header.index("STATE") == rows[0].index("running")  # aligned columns

    code, out, _ = await cli(manager, "list", "--json")
    assert code == 0
    doc = json.loads(out)
    assert [c["computation_id"] for c in doc["computations"]] == ["alpha", "beta"]
    assert doc["computations"][0]["agent_port"] == str(alpha.resources.host_port)


async def test_logs_tail_follow_and_json(manager: Manager, tmp_path: Path) -> None:
    algorithm = tmp_path / "algo"
    algorithm.write_bytes(b"x")
    assert (await cli(manager, "run", "--id", "talk", "--algorithm", str(algorithm)))[0] == 0
    follower = asyncio.ensure_future(cli(manager, "logs", "talk", "-f"))
    # The stand-in prints its BOOTED line at once; the follower sees it, then the end.
    code, out, err = await cli(manager, "logs", "talk", "-n", "1", "--json")
    while code == 0 and not out:  # BOOTED may not have been read yet
        code, out, err = await cli(manager, "logs", "talk", "-n", "1", "--json")
    assert code == 0, err
    line = json.loads(out)
    assert line["message"] == "BOOTED talk" and line["level"] == "info"
    assert (await cli(manager, "stop", "talk"))[0] == 0
    code, out, err = await follower  # ends by itself when the VM ends
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].endswith(" info  BOOTED talk")
    assert lines[0][:24].endswith("Z") and lines[0][10] == "T"
    assert any("terminating on signal 15" in text and " warn " in text for text in lines)
    code, out, _ = await cli(manager, "logs", "talk", "-n", "1")  # after the end, still there
    assert code == 0 and len(out.splitlines()) == 1
    code, _, err = await cli(manager, "logs", "nobody")
    assert code == 1 and "NOT_FOUND" in err


async def test_run_with_a_ttl(manager: Manager, tmp_path: Path) -> None:
    algorithm = tmp_path / "algo"
    algorithm.write_bytes(b"x")
    code, _, err = await cli(manager, "run", "--id", "t", "--algorithm", str(algorithm),
                             "--ttl", "twenty seconds")  # fmt: skip
    assert code == 1 and "INVALID_ARGUMENT" in err and "ttl" in err
    assert manager.service.computations() == {}
    code, _, err = await cli(manager, "run", "--id", "t", "--algorithm", str(algorithm),
                             "--ttl", "20s")  # fmt: skip
    assert code == 0, err


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("abc123", "algorithm.hash: 3 bytes (read as hex); a SHA3-256 hash is 32 bytes"),
        ("q80=", "algorithm.hash: 2 bytes (read as base64)"),
        ([1, 2, 3], "algorithm.hash: 3 bytes (read as a list)"),
        ("not a hash!", "algorithm.hash: 'not a hash!' is not hex, base64 or a list of numbers"),
        ([1, 300], "algorithm.hash: a list must hold numbers 0-255"),
    ],
)
async def test_hashes_are_decoded_then_measured(
    manager: Manager, tmp_path: Path, value: object, message: str
) -> None:
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"id": "h", "algorithm": {"hash": value}, "agent_config": {}}))
    code, _, err = await cli(manager, "run", "--manifest", str(path))
    assert code == 2 and message in err, err


async def test_agent_port_must_be_a_port_number(manager: Manager, tmp_path: Path) -> None:
    from cocos_manager.proto import manager_pb2 as pb
    from tests.support.harness import run_request

    for bad in ("70000", "0", "http", "-1", "7002 "):
        request = run_request(f"port-{bad.strip()}")
        request.agent_config.port = bad
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await manager.stub.Run(request, timeout=10)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert (info.value.details() or "").startswith("agent_config.port: ")
    assert manager.service.computations() == {}
    algorithm = tmp_path / "algo"
    algorithm.write_bytes(b"x")
    code, _, err = await cli(manager, "run", "--id", "p", "--algorithm", str(algorithm),
                             "--agent-port", "99999")  # fmt: skip
    assert code == 1 and "INVALID_ARGUMENT: agent_config.port: '99999' is not a port" in err
    ok = run_request("port-ok")
    ok.agent_config.port = "7002"
    assert (await manager.stub.Run(ok, timeout=10)).computation_id == "port-ok"
    await manager.stub.Stop(pb.StopRequest(computation_id="port-ok"), timeout=10)


async def test_event_details_are_printed_decoded(manager: Manager, tmp_path: Path) -> None:
    algorithm = tmp_path / "algo"
    algorithm.write_bytes(b"x")
    as_json = asyncio.ensure_future(cli(manager, "events", "d", "--count", "2", "--json"))
    as_text = asyncio.ensure_future(cli(manager, "events", "d", "--count", "2"))
    subscribers = manager.service.bus._subscribers
    await wait_for(lambda: len(subscribers) == 2, "both CLI subscriptions")
    assert (await cli(manager, "run", "--id", "d", "--algorithm", str(algorithm)))[0] == 0
    (code, out, _), (text_code, text, _) = await as_json, await as_text
    assert code == 0 and text_code == 0
    # vm-provision starting, then in-progress with {"pid": N} as details.
    event = json.loads(out.splitlines()[1])["agent_event"]
    assert (event["event_type"], event["status"]) == ("vm-provision", "in-progress")
    assert isinstance(event["details"]["pid"], int)  # JSON, not base64
    line = text.splitlines()[1]
    assert line.split(" ", 1)[1].startswith("[d] event manager/vm-provision: in-progress {")
    assert json.loads(line.split(": in-progress ", 1)[1]) == event["details"]


def test_help_shows_defaults() -> None:
    import subprocess

    done = subprocess.run([CLI, "run", "--help"], capture_output=True, text=True, timeout=60)
    assert "(default: localhost:7001)" in done.stdout
    assert "(default: 7002)" in done.stdout and "(default: 300.0)" in done.stdout
    assert "(default: None)" not in done.stdout
