"""Builds the grpc.aio server: the Manager service, health and reflection."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cocos_manager.agent import MAX_FRAME
from cocos_manager.api.servicer import ManagerServicer
from cocos_manager.config import ServiceSettings
from cocos_manager.host import LISTEN_OPTIONS

# Re-exported: the daemon names the address it listens on with it.
from cocos_manager.host import listen_address as listen_address
from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.proto import manager_pb2_grpc as pb_grpc
from cocos_manager.service import ManagerService

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ManagerService"].full_name
CLIENT_PING_FLOOR_MS = 5_000
# grpc_reflection.v1alpha.reflection.SERVICE_NAME, spelled out so that naming it does not load
# the reflection package (tests/api/test_server_features.py holds the two equal).
REFLECTION_SERVICE = "grpc.reflection.v1alpha.ServerReflection"


class _Handlers:
    """Takes what generated `add_..._to_server` code registers, for a handler of one's own."""

    def __init__(self) -> None:
        self.generic: list[grpc.GenericRpcHandler] = []

    def add_generic_rpc_handlers(self, handlers: tuple[grpc.GenericRpcHandler, ...]) -> None:
        self.generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        """Registered methods are a shortcut of gRPC's lookup; the generic handler serves
        the same methods."""


class LazyReflection(grpc.GenericRpcHandler):  # type: ignore[misc]
    """Server reflection (what grpcurl reads), its package and descriptor_pb2 loaded at its
    first call rather than at every start: tools use it now and then, the daemon never."""

    def __init__(self, service_names: tuple[str, ...]) -> None:
        self._names = service_names
        self._handlers: list[grpc.GenericRpcHandler] | None = None

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = details.method or ""
        if not method.startswith(f"/{REFLECTION_SERVICE}/"):
            return None
        if self._handlers is None:
            from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

            taken = _Handlers()
            servicer = reflection.aio.ReflectionServicer(self._names)
            reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, taken)
            self._handlers = taken.generic
        for handler in self._handlers:
            found = handler.service(details)
            if found is not None:
                return found
        return None


@dataclass
class Server:
    grpc: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)


def keepalive_options(settings: ServiceSettings) -> list[tuple[str, int]]:
    """Pings to every connection, so that a client gone silent (no FIN, no RST: a host
    frozen, a route dropped) is disconnected and its Events or Logs stream ends, freeing its
    place; without them the socket stays established and the place taken for ever. gRPC
    waits 60 s for any ping's answer unless told otherwise. An idle stream sends no data:
    pings without data are allowed without limit (a server's default in gRPC 1.85, said
    here, as clients' default is 2). A connection without calls is pinged too: one that died
    is closed rather than kept.

    A client's own keepalive pings are taken every CLIENT_PING_FLOOR_MS or less often, with
    calls or without. gRPC's defaults, every 5 minutes with calls and every 2 hours without,
    ended an Events stream of a client pinging every 10 s (the floor of gRPC's clients) with
    GOAWAY `too_many_pings` after about 40 s, and an idle client's connection likewise."""
    accept = [
        ("grpc.http2.min_ping_interval_without_data_ms", CLIENT_PING_FLOOR_MS),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
    if settings.GRPC_KEEPALIVE == 0:
        return accept
    return [
        *accept,
        ("grpc.keepalive_time_ms", _ms(settings.GRPC_KEEPALIVE)),
        ("grpc.keepalive_timeout_ms", _ms(settings.GRPC_KEEPALIVE_TIMEOUT)),
        ("grpc.http2.ping_timeout_ms", _ms(settings.GRPC_KEEPALIVE_TIMEOUT)),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def _ms(seconds: float) -> int:
    return max(1, min(int(seconds * 1000), 2**31 - 1))


async def build_server(
    service: ManagerService,
    host: str,
    port: int,
    credentials: grpc.ServerCredentials | None = None,
    interceptors: list[Any] | None = None,
) -> Server:
    # MANAGER_GRPC_MAX_MESSAGE_SIZE (8 MiB by default): room for manifests with tens of
    # thousands of datasets (60,000 take about 3 MiB), while one request cannot make the daemon
    # allocate 64 MiB as before. gRPC itself answers a larger one with RESOURCE_EXHAUSTED
    # before any of it reaches the service.
    max_message = service.settings.service.GRPC_MAX_MESSAGE_SIZE
    server = grpc.aio.server(
        interceptors=interceptors or None,
        options=[
            ("grpc.max_receive_message_length", max_message),
            # What the server sends is its own making; an agent's largest frame must pass.
            ("grpc.max_send_message_length", max(max_message, MAX_FRAME + 1024)),
            *LISTEN_OPTIONS,  # as `check` binds it (host/listeners.py)
            *keepalive_options(service.settings.service),
        ],
    )
    pb_grpc.add_ManagerServiceServicer_to_server(ManagerServicer(service), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_generic_rpc_handlers(
        (LazyReflection((SERVICE_NAME, health.SERVICE_NAME, REFLECTION_SERVICE)),)
    )
    address = listen_address(host, port)
    if credentials is None:
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, credentials)
    return Server(grpc=server, health=health_servicer, port=bound)
