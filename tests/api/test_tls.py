"""TLS and mutual TLS of the gRPC server, with certificates made here and a real grpc.aio server."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from cocos_manager.config.settings import ServiceSettings
from cocos_manager.config.tls import (
    TlsConfigError,
    TlsMode,
    channel_credentials,
    describe_mode,
    load_pem,
    server_credentials,
)
from tests.support.certs import SERVER_SAN, Issued, issue_certificate

# --- certificates: tests/support/certs.py ----------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Issued
    intermediate: Issued
    server: Issued  # signed by the root CA
    server_via_intermediate: Issued
    client: Issued
    stranger_ca: Issued
    stranger_client: Issued
    dir: Path

    def write(self, name: str, text: str) -> str:
        path = self.dir / name
        path.write_text(text)
        return str(path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca = issue_certificate("Cocos test CA", None, ca=True)
    intermediate = issue_certificate("Cocos test intermediate", ca, ca=True)
    stranger_ca = issue_certificate("Stranger CA", None, ca=True)
    server_usage = ExtendedKeyUsageOID.SERVER_AUTH
    client_usage = ExtendedKeyUsageOID.CLIENT_AUTH
    return Pki(
        ca=ca,
        intermediate=intermediate,
        server=issue_certificate("manager", ca, usage=server_usage, san=SERVER_SAN),
        server_via_intermediate=issue_certificate(
            "manager", intermediate, usage=server_usage, san=SERVER_SAN
        ),
        client=issue_certificate("control plane", ca, usage=client_usage),
        stranger_ca=stranger_ca,
        stranger_client=issue_certificate("stranger", stranger_ca, usage=client_usage),
        dir=tmp_path_factory.mktemp("pki"),
    )


# --- a real server ------------------------------------------------------------------------


@dataclass
class Served:
    mode: TlsMode
    port: int


Serve = Callable[[ServiceSettings], Awaitable[Served]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    servers: list[grpc.aio.Server] = []

    async def start(service: ServiceSettings) -> Served:
        mode, credentials = server_credentials(service)
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(), server)
        if credentials is None:
            port = server.add_insecure_port("127.0.0.1:0")
        else:
            port = server.add_secure_port("127.0.0.1:0", credentials)
        await server.start()
        servers.append(server)
        return Served(mode, port)

    yield start
    for server in servers:
        await server.stop(None)


async def _check(port: int, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    target = f"127.0.0.1:{port}"
    channel = (
        grpc.aio.insecure_channel(target)
        if credentials is None
        else grpc.aio.secure_channel(target, credentials)
    )
    async with channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
        except grpc.aio.AioRpcError as error:
            return error.code()
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    return grpc.StatusCode.OK


def _settings(monkeypatch: pytest.MonkeyPatch, **variables: str) -> ServiceSettings:
    for name, value in variables.items():
        monkeypatch.setenv(f"MANAGER_GRPC_{name}", value)
    return ServiceSettings()


def _mtls_settings(monkeypatch: pytest.MonkeyPatch, pki: Pki) -> ServiceSettings:
    return _settings(
        monkeypatch,
        SERVER_CERT=pki.write("server.pem", pki.server.cert_pem),
        SERVER_KEY=pki.write("server.key", pki.server.key_pem),
        CLIENT_CA_CERTS=pki.write("ca.pem", pki.ca.cert_pem),
    )


# --- modes --------------------------------------------------------------------------------


async def test_plaintext_when_nothing_is_configured(serve: Serve) -> None:
    served = await serve(ServiceSettings())
    assert served.mode is TlsMode.PLAINTEXT
    assert describe_mode(served.mode, ServiceSettings()) == "without TLS"
    assert await _check(served.port, None) is grpc.StatusCode.OK


async def test_tls_serves_a_client_that_trusts_the_ca(
    serve: Serve, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = _settings(
        monkeypatch,
        SERVER_CERT=pki.write("server.pem", pki.server.cert_pem),
        SERVER_KEY=pki.write("server.key", pki.server.key_pem),
    )
    served = await serve(service)
    assert served.mode is TlsMode.TLS
    trusting = channel_credentials(pki.write("ca.pem", pki.ca.cert_pem), None, None)
    assert await _check(served.port, trusting) is grpc.StatusCode.OK
    # A client trusting another CA, or speaking plaintext, gets nowhere.
    distrusting = channel_credentials(pki.stranger_ca.cert_pem, None, None)
    assert await _check(served.port, distrusting) is grpc.StatusCode.UNAVAILABLE
    assert await _check(served.port, None) is grpc.StatusCode.UNAVAILABLE


async def test_server_ca_certs_are_sent_as_the_chain(
    serve: Serve, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client trusts only the root; the intermediate must come from the server."""
    leaf = pki.server_via_intermediate
    root_only = channel_credentials(pki.ca.cert_pem, None, None)
    without = _settings(monkeypatch, SERVER_CERT=leaf.cert_pem, SERVER_KEY=leaf.key_pem)
    served = await serve(without)
    assert await _check(served.port, root_only) is grpc.StatusCode.UNAVAILABLE

    with_chain = _settings(monkeypatch, SERVER_CA_CERTS=pki.intermediate.cert_pem)
    served = await serve(with_chain)
    assert served.mode is TlsMode.TLS
    assert await _check(served.port, root_only) is grpc.StatusCode.OK


async def test_mtls_serves_only_clients_certified_by_the_client_ca(
    serve: Serve, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = _mtls_settings(monkeypatch, pki)
    served = await serve(service)
    assert served.mode is TlsMode.MTLS
    assert "client CA" in describe_mode(served.mode, service)
    ca = pki.write("ca.pem", pki.ca.cert_pem)

    certified = channel_credentials(
        ca,
        pki.write("client.pem", pki.client.cert_pem),
        pki.write("client.key", pki.client.key_pem),
    )
    assert await _check(served.port, certified) is grpc.StatusCode.OK

    no_certificate = channel_credentials(ca, None, None)
    assert await _check(served.port, no_certificate) is grpc.StatusCode.UNAVAILABLE

    stranger = channel_credentials(ca, pki.stranger_client.cert_pem, pki.stranger_client.key_pem)
    assert await _check(served.port, stranger) is grpc.StatusCode.UNAVAILABLE

    assert await _check(served.port, None) is grpc.StatusCode.UNAVAILABLE


async def test_pem_text_in_the_variables_works_like_paths(
    serve: Serve, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = _settings(
        monkeypatch,
        SERVER_CERT=pki.server.cert_pem,
        SERVER_KEY=pki.server.key_pem,
        CLIENT_CA_CERTS=pki.ca.cert_pem,
    )
    served = await serve(service)
    assert served.mode is TlsMode.MTLS
    assert "(PEM text)" in describe_mode(served.mode, service)
    certified = channel_credentials(pki.ca.cert_pem, pki.client.cert_pem, pki.client.key_pem)
    assert await _check(served.port, certified) is grpc.StatusCode.OK
    stranger = channel_credentials(
        pki.ca.cert_pem, pki.stranger_client.cert_pem, pki.stranger_client.key_pem
    )
    assert await _check(served.port, stranger) is grpc.StatusCode.UNAVAILABLE


async def test_one_line_pem_with_escaped_newlines_and_a_combined_file(
    serve: Serve, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Environment files often hold PEM as one line with \\n; a file may hold cert and key."""
    combined = pki.write("combined.pem", pki.server.cert_pem + pki.server.key_pem)
    service = _settings(
        monkeypatch,
        SERVER_CERT=combined,
        SERVER_KEY=combined,
        CLIENT_CA_CERTS=pki.ca.cert_pem.replace("\n", "\\n"),
    )
    served = await serve(service)
    certified = channel_credentials(pki.ca.cert_pem, pki.client.cert_pem, pki.client.key_pem)
    assert await _check(served.port, certified) is grpc.StatusCode.OK


# --- refusals -----------------------------------------------------------------------------


def _refusal(monkeypatch: pytest.MonkeyPatch, **variables: str) -> str:
    with pytest.raises(TlsConfigError) as raised:
        server_credentials(_settings(monkeypatch, **variables))
    return str(raised.value)


def test_certificate_without_key_names_the_key(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    message = _refusal(monkeypatch, SERVER_CERT=pki.server.cert_pem)
    assert message.startswith("MANAGER_GRPC_SERVER_KEY: ")


def test_key_without_certificate_names_the_certificate(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    message = _refusal(monkeypatch, SERVER_KEY=pki.server.key_pem)
    assert message.startswith("MANAGER_GRPC_SERVER_CERT: ")


@pytest.mark.parametrize("name", ["SERVER_CA_CERTS", "CLIENT_CA_CERTS"])
def test_ca_without_certificate_and_key_names_the_ca(
    name: str, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    message = _refusal(monkeypatch, **{name: pki.ca.cert_pem})
    assert message.startswith(f"MANAGER_GRPC_{name}: ")


@pytest.mark.parametrize(
    "name", ["SERVER_CERT", "SERVER_KEY", "SERVER_CA_CERTS", "CLIENT_CA_CERTS"]
)
def test_unreadable_file_names_the_variable(
    name: str, pki: Pki, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    variables = {
        "SERVER_CERT": pki.server.cert_pem,
        "SERVER_KEY": pki.server.key_pem,
        name: str(tmp_path / "missing.pem"),
    }
    message = _refusal(monkeypatch, **variables)
    assert message.startswith(f"MANAGER_GRPC_{name}: cannot read ")
    assert "missing.pem" in message


@pytest.mark.parametrize(
    "name", ["SERVER_CERT", "SERVER_KEY", "SERVER_CA_CERTS", "CLIENT_CA_CERTS"]
)
@pytest.mark.parametrize(
    "garbage",
    [
        "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n",
        "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n",
        "-----BEGIN CERTIFICATE-----\ntruncated",
    ],
    ids=["bad-certificate", "bad-key", "truncated"],
)
def test_pem_that_does_not_parse_names_the_variable(
    name: str, garbage: str, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    variables = {
        "SERVER_CERT": pki.server.cert_pem,
        "SERVER_KEY": pki.server.key_pem,
        name: garbage,
    }
    message = _refusal(monkeypatch, **variables)
    assert message.startswith(f"MANAGER_GRPC_{name}: ")


def test_a_file_without_pem_names_the_variable(
    pki: Pki, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_bytes(b"\x00\x01 not pem at all")
    message = _refusal(monkeypatch, SERVER_CERT=str(junk), SERVER_KEY=pki.server.key_pem)
    assert message.startswith("MANAGER_GRPC_SERVER_CERT: ")
    assert "no PEM" in message


def test_key_that_does_not_match_the_certificate(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    message = _refusal(monkeypatch, SERVER_CERT=pki.server.cert_pem, SERVER_KEY=pki.client.key_pem)
    assert message.startswith("MANAGER_GRPC_SERVER_KEY: ")
    assert "does not match" in message


def test_encrypted_key_is_refused_with_a_reason(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    encrypted = pki.server.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    ).decode()
    message = _refusal(monkeypatch, SERVER_CERT=pki.server.cert_pem, SERVER_KEY=encrypted)
    assert message.startswith("MANAGER_GRPC_SERVER_KEY: ")
    assert "encrypted" in message


def test_load_pem(pki: Pki, tmp_path: Path) -> None:
    assert load_pem("X", "") is None
    from_text = load_pem("X", pki.ca.cert_pem)
    path = tmp_path / "ca.pem"
    path.write_text(pki.ca.cert_pem)
    assert from_text is not None and from_text == load_pem("X", str(path))
    assert x509.load_pem_x509_certificate(from_text) == pki.ca.cert
    # openssl's EC PARAMETERS block is dropped; the key is re-encoded as PKCS#8.
    params = "-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n-----END EC PARAMETERS-----\n"
    key = load_pem("K", params + pki.client.key_pem)
    assert key is not None and key.startswith(b"-----BEGIN PRIVATE KEY-----")
    with pytest.raises(TlsConfigError, match=r"^X: "):
        load_pem("X", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----")


def test_client_options_are_checked_too(pki: Pki) -> None:
    with pytest.raises(TlsConfigError, match=r"^--key: not set"):
        channel_credentials(None, pki.client.cert_pem, None)
    with pytest.raises(TlsConfigError, match=r"^--cert: not set"):
        channel_credentials(None, None, pki.client.key_pem)
    with pytest.raises(TlsConfigError, match=r"^--ca: cannot read"):
        channel_credentials("/nonexistent/ca.pem", None, None)
    with pytest.raises(TlsConfigError, match=r"^--key: the private key does not match"):
        channel_credentials(None, pki.client.cert_pem, pki.server.key_pem)


# --- failures explained: the real daemon and the real CLI ---------------------------------


@dataclass
class CliRun:
    code: int
    err: str


def _cli(address: str, *options: str) -> CliRun:
    import subprocess
    import sys

    cli = str(Path(sys.executable).with_name("cocos-manager-cli"))
    done = subprocess.run(
        [cli, "stop", "nobody", "--address", address, "--timeout", "10", *options],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return CliRun(done.returncode, done.stderr)


def test_tls_failures_are_explained_by_the_cli_and_logged_as_json_by_the_daemon(
    pki: Pki, tmp_path: Path
) -> None:
    from tests.support.logged_daemon import logged_daemon

    ca = pki.write("ca.pem", pki.ca.cert_pem)
    env = {
        "MANAGER_GRPC_HOST": "127.0.0.1",
        "MANAGER_GRPC_PORT": "0",
        "MANAGER_STATE_DIR": str(tmp_path / "state"),
        "MANAGER_QEMU_TMP_FILE_LOC": str(tmp_path / "vms"),
        "COCOS_JAEGER_URL": "off",
        "MANAGER_GRPC_SERVER_CERT": pki.write("server.pem", pki.server.cert_pem),
        "MANAGER_GRPC_SERVER_KEY": pki.write("server.key", pki.server.key_pem),
        "MANAGER_GRPC_CLIENT_CA_CERTS": ca,
    }
    with logged_daemon(tmp_path / "daemon", env) as daemon:
        address = f"127.0.0.1:{daemon.port()}"
        plaintext = _cli(address)
        no_certificate = _cli(address, "--ca", ca)
        stranger = _cli(
            address,
            "--ca", ca,
            "--cert", pki.write("stranger.pem", pki.stranger_client.cert_pem),
            "--key", pki.write("stranger.key", pki.stranger_client.key_pem),
        )  # fmt: skip
        wrong_ca = _cli(address, "--ca", pki.write("stranger-ca.pem", pki.stranger_ca.cert_pem))
        certified = _cli(
            address,
            "--ca", ca,
            "--cert", pki.write("client.pem", pki.client.cert_pem),
            "--key", pki.write("client.key", pki.client.key_pem),
        )  # fmt: skip
        failures = [
            daemon.wait_for('"reason":"WRONG_VERSION_NUMBER"'),
            daemon.wait_for('"reason":"PEER_DID_NOT_RETURN_A_CERTIFICATE"'),
            daemon.wait_for('"reason":"CERTIFICATE_VERIFY_FAILED"'),
        ]

    # The CLI: which of the three it likely is, and what to pass.
    assert plaintext.code == 1 and "it likely speaks TLS; pass --ca" in plaintext.err
    assert no_certificate.code == 1
    assert "requires a client certificate (mutual TLS); pass --cert and --key" in (
        no_certificate.err
    )
    assert stranger.code == 1 and "does not accept your certificate" in stranger.err
    assert "MANAGER_GRPC_CLIENT_CA_CERTS" in stranger.err
    assert wrong_ca.code == 1 and "not signed by the CA you trust" in wrong_ca.err
    # A certified client gets through TLS to the service (which knows no such computation).
    assert certified.code == 1 and "NOT_FOUND" in certified.err, certified.err

    # The daemon: JSON lines with the peer address and what each likely means.
    for record in failures:
        assert record["message"] == "TLS handshake failed"
        assert record["level"] == "warn"
        assert record["side"] == "server"
        assert record["peer"].startswith("ipv4:127.0.0.1:")
    assert failures[0]["likely"] == "the client speaks plaintext to this TLS port"
    assert "sent no certificate" in failures[1]["likely"]
    assert "MANAGER_GRPC_CLIENT_CA_CERTS" in failures[2]["likely"]
    # gRPC core's own lines are kept out: every stdout line is JSON, stderr holds nothing.
    for line in daemon.lines():
        json.loads(line)
    assert daemon.stderr.read_text() == ""


def test_tls_client_against_a_plaintext_daemon_is_told_to_drop_tls(
    pki: Pki, tmp_path: Path
) -> None:
    from tests.support.logged_daemon import logged_daemon

    env = {
        "MANAGER_GRPC_HOST": "127.0.0.1",
        "MANAGER_GRPC_PORT": "0",
        "MANAGER_STATE_DIR": str(tmp_path / "state"),
        "MANAGER_QEMU_TMP_FILE_LOC": str(tmp_path / "vms"),
        "COCOS_JAEGER_URL": "off",
    }
    with logged_daemon(tmp_path / "daemon", env) as daemon:
        run = _cli(f"127.0.0.1:{daemon.port()}", "--ca", pki.write("ca.pem", pki.ca.cert_pem))
    assert run.code == 1
    assert "the server speaks plaintext, not TLS: leave out --ca, --cert and --key" in run.err
