"""The daemon's gRPC listen address, how it is bound, and the line a failed bind is refused with.

`cocos-manager check` binds it the same way (gRPC itself, the same options, then released)
rather than guessing from a socket of its own: gRPC's `[::]` is dual-stack, and whether a port
another process holds can be shared depends on SO_REUSEPORT, which gRPC sets by default and
the daemon turns off.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc

from cocos_manager.telemetry import grpc_core_silenced

LISTEN_OPTIONS: list[tuple[str, int]] = [
    # gRPC sets SO_REUSEPORT by default: a second daemon would then share the port with the
    # first one, and each would get half of the connections.
    ("grpc.so_reuseport", 0),
]


class ListenRefusedError(Exception):
    """The listen address cannot be bound; the message is the operator's one line."""


def listen_address(host: str, port: int) -> str:
    if not host:
        return f"[::]:{port}"
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def grpc_listen_refusal(host: str, port: int, error: object) -> str:
    return (
        f"MANAGER_GRPC_HOST/MANAGER_GRPC_PORT: cannot listen on "
        f"{listen_address(host, port)}: {error}"
    )


def probe_grpc_listen(host: str, port: int) -> None:
    """Binds host:port as the daemon's server does, and lets it go; ListenRefusedError with
    the daemon's own line when it cannot. Blocking: for `cocos-manager check`, not the loop.
    gRPC core's own line about the failed bind is kept off check's stderr: the FAIL line
    says it."""
    with ThreadPoolExecutor(max_workers=1) as pool, grpc_core_silenced():
        server = grpc.server(pool, options=LISTEN_OPTIONS)
        try:
            server.add_insecure_port(listen_address(host, port))
        except RuntimeError as error:
            raise ListenRefusedError(grpc_listen_refusal(host, port, error)) from None
        finally:
            server.stop(None)
