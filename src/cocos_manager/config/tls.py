"""Transport security of the gRPC server and of the CLI's channel.

Every certificate and key variable takes a file path or the PEM text itself, so that secrets
can come from a file on disk or straight from an orchestrator's environment. Everything is
parsed here, before gRPC sees it: gRPC only reports a bad certificate when the first client
connects, long after start-up, while an operator needs a refusal to start that names the
variable at fault.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

import grpc

from cocos_manager.config.settings import ServiceSettings

# cryptography is imported where a certificate or key is parsed: a plaintext daemon (and every
# start-up before TLS is looked at) does not pay for loading it.
if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

SERVER_CERT = "MANAGER_GRPC_SERVER_CERT"
SERVER_KEY = "MANAGER_GRPC_SERVER_KEY"
SERVER_CA_CERTS = "MANAGER_GRPC_SERVER_CA_CERTS"
CLIENT_CA_CERTS = "MANAGER_GRPC_CLIENT_CA_CERTS"

_PEM_MARKER = "-----BEGIN"
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----.*?-----END \1-----", re.DOTALL)


class TlsConfigError(Exception):
    """Refuses start-up; the message starts with the variable (or option) at fault."""


class TlsMode(StrEnum):
    """What the server demands of its clients; logged at start as the original did."""

    PLAINTEXT = "plaintext"
    TLS = "TLS"
    MTLS = "mTLS"


@dataclass(frozen=True, slots=True)
class _PemBlock:
    label: str
    data: bytes


def _read(variable_name: str, value: str) -> bytes:
    """PEM text is taken as is; anything else is a path to read."""
    if _PEM_MARKER in value:
        # Environment files often carry PEM on one line with literal "\n" escapes.
        text = value.replace("\\n", "\n") if "\n" not in value else value
        return text.encode()
    try:
        with open(value, "rb") as file:
            return file.read()
    except OSError as error:
        reason = error.strerror or str(error)
        raise TlsConfigError(f"{variable_name}: cannot read {value!r}: {reason}") from None


def _blocks(variable_name: str, value: str) -> list[_PemBlock]:
    data = _read(variable_name, value)
    blocks = [_PemBlock(m.group(1).decode(), m.group(0)) for m in _PEM_BLOCK.finditer(data)]
    if not blocks:
        source = "the PEM text" if _PEM_MARKER in value else repr(value)
        raise TlsConfigError(f"{variable_name}: {source} contains no PEM block")
    return blocks


def _certificate(variable_name: str, block: _PemBlock, index: int) -> x509.Certificate:
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificate(block.data)
    except ValueError as error:
        raise TlsConfigError(
            f"{variable_name}: certificate #{index} does not parse: {error}"
        ) from None


def _private_key(variable_name: str, block: _PemBlock) -> PrivateKeyTypes:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    try:
        return serialization.load_pem_private_key(block.data, password=None)
    except TypeError:
        raise TlsConfigError(
            f"{variable_name}: the private key is encrypted; give it unencrypted"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as error:
        raise TlsConfigError(f"{variable_name}: the private key does not parse: {error}") from None


def _is_key(block: _PemBlock) -> bool:
    return block.label.endswith("PRIVATE KEY")


def load_certificates(variable_name: str, value: str) -> list[x509.Certificate]:
    """Every CERTIFICATE block of the value, parsed; other blocks (a key) are ignored."""
    blocks = [block for block in _blocks(variable_name, value) if block.label == "CERTIFICATE"]
    if not blocks:
        raise TlsConfigError(f"{variable_name}: no CERTIFICATE block found")
    return [_certificate(variable_name, block, i) for i, block in enumerate(blocks, start=1)]


def load_private_key(variable_name: str, value: str) -> PrivateKeyTypes:
    """The one private key of the value; a file holding the certificate too is fine."""
    keys = [block for block in _blocks(variable_name, value) if _is_key(block)]
    if not keys:
        raise TlsConfigError(f"{variable_name}: no PRIVATE KEY block found")
    if len(keys) > 1:
        raise TlsConfigError(f"{variable_name}: more than one private key")
    return _private_key(variable_name, keys[0])


def _certificates_pem(certificates: Sequence[x509.Certificate]) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certificates)


def _key_pem(key: PrivateKeyTypes) -> bytes:
    from cryptography.hazmat.primitives import serialization

    # Re-encoded as PKCS#8 so that gRPC gets one spelling whatever openssl wrote.
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_pem(variable_name: str, value: str) -> bytes | None:
    """The value's certificates and keys, checked and re-encoded as PEM; None when empty.

    Blocks that are neither (such as openssl's EC PARAMETERS) are dropped.
    """
    if not value:
        return None
    parts: list[bytes] = []
    certificate_index = 0
    for block in _blocks(variable_name, value):
        if block.label == "CERTIFICATE":
            certificate_index += 1
            cert = _certificate(variable_name, block, certificate_index)
            parts.append(_certificates_pem([cert]))
        elif _is_key(block):
            parts.append(_key_pem(_private_key(variable_name, block)))
    if not parts:
        raise TlsConfigError(f"{variable_name}: no CERTIFICATE or PRIVATE KEY block found")
    return b"".join(parts)


def _check_key_matches(
    cert_name: str, key_name: str, cert: x509.Certificate, key: PrivateKeyTypes
) -> None:
    from cryptography.hazmat.primitives import serialization

    public = serialization.PublicFormat.SubjectPublicKeyInfo
    encoding = serialization.Encoding.DER
    if cert.public_key().public_bytes(encoding, public) != key.public_key().public_bytes(
        encoding, public
    ):
        raise TlsConfigError(f"{key_name}: the private key does not match {cert_name}")


def _key_and_chain(
    cert_name: str,
    cert_value: str,
    key_name: str,
    key_value: str,
    extra: Sequence[x509.Certificate],
) -> tuple[bytes, bytes]:
    """(key PEM, chain PEM): the first certificate is the leaf, then the rest, then `extra`."""
    if cert_value and not key_value:
        raise TlsConfigError(f"{key_name}: not set, but {cert_name} is")
    if key_value and not cert_value:
        raise TlsConfigError(f"{cert_name}: not set, but {key_name} is")
    certificates = load_certificates(cert_name, cert_value)
    key = load_private_key(key_name, key_value)
    _check_key_matches(cert_name, key_name, certificates[0], key)
    return _key_pem(key), _certificates_pem([*certificates, *extra])


def server_credentials(service: ServiceSettings) -> tuple[TlsMode, grpc.ServerCredentials | None]:
    """Credentials for `server.add_secure_port`, or None: serve with `add_insecure_port`.

    SERVER_CA_CERTS are sent after the server certificate so that clients which trust only
    the root can build the path. CLIENT_CA_CERTS makes client certificates mandatory.
    """
    cert, key = service.GRPC_SERVER_CERT, service.GRPC_SERVER_KEY
    if not cert and not key:
        for name, value in (
            # With MANAGER_GRPC_URL set, SERVER_CA_CERTS is the dial-out's trust root too.
            (SERVER_CA_CERTS, "" if service.GRPC_URL else service.GRPC_SERVER_CA_CERTS),
            (CLIENT_CA_CERTS, service.GRPC_CLIENT_CA_CERTS),
        ):
            if value:
                raise TlsConfigError(f"{name}: set, but {SERVER_CERT} and {SERVER_KEY} are not")
        return TlsMode.PLAINTEXT, None
    intermediates = (
        load_certificates(SERVER_CA_CERTS, service.GRPC_SERVER_CA_CERTS)
        if service.GRPC_SERVER_CA_CERTS
        else []
    )
    key_pem, chain_pem = _key_and_chain(SERVER_CERT, cert, SERVER_KEY, key, intermediates)
    client_ca = (
        _certificates_pem(load_certificates(CLIENT_CA_CERTS, service.GRPC_CLIENT_CA_CERTS))
        if service.GRPC_CLIENT_CA_CERTS
        else None
    )
    credentials = grpc.ssl_server_credentials(
        [(key_pem, chain_pem)],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )
    return (TlsMode.MTLS if client_ca else TlsMode.TLS), credentials


def _describe_source(value: str) -> str:
    return "(PEM text)" if _PEM_MARKER in value else value


def describe_mode(mode: TlsMode, service: ServiceSettings) -> str:
    """The start-up log line's tail, worded like the original's ("with TLS cert ... and key ...")."""
    if mode is TlsMode.PLAINTEXT:
        return "without TLS"
    text = (
        f"with {mode} cert {_describe_source(service.GRPC_SERVER_CERT)} "
        f"and key {_describe_source(service.GRPC_SERVER_KEY)}"
    )
    if service.GRPC_SERVER_CA_CERTS:
        text += f", server CA {_describe_source(service.GRPC_SERVER_CA_CERTS)}"
    if service.GRPC_CLIENT_CA_CERTS:
        text += f", client CA {_describe_source(service.GRPC_CLIENT_CA_CERTS)}"
    return text


def channel_credentials(
    ca: str | None,
    cert: str | None,
    key: str | None,
    *,
    names: tuple[str, str, str] = ("--ca", "--cert", "--key"),
) -> grpc.ChannelCredentials:
    """TLS for the CLI's channel; `names` are what errors call the three inputs.

    No CA means the system's trust store. A certificate and key make it a mutual-TLS client.
    """
    ca_name, cert_name, key_name = names
    root = _certificates_pem(load_certificates(ca_name, ca)) if ca else None
    if not cert and not key:
        return grpc.ssl_channel_credentials(root_certificates=root)
    key_pem, chain_pem = _key_and_chain(cert_name, cert or "", key_name, key or "", [])
    return grpc.ssl_channel_credentials(
        root_certificates=root, private_key=key_pem, certificate_chain=chain_pem
    )


# -- dial-out to a computations server (api/dialout.py) -------------------------------------------

URL = "MANAGER_GRPC_URL"
CLIENT_CERT = "MANAGER_GRPC_CLIENT_CERT"
CLIENT_KEY = "MANAGER_GRPC_CLIENT_KEY"
URL_CA_CERTS = "MANAGER_GRPC_URL_CA_CERTS"


def dialout_trust_root(service: ServiceSettings) -> tuple[str, str]:
    """(variable, value) of the CA the computations server's certificate must chain to.

    The original's client read MANAGER_GRPC_SERVER_CA_CERTS for this, while its server (and
    ours) sends that variable as the chain of its own certificate. MANAGER_GRPC_URL_CA_CERTS,
    when set, takes the client role alone so that the two can differ.
    """
    if service.GRPC_URL_CA_CERTS:
        return URL_CA_CERTS, service.GRPC_URL_CA_CERTS
    return SERVER_CA_CERTS, service.GRPC_SERVER_CA_CERTS


def dialout_credentials(
    service: ServiceSettings,
) -> tuple[TlsMode, grpc.ChannelCredentials | None]:
    """The dial-out channel's credentials, or None for plaintext; checked before start-up.

    As the original: a CA makes it TLS, a client certificate and key on top make it mutual
    TLS. Unlike the original, a client certificate without a CA is not silently dropped (it
    would have connected in plaintext): it is TLS against the system's trust store.
    """
    if not service.GRPC_URL:
        for name, value in (
            (CLIENT_CERT, service.GRPC_CLIENT_CERT),
            (CLIENT_KEY, service.GRPC_CLIENT_KEY),
            (URL_CA_CERTS, service.GRPC_URL_CA_CERTS),
        ):
            if value:
                raise TlsConfigError(f"{name}: set, but {URL} is not")
        return TlsMode.PLAINTEXT, None
    ca_name, ca_value = dialout_trust_root(service)
    cert, key = service.GRPC_CLIENT_CERT, service.GRPC_CLIENT_KEY
    if not ca_value and not cert and not key:
        return TlsMode.PLAINTEXT, None
    root = _certificates_pem(load_certificates(ca_name, ca_value)) if ca_value else None
    if not cert and not key:
        return TlsMode.TLS, grpc.ssl_channel_credentials(root_certificates=root)
    key_pem, chain_pem = _key_and_chain(CLIENT_CERT, cert, CLIENT_KEY, key, [])
    credentials = grpc.ssl_channel_credentials(
        root_certificates=root, private_key=key_pem, certificate_chain=chain_pem
    )
    return TlsMode.MTLS, credentials


def describe_dialout_mode(mode: TlsMode, service: ServiceSettings) -> str:
    """How the dial-out channel is secured, for its start-up log line."""
    if mode is TlsMode.PLAINTEXT:
        return "without TLS"
    ca_name, ca_value = dialout_trust_root(service)
    text = f"with {mode}, server CA " + (
        f"{_describe_source(ca_value)} ({ca_name})" if ca_value else "from the system trust store"
    )
    if mode is TlsMode.MTLS:
        text += (
            f", client cert {_describe_source(service.GRPC_CLIENT_CERT)}"
            f" and key {_describe_source(service.GRPC_CLIENT_KEY)}"
        )
    return text
