"""The dial-out's settings (MANAGER_GRPC_URL and its TLS), checked before anything runs: a
target that is this daemon's own server, or attested TLS, is refused naming the variable."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import grpc

from cocos_manager.config.settings import ServiceSettings
from cocos_manager.config.tls import TlsMode, describe_dialout_mode, dialout_credentials
from cocos_manager.config.tls_failures import DIAL_OUT, likely_cause, presented_certificate

_LOCAL_HOSTS = {"localhost", "", "0.0.0.0", "::"}


class DialOutConfigError(Exception):
    """Refuses start-up; the message starts with the variable at fault."""


@dataclass(frozen=True, slots=True)
class DialOutConfig:
    target: str
    timeout: float
    mode: TlsMode
    credentials: grpc.ChannelCredentials | None
    description: str


def _host_port(target: str) -> tuple[str, int] | None:
    """host and port of a `host:port` (or `dns:///host:port`) target; None for other forms."""
    address = target.removeprefix("dns:///").removeprefix("dns:")
    address = address.removeprefix("ipv4:").removeprefix("ipv6:")  # gRPC's address schemes
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, _, port = address.rpartition(":")
    if not port.isdigit():
        return None
    return host.lower(), int(port)


def _is_local(host: str) -> bool:
    if host in _LOCAL_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def dialout_config(service: ServiceSettings) -> DialOutConfig | None:
    """The dial-out's settings, checked: None when MANAGER_GRPC_URL is not set.

    Raises DialOutConfigError (or TlsConfigError) naming the variable, before anything runs.
    """
    mode, credentials = dialout_credentials(service)  # refuses half TLS, with or without URL
    target = service.GRPC_URL.strip()
    if not target:
        return None
    if service.GRPC_ATTESTED_TLS:
        raise DialOutConfigError(
            "MANAGER_GRPC_ATTESTED_TLS: attested TLS to the computations server is not "
            "supported; use MANAGER_GRPC_SERVER_CA_CERTS (or MANAGER_GRPC_URL_CA_CERTS) and "
            "MANAGER_GRPC_CLIENT_CERT/KEY"
        )
    parsed = _host_port(target)
    if parsed is not None:
        host, port = parsed
        own_host = service.GRPC_HOST.strip("[]").lower()
        listens_there = host == own_host or (_is_local(host) and _is_local(own_host))
        if port == service.GRPC_PORT and listens_there:
            raise DialOutConfigError(
                f"MANAGER_GRPC_URL: {target} is this daemon's own gRPC server "
                "(MANAGER_GRPC_HOST/MANAGER_GRPC_PORT); give the computations server's "
                "address, or move this server with MANAGER_GRPC_PORT"
            )
    return DialOutConfig(
        target=target,
        timeout=service.GRPC_TIMEOUT,
        mode=mode,
        credentials=credentials,
        description=describe_dialout_mode(mode, service),
    )


# -- what a failed connection of the dial-out likely means ------------------------------------


def retry_fields(reason: str, mode: TlsMode, rejected: str | None) -> dict[str, str]:
    """The fields a "dial-out retrying" line adds to gRPC's words: the likely cause of a TLS
    failure (as the CLI says it, in MANAGER_GRPC_* terms) and whose certificate was rejected."""
    fields = {}
    likely = likely_cause(
        reason,
        tls=mode is not TlsMode.PLAINTEXT,
        client_certificate=mode is TlsMode.MTLS,
        words=DIAL_OUT,
    )
    if likely:
        fields["likely"] = likely
    if rejected and "CERTIFICATE_VERIFY_FAILED" in reason:
        fields["certificate"] = rejected
    return fields


async def rejected_certificate(details: str, config: DialOutConfig) -> str | None:
    """The computations server's certificate, when gRPC did not trust it (its error never
    says whose it was): read within 5 s in a handshake of our own that verifies nothing."""
    where = _host_port(config.target)
    if "CERTIFICATE_VERIFY_FAILED" not in details or where is None:
        return None
    return await presented_certificate(*where, min(config.timeout, 5.0))
