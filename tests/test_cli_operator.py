"""`cocos-manager-cli` as a new operator drives it (found trying the project from the README
alone): the address and TLS files from the environment instead of `-a` on every call, a
`--version`, a refused connection that says which address was tried and how to change it,
negative values that reach their check, `events` saying when it is live, JSON with the proto's
field names, no guest CID for a VM without a vsock device, and no gRPC core line on stderr."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from pathlib import Path

import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID

from cocos_manager import __version__
from cocos_manager.proto import manager_pb2 as pb
from tests.support.certs import SERVER_SAN, issue_certificate
from tests.support.harness import Manager, running_manager

CLI = str(Path(sys.executable).with_name("cocos-manager-cli"))


@pytest.fixture
async def manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    async with running_manager(tmp_path, monkeypatch) as m:
        yield m


async def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """The CLI with exactly the arguments given (no --address added) and COCOS_MANAGER_*
    variables only from `env`."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("COCOS_")}
    process = await asyncio.create_subprocess_exec(
        CLI, *args, env={**base, **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_the_address_comes_from_the_environment(manager: Manager) -> None:
    code, out, err = await cli("list", env={"COCOS_MANAGER_ADDR": manager.address})
    assert (code, out) == (0, "no computations\n"), err
    # An option still wins over the variable.
    code, out, err = await cli(
        "list", "-a", manager.address, env={"COCOS_MANAGER_ADDR": f"127.0.0.1:{closed_port()}"}
    )
    assert (code, out) == (0, "no computations\n"), err


async def test_tls_files_come_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca = issue_certificate("CA", None, ca=True)
    server = issue_certificate("manager", ca, usage=ExtendedKeyUsageOID.SERVER_AUTH, san=SERVER_SAN)
    client = issue_certificate("plane", ca, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    stranger_ca = issue_certificate("Stranger CA", None, ca=True)
    files = {}
    for name, text in (("ca.pem", ca.cert_pem), ("client.pem", client.cert_pem),
                       ("client.key", client.key_pem), ("stranger.pem", stranger_ca.cert_pem)):  # fmt: skip
        files[name] = tmp_path / name
        files[name].write_text(text)
    tls = {
        "MANAGER_GRPC_SERVER_CERT": server.cert_pem,
        "MANAGER_GRPC_SERVER_KEY": server.key_pem,
        "MANAGER_GRPC_CLIENT_CA_CERTS": ca.cert_pem,
    }
    async with running_manager(tmp_path, monkeypatch, **tls) as m:
        address = f"localhost:{m.server.port}"
        env = {
            "COCOS_MANAGER_ADDR": address,
            "COCOS_MANAGER_CA": str(files["ca.pem"]),
            "COCOS_MANAGER_CERT": str(files["client.pem"]),
            "COCOS_MANAGER_KEY": str(files["client.key"]),
        }
        code, out, err = await cli("list", env=env)
        assert (code, out) == (0, "no computations\n"), err
        # A server certificate from a CA the CLI does not trust: the CLI's explanation only,
        # no gRPC core log line ("I1207 ... ssl_transport_security.cc:...] Handshake failed").
        code, _, err = await cli(
            "list", env={**env, "COCOS_MANAGER_CA": str(files["stranger.pem"])}
        )
    assert code == 1
    assert "not signed by the CA you trust" in err
    assert all(line.startswith("cocos-manager-cli: ") for line in err.splitlines()), err


async def test_version() -> None:
    code, out, _ = await cli("--version")
    assert (code, out) == (0, f"cocos-manager-cli {__version__}\n")


async def test_a_refused_connection_names_the_address_and_how_to_change_it() -> None:
    address = f"127.0.0.1:{closed_port()}"
    code, _, err = await cli("list", env={"COCOS_MANAGER_ADDR": address})
    assert code == 1
    hint = err.splitlines()[-1]
    assert f"{address} (from COCOS_MANAGER_ADDR)" in hint, err
    assert "--address" in hint and "COCOS_MANAGER_ADDR" in hint
    code, _, err = await cli("stop", "x", "--address", address)
    assert f"{address} (from --address)" in err.splitlines()[-1], err


async def test_negative_values_reach_their_check(manager: Manager, tmp_path: Path) -> None:
    algorithm = tmp_path / "algo"
    algorithm.write_bytes(b"x")
    code, _, err = await cli(
        "run", "-a", manager.address, "--id", "neg", "--algorithm", str(algorithm), "--ttl", "-5s"
    )
    assert "expected one argument" not in err
    assert code == 1 and "INVALID_ARGUMENT" in err and "ttl" in err, err
    code, _, err = await cli("logs", "neg", "-a", manager.address, "-n", "-3")
    assert code == 2 and "must be 0 (all) or more: '-3'" in err, err
    code, _, err = await cli("events", "-a", manager.address, "--since", "-1")
    assert code == 2 and "must be 0 or more" in err, err
    assert manager.service.computations() == {}


async def test_events_says_on_stderr_when_it_is_live(manager: Manager, tmp_path: Path) -> None:
    before = manager.service.bus.subscriber_count
    env = {**os.environ, "COCOS_MANAGER_ADDR": manager.address}
    process = await asyncio.create_subprocess_exec(
        CLI, "events", "live", "--count", "1", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stderr is not None and process.stdout is not None
    try:
        line = (await asyncio.wait_for(process.stderr.readline(), 30)).decode()
        assert "subscribed" in line and "computation live" in line and manager.address in line
        # Said once the subscription is registered: whatever is published now is seen.
        assert manager.service.bus.subscriber_count > before
        algorithm = tmp_path / "algo"
        algorithm.write_bytes(b"x")
        code, _, err = await cli(
            "run", "-a", manager.address, "--id", "live", "--algorithm", str(algorithm)
        )
        assert code == 0, err
        out = await asyncio.wait_for(process.stdout.read(), 30)
        assert "[live] event manager/vm-provision: starting" in out.decode()
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def test_json_uses_the_proto_field_names(manager: Manager, tmp_path: Path) -> None:
    """snake_case, as grpcurl prints it; one VM on the fw_cfg channel (no vsock device), which
    has no guest CID to show, in List or in its events."""
    assert manager.settings.qemu.AGENT_CHANNEL.value == "fw_cfg"
    algorithm = tmp_path / "algo"
    algorithm.write_bytes(b"x")
    code, out, err = await cli(
        "run", "-a", manager.address, "--id", "snake", "--algorithm", str(algorithm), "--json"
    )
    assert code == 0, err
    assert set(json.loads(out)) == {"agent_port", "computation_id"}

    code, out, _ = await cli("list", "-a", manager.address, "--json")
    (info,) = json.loads(out)["computations"]
    assert info["computation_id"] == "snake" and "agent_port" in info and "vnc_display" in info
    assert "guest_cid" not in info  # 0, left out as protobuf JSON does
    assert set(info) <= {field.name for field in pb.ComputationInfo.DESCRIPTOR.fields}
    code, out, _ = await cli("list", "-a", manager.address)
    header, row = out.splitlines()
    assert row.split()[header.split().index("CID") - 1] == "-"  # "AGENT PORT" is two words

    # Replayed from the start (the Run has answered): up to vm-provision/complete.
    env = {**os.environ, "COCOS_MANAGER_ADDR": manager.address}
    process = await asyncio.create_subprocess_exec(
        CLI, "events", "snake", "--since", "0", "--json", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert process.stdout is not None
    messages = []
    try:
        while not any(m.get("agent_event", {}).get("status") == "complete" for m in messages):
            line = await asyncio.wait_for(process.stdout.readline(), 30)
            assert line, "the stream ended"
            messages.append(json.loads(line))
    finally:
        process.kill()
        await process.wait()
    assert all(set(m) <= {"agent_event", "agent_log", "seq"} for m in messages), messages
    complete = messages[-1]["agent_event"]
    assert complete["event_type"] == "vm-provision" and complete["computation_id"] == "snake"
    assert "agent_port" in complete["details"] and "guest_cid" not in complete["details"]


async def test_a_refused_subscription_is_not_announced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_manager(tmp_path, monkeypatch, MANAGER_EVENTS_MAX_SUBSCRIBERS="1") as m:
        held = m.service.subscribe()  # the one subscription allowed
        try:
            code, _, err = await cli("events", "-a", m.address)
        finally:
            m.service.bus.unsubscribe(held)
    assert code == 1 and "RESOURCE_EXHAUSTED" in err, err
    assert "subscribed" not in err
