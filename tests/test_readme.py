"""What the README and docs/ tell an operator to do works as written."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest
from google.protobuf import json_format

from cocos_manager.agent.manifest import manifest_json
from cocos_manager.config.unknown import known_variables
from cocos_manager.proto import manager_pb2 as pb
from tests.api.test_grpcurl import grpcurl
from tests.support.certs import SERVER_SAN, issue_certificate
from tests.support.harness import Manager, running_manager
from tests.support.readme import README, REPO, env_block
from tests.support.streams import read_agent

RUN_JSON = REPO / "docs" / "run.json"


@pytest.fixture
async def manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    async with running_manager(tmp_path, monkeypatch) as m:
        yield m


async def grpcurl_stdin(stdin: bytes, *args: str) -> tuple[int, str, str]:
    from tests.api.test_grpcurl import GRPCURL

    process = await asyncio.create_subprocess_exec(
        GRPCURL, *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(stdin), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_docs_run_json_runs_with_grpcurl_as_the_readme_says(manager: Manager) -> None:
    assert "-d @ localhost:7001 manager.ManagerService/Run < docs/run.json" in README.read_text()
    code, out, err = await grpcurl_stdin(
        RUN_JSON.read_bytes(), "-plaintext", "-d", "@", manager.address,
        "manager.ManagerService/Run",
    )  # fmt: skip
    assert code == 0, err
    answer = json.loads(out)
    port = int(answer.get("agentPort") or answer["agent_port"])
    request = json_format.Parse(RUN_JSON.read_text(), pb.ComputationRunReq())
    assert len(request.algorithm.hash) == 32 and all(len(d.hash) == 32 for d in request.datasets)
    assert await asyncio.to_thread(read_agent, port) == manifest_json(request)
    code, _, err = await grpcurl("-plaintext", "-d", '{"computation_id":"grpcurl-1"}',
                                 manager.address, "manager.ManagerService/Stop")  # fmt: skip
    assert code == 0, err


async def test_the_readme_mtls_grpcurl_example(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cryptography.x509.oid import ExtendedKeyUsageOID

    text = README.read_text()
    assert "grpcurl -cacert ca.pem -cert client.pem -key client.key \\" in text
    ca = issue_certificate("CA", None, ca=True)
    server = issue_certificate("manager", ca, usage=ExtendedKeyUsageOID.SERVER_AUTH, san=SERVER_SAN)
    client = issue_certificate("plane", ca, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    files = {}
    for name, content in (("ca.pem", ca.cert_pem), ("client.pem", client.cert_pem),
                          ("client.key", client.key_pem)):  # fmt: skip
        files[name] = tmp_path / name
        files[name].write_text(content)
    tls = {
        "MANAGER_GRPC_SERVER_CERT": server.cert_pem,
        "MANAGER_GRPC_SERVER_KEY": server.key_pem,
        "MANAGER_GRPC_CLIENT_CA_CERTS": ca.cert_pem,
    }
    async with running_manager(tmp_path / "m", monkeypatch, **tls) as m:
        address = f"localhost:{m.server.port}"
        code, out, err = await grpcurl_stdin(
            RUN_JSON.read_bytes(), "-cacert", str(files["ca.pem"]), "-cert",
            str(files["client.pem"]), "-key", str(files["client.key"]), "-d", "@", address,
            "manager.ManagerService/Run",
        )  # fmt: skip
        assert code == 0, err
        answer = json.loads(out)
        assert (answer.get("computationId") or answer["computation_id"]) == "grpcurl-1"
        # Without the client certificate the same call is refused (grpcurl retries the
        # handshake until its connect timeout, 10 s unless told).
        code, _, err = await grpcurl_stdin(
            RUN_JSON.read_bytes(), "-cacert", str(files["ca.pem"]), "-connect-timeout", "2",
            "-d", "@", address, "manager.ManagerService/Run",
        )  # fmt: skip
        assert code != 0
        assert "Failed to dial target host" in err, err


def test_env_blocks_name_only_known_variables() -> None:
    text = README.read_text()
    names = set(re.findall(r"export ((?:MANAGER|COCOS)_[A-Z0-9_]+)=", text))
    assert names and names <= known_variables(), names - known_variables()
    example = (REPO / "init" / "systemd" / "manager.env.example").read_text()
    listed = set(re.findall(r"^#?((?:MANAGER|COCOS)_[A-Z0-9_]+)=", example, re.M))
    assert listed <= known_variables(), listed - known_variables()
    assert env_block("tcg")["MANAGER_QEMU_AGENT_CHANNEL"] == "fw_cfg"


def test_nothing_points_outside_the_repository() -> None:
    for path in (README, REPO / "init" / "systemd" / "manager.env.example",
                 REPO / "init" / "systemd" / "cocos-manager.service",
                 *sorted((REPO / "docs").glob("*.md"))):  # fmt: skip
        text = path.read_text()
        assert "SPEC" not in text and "the spec" not in text, path
        assert "Documentation=http" not in text, path
    example = (REPO / "init" / "systemd" / "manager.env.example").read_text()
    assert "qmp-UUID.sock" in example  # where per-VM sockets really go
    assert "cocos-manager-cli /usr/local/bin/cocos-manager-cli" in README.read_text()


_POINTER = re.compile(r'docs/([a-z]+\.md)(?:,\s*|\s*\()"([^"]+)"')


def test_pointers_into_docs_name_sections_that_exist() -> None:
    """Comments say where the contract or decision is written (`docs/decisions.md, "QMP"`):
    each such pointer names a file of docs/ and a `## ` heading of it that starts so."""
    pointers = []
    for root in ("src", "tests", "scripts"):
        for path in sorted((REPO / root).rglob("*")):
            if path.suffix in {".py", ".sh"} and path.is_file():
                text = " ".join(path.read_text().split())  # a pointer may span two lines
                pointers += [(path, *m.groups()) for m in _POINTER.finditer(text)]
    assert len(pointers) >= 5, pointers
    for path, doc, section in pointers:
        headings = [
            line.removeprefix("## ")
            for line in (REPO / "docs" / doc).read_text().splitlines()
            if line.startswith("## ")
        ]
        assert any(h.startswith(section) for h in headings), (path, doc, section)
