"""What third-party tools rely on: health, reflection (grpcurl works without the .proto), and
messages larger than gRPC's 4 MB default."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cocos_manager.proto import manager_pb2 as pb
from tests.support.harness import Manager, run_request, running_manager


@pytest.fixture
async def manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    async with running_manager(tmp_path, monkeypatch) as m:
        yield m


async def test_health_reports_serving(manager: Manager) -> None:
    stub = health_pb2_grpc.HealthStub(manager.channel)
    for service in ("", "manager.ManagerService"):
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_describes_the_api(manager: Manager) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(manager.channel)

    async def ask(
        request: reflection_pb2.ServerReflectionRequest,
    ) -> reflection_pb2.ServerReflectionResponse:
        call = stub.ServerReflectionInfo(iter([request]))
        async for response in call:
            return response
        raise AssertionError("no reflection response")

    listing = await ask(reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {s.name for s in listing.list_services_response.service}
    assert {"manager.ManagerService", "grpc.health.v1.Health"} <= names
    described = await ask(
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="manager.ManagerService")
    )
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in described.file_descriptor_response.file_descriptor_proto
    ]
    manager_file = next(f for f in files if f.package == "manager")
    methods = {m.name: (m.input_type, m.output_type, m.server_streaming)
               for m in manager_file.service[0].method}  # fmt: skip
    assert methods == {
        "Run": (".manager.ComputationRunReq", ".manager.RunResponse", False),
        "Stop": (".manager.StopRequest", ".manager.StopResponse", False),
        "Events": (".manager.EventsRequest", ".manager.ClientStreamMessage", True),
        "List": (".manager.ListRequest", ".manager.ListResponse", False),
        "Logs": (".manager.LogsRequest", ".manager.AgentLog", True),
        "Pause": (".manager.PauseRequest", ".manager.PauseResponse", False),
        "Resume": (".manager.ResumeRequest", ".manager.ResumeResponse", False),
        "Get": (".manager.GetRequest", ".manager.GetResponse", False),
        "AttestationPolicy": (
            ".manager.AttestationPolicyRequest",
            ".manager.AttestationPolicyResponse",
            False,
        ),
        # Today's upstream control plane, beside ours.
        "CreateVm": (".manager.CreateReq", ".manager.CreateRes", False),
        "RemoveVm": (".manager.RemoveReq", ".google.protobuf.Empty", False),
        "CVMInfo": (".manager.CVMInfoReq", ".manager.CVMInfoRes", False),
    }


async def test_a_manifest_over_4_mb_is_accepted(manager: Manager) -> None:
    request = run_request("big")
    request.result_consumers.extend(f"consumer-{i:08d}-" + "x" * 100 for i in range(50_000))
    assert request.ByteSize() > 5 * 1024 * 1024
    response = await manager.stub.Run(request)
    assert response.computation_id == "big"
    await manager.stub.Stop(pb.StopRequest(computation_id="big"))


async def test_reflection_lists_itself_under_the_name_its_package_gives(manager: Manager) -> None:
    """It is loaded at its first call (api/server.py, LazyReflection) under a name spelled out
    there: the package's own."""
    from grpc_reflection.v1alpha import reflection

    from cocos_manager.api.server import REFLECTION_SERVICE

    assert REFLECTION_SERVICE == reflection.SERVICE_NAME
    stub = reflection_pb2_grpc.ServerReflectionStub(manager.channel)
    call = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = [s.name async for r in call for s in r.list_services_response.service]
    assert REFLECTION_SERVICE in names
