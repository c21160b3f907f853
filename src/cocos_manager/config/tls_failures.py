"""What a gRPC client's failed connection most likely means, and what to change, for the two
clients of this project: `cocos-manager-cli` (options and COCOS_MANAGER_* variables) and the
daemon's dial-out (MANAGER_GRPC_* variables). One diagnosis, two vocabularies.

gRPC reports three different TLS mistakes the same way ("Socket closed": the server hung up
during the handshake), so what the client sent (TLS or not, a certificate or not) tells them
apart.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ClientVocabulary:
    """What this client's operator changes in each case, as the end of a sentence."""

    drop_tls: str  # the server speaks plaintext
    trust_its_ca: str  # the server's certificate is not signed by a trusted CA
    use_tls: str  # the server hung up on plaintext
    give_certs: str  # the server hung up on a client without a certificate
    other_certificate: str  # the server hung up on this client's certificate


CLI = ClientVocabulary(
    drop_tls="leave out --ca, --cert and --key (and COCOS_MANAGER_CA, _CERT, _KEY)",
    trust_its_ca="pass the CA that signed it with --ca (without --ca the system's trust store "
    "is used)",
    use_tls="pass --ca CA.pem (and --cert/--key if it requires client certificates; or set "
    "COCOS_MANAGER_CA, _CERT, _KEY)",
    give_certs="pass --cert and --key (or set COCOS_MANAGER_CERT and COCOS_MANAGER_KEY)",
    other_certificate="your certificate (--cert must be signed by the CA in the server's "
    "MANAGER_GRPC_CLIENT_CA_CERTS)",
)

DIAL_OUT = ClientVocabulary(
    drop_tls="unset MANAGER_GRPC_URL_CA_CERTS, MANAGER_GRPC_SERVER_CA_CERTS, "
    "MANAGER_GRPC_CLIENT_CERT and MANAGER_GRPC_CLIENT_KEY",
    trust_its_ca="set MANAGER_GRPC_URL_CA_CERTS (or MANAGER_GRPC_SERVER_CA_CERTS) to the CA "
    "that signed it (without them the system's trust store is used)",
    use_tls="set MANAGER_GRPC_URL_CA_CERTS (or MANAGER_GRPC_SERVER_CA_CERTS) to its CA (and "
    "MANAGER_GRPC_CLIENT_CERT/_KEY if it requires client certificates)",
    give_certs="set MANAGER_GRPC_CLIENT_CERT and MANAGER_GRPC_CLIENT_KEY",
    other_certificate="the manager's certificate (MANAGER_GRPC_CLIENT_CERT must be signed by a "
    "CA the computations server trusts)",
)


def likely_cause(
    details: str, *, tls: bool, client_certificate: bool, words: ClientVocabulary
) -> str:
    """The likely cause of an UNAVAILABLE call's `details`, and the fix; "" when unknown."""
    if "WRONG_VERSION_NUMBER" in details or "HTTP_REQUEST" in details:
        return f"the server speaks plaintext, not TLS: {words.drop_tls}"
    if "CERTIFICATE_VERIFY_FAILED" in details:
        return f"the server's certificate is not signed by the CA you trust: {words.trust_its_ca}"
    if "Socket closed" not in details and "Connection reset" not in details:
        return ""
    if not tls:
        return (
            "the server closed the connection during set-up: it likely speaks TLS; " + words.use_tls
        )
    if not client_certificate:
        return (
            "the server closed the connection during the TLS handshake: it likely requires a "
            f"client certificate (mutual TLS); {words.give_certs}"
        )
    return (
        "the server closed the connection during the TLS handshake: it likely does not accept "
        + words.other_certificate
    )


async def presented_certificate(host: str, port: int, timeout: float = 5.0) -> str | None:
    """Who the server at host:port says it is: its certificate's subject and issuer, read in
    a handshake of our own that verifies nothing and sends nothing after it (gRPC core rejects
    a certificate without saying whose it was). None when it cannot be read."""
    import asyncio
    import ssl

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(
                host, port, ssl=context, server_hostname=host or None
            )
    except (OSError, TimeoutError, ssl.SSLError):
        return None
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()
    if not der:
        return None
    from cryptography import x509

    certificate = x509.load_der_x509_certificate(der)
    return (
        f"subject {certificate.subject.rfc4514_string()}, "
        f"issuer {certificate.issuer.rfc4514_string()}"
    )
