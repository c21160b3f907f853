"""`cocos-manager-cli` as an operator runs it, against a real server with the stand-in QEMU."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
from pathlib import Path

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
    port = int(json.loads(out)["agentPort"])
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
    assert lines[0]["agentEvent"]["eventType"] == "vm-provision"
    assert lines[0]["agentEvent"]["status"] == "starting"
    assert all(
        (line.get("agentEvent") or line.get("agentLog"))["computationId"] == "ev" for line in lines
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
    short = tmp_path / "short.json"
    short.write_text(json.dumps({"id": "x", "algorithm": {"hash": "abcd"}, "agent_config": {}}))
    code, _, err = await cli(manager, "run", "--manifest", str(short))
    assert code == 1 and "INVALID_ARGUMENT" in err and "algorithm.hash" in err


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
        str(alpha.resources.guest_cid),
        f":{alpha.resources.vnc_display}",
    ]
    assert cells[6].endswith("Z") and cells[7:] == ["-", "no"]
    assert header.index("STATE") == rows[0].index("running")  # aligned columns

    code, out, _ = await cli(manager, "list", "--json")
    assert code == 0
    doc = json.loads(out)
    assert [c["computationId"] for c in doc["computations"]] == ["alpha", "beta"]
    assert doc["computations"][0]["agentPort"] == str(alpha.resources.host_port)


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
