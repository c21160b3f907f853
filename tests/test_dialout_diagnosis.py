"""The dial-out's TLS failures get the CLI's "likely cause" diagnosis, in the dial-out's own
terms (MANAGER_GRPC_* variables): before, its "dial-out retrying" line carried gRPC's bare
"Socket closed", which says nothing of the three mistakes it stands for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.api.test_dialout import computations_server, dialing_manager, until
from tests.support.certs import issue


async def _first_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str, **env: str
) -> dict[str, Any]:
    with capture_logs() as logs:
        async with dialing_manager(tmp_path, monkeypatch, url, **env) as (_, dialout, _):
            await until(lambda: dialout.attempts >= 1, "a failed attempt")
    retries = [r for r in logs if r["event"] == "dial-out retrying"]
    assert retries, logs
    return retries[0]


async def test_tls_failures_of_the_dial_out_say_what_they_likely_mean(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca, stranger_ca = issue("computations CA"), issue("stranger CA")
    server_cert, server_key = issue("computations", ca, server=True).write(tmp_path, "server")
    client_cert, client_key = issue("manager", ca).write(tmp_path, "client")
    ca_file = tmp_path / "ca.crt"
    ca_file.write_text(ca.cert_pem)
    async with computations_server(tmp_path, tls=(server_cert, server_key, str(ca_file))) as mtls:
        plaintext = await _first_retry(tmp_path / "plain", monkeypatch, mtls.url)
        no_certificate = await _first_retry(
            tmp_path / "no-cert", monkeypatch, mtls.url, MANAGER_GRPC_URL_CA_CERTS=str(ca_file)
        )
        distrust = await _first_retry(
            tmp_path / "distrust",
            monkeypatch,
            mtls.url,
            MANAGER_GRPC_URL_CA_CERTS=stranger_ca.cert_pem,
            MANAGER_GRPC_CLIENT_CERT=client_cert,
            MANAGER_GRPC_CLIENT_KEY=client_key,
        )
    (tmp_path / "plain-server").mkdir()
    async with computations_server(tmp_path / "plain-server") as plain:
        tls_to_plaintext = await _first_retry(
            tmp_path / "tls", monkeypatch, plain.url, MANAGER_GRPC_URL_CA_CERTS=str(ca_file)
        )

    assert "it likely speaks TLS; set MANAGER_GRPC_URL_CA_CERTS" in plaintext["likely"]
    assert (
        "requires a client certificate (mutual TLS); set MANAGER_GRPC_CLIENT_CERT"
        in (no_certificate["likely"])
    )
    assert "not signed by the CA you trust: set MANAGER_GRPC_URL_CA_CERTS" in distrust["likely"]
    # Whose certificate that was: gRPC's error does not say.
    assert distrust["certificate"] == "subject CN=computations, issuer CN=computations CA"
    assert (
        "speaks plaintext, not TLS: unset MANAGER_GRPC_URL_CA_CERTS" in (tls_to_plaintext["likely"])
    )
    for record in (plaintext, no_certificate, distrust, tls_to_plaintext):
        assert "--ca" not in record["likely"]  # the CLI's words are not the daemon's
