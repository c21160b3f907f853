"""grpcurl, a third-party client that knows nothing but what reflection tells it, driving the
manager; with certificates made by the openssl command line for the TLS cases."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.harness import Manager, running_manager

GRPCURL = shutil.which("grpcurl") or str(Path(sys.executable).with_name("grpcurl"))


async def grpcurl(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        GRPCURL, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def run_json(computation_id: str) -> str:
    digest = base64.b64encode(hashlib.sha3_256(b"algo").digest()).decode()
    return json.dumps({
        "id": computation_id,
        "algorithm": {"id": "a", "hash": digest},
        "datasets": [{"id": "d", "hash": digest}],
        "agent_config": {"port": "7002", "attested_tls": True},
    })  # fmt: skip


@pytest.fixture
async def manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    async with running_manager(tmp_path, monkeypatch) as m:
        yield m


async def test_list_through_reflection(manager: Manager) -> None:
    code, out, err = await grpcurl("-plaintext", manager.address, "list")
    assert code == 0, err
    assert "manager.ManagerService" in out.split()
    code, out, _ = await grpcurl(
        "-plaintext", manager.address, "describe", "manager.ManagerService"
    )
    assert "rpc Run ( .manager.ComputationRunReq ) returns ( .manager.RunResponse );" in out


async def test_run_stop_and_statuses(manager: Manager) -> None:
    code, out, err = await grpcurl("-plaintext", "-d", run_json("g1"), manager.address,
                                   "manager.ManagerService/Run")  # fmt: skip
    assert code == 0, err
    response = json.loads(out)
    assert response["computation_id"] == "g1" and int(response["agent_port"]) > 0
    code, _, err = await grpcurl("-plaintext", "-d", run_json("g1"), manager.address,
                                 "manager.ManagerService/Run")  # fmt: skip
    assert code != 0 and "AlreadyExists" in err
    code, _, err = await grpcurl("-plaintext", "-d", '{"id": "bad", "agent_config": {}}',
                                 manager.address, "manager.ManagerService/Run")  # fmt: skip
    assert code != 0 and "InvalidArgument" in err and "algorithm" in err
    code, _, err = await grpcurl("-plaintext", "-d", '{"computation_id": "g1"}', manager.address,
                                 "manager.ManagerService/Stop")  # fmt: skip
    assert code == 0, err
    code, _, err = await grpcurl("-plaintext", "-d", '{"computation_id": "g1"}', manager.address,
                                 "manager.ManagerService/Stop")  # fmt: skip
    assert code != 0 and "NotFound" in err
    assert manager.service.computations() == {}


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(root: Path) -> None:
    """A CA, a server certificate for localhost, a client it certifies, and a stranger's client."""
    for ca in ("ca", "stranger-ca"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                f"/CN={ca}", "-keyout", f"{ca}.key", "-out", f"{ca}.crt", cwd=root)  # fmt: skip
    (root / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name, ca, ext in (("server", "ca", ["-extfile", "san.ext"]), ("client", "ca", []),
                          ("stranger", "stranger-ca", [])):  # fmt: skip
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=root)  # fmt: skip
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
                "-CAcreateserial", "-days", "2", "-out", f"{name}.crt", *ext, cwd=root)  # fmt: skip


async def test_mutual_tls_with_openssl_certificates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pki = tmp_path / "pki"
    pki.mkdir()
    make_pki(pki)
    async with running_manager(
        tmp_path, monkeypatch,
        MANAGER_GRPC_SERVER_CERT=str(pki / "server.crt"),
        MANAGER_GRPC_SERVER_KEY=(pki / "server.key").read_text(),  # PEM text works like a path
        MANAGER_GRPC_CLIENT_CA_CERTS=str(pki / "ca.crt"),
    ) as m:  # fmt: skip
        target = f"localhost:{m.server.port}"
        tls = ["-cacert", str(pki / "ca.crt")]
        code, out, err = await grpcurl(*tls, "-cert", str(pki / "client.crt"),
                                       "-key", str(pki / "client.key"), target, "list")  # fmt: skip
        assert code == 0, err
        assert "manager.ManagerService" in out
        # Each refusal fails the handshake, which grpcurl retries until its connect timeout
        # (10 s unless told).
        for refused in (
            [*tls, target, "list"],  # no client certificate
            [*tls, "-cert", str(pki / "stranger.crt"), "-key", str(pki / "stranger.key"),
             target, "list"],  # a stranger CA's client
            ["-plaintext", target, "list"],  # no TLS at all
        ):  # fmt: skip
            code, _, err = await grpcurl("-connect-timeout", "2", *refused)
            assert code != 0, refused
            assert "Failed to dial target host" in err, err
