"""The gRPC face of the service: maps requests to the service and errors to status codes.

This is the one place where exception types become gRPC statuses.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from google.protobuf import empty_pb2

from cocos_manager.errors import InvalidArgumentError, ManagerError
from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.proto import manager_pb2_grpc as pb_grpc
from cocos_manager.service import ManagerService
from cocos_manager.telemetry import get_logger

_log = get_logger()


async def _abort(context: grpc.aio.ServicerContext, error: Exception, method: str) -> None:
    if isinstance(error, ManagerError):
        await context.abort(error.code, str(error))
    _log.error("unexpected error", method=method, error=repr(error))
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {error}")


class ManagerServicer(pb_grpc.ManagerServiceServicer):
    def __init__(self, service: ManagerService) -> None:
        self._service = service

    async def Run(
        self, request: pb.ComputationRunReq, context: grpc.aio.ServicerContext
    ) -> pb.RunResponse:
        try:
            return await self._service.run(request)
        except Exception as error:
            await _abort(context, error, "Run")
            raise

    async def Stop(
        self, request: pb.StopRequest, context: grpc.aio.ServicerContext
    ) -> pb.StopResponse:
        try:
            await self._service.stop(_required_id(request.computation_id), force=request.force)
        except Exception as error:
            await _abort(context, error, "Stop")
            raise
        return pb.StopResponse()

    async def Events(
        self, request: pb.EventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ClientStreamMessage]:
        since = request.since if request.HasField("since") else None
        try:
            subscription = self._service.bus.subscribe(request.computation_id, since=since)
        except Exception as error:
            await _abort(context, error, "Events")
            raise
        try:
            # Headers right after subscribing: a client awaiting them (initial_metadata())
            # knows that nothing published from then on can be missed.
            await context.send_initial_metadata(())
        except BaseException:
            self._service.bus.unsubscribe(subscription)
            raise
        async for message in subscription:
            yield message

    async def AttestationPolicy(
        self, request: pb.AttestationPolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.AttestationPolicyResponse:
        try:
            info = await self._service.attestation_policy(_required_id(request.computation_id))
        except Exception as error:
            await _abort(context, error, "AttestationPolicy")
            raise
        return pb.AttestationPolicyResponse(info=info, computation_id=request.computation_id)

    async def List(
        self, request: pb.ListRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListResponse:
        try:
            return pb.ListResponse(computations=self._service.list_computations())
        except Exception as error:
            await _abort(context, error, "List")
            raise

    async def Logs(
        self, request: pb.LogsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.AgentLog]:
        """The kept tail, then (with follow) new lines until the VM ends or the client goes."""
        try:
            if not request.computation_id:
                raise InvalidArgumentError("computation_id: required")
            console = self._service.console(request.computation_id)
            self._service.ctx.consoles.open_stream()
        except Exception as error:
            await _abort(context, error, "Logs")
            raise
        computation_id = request.computation_id
        try:
            if not request.follow:
                for line in console.tail(request.tail):
                    yield line.to_pb(computation_id)
                return
            async for line in console.follow(request.tail):
                yield line.to_pb(computation_id)
        finally:
            self._service.ctx.consoles.close_stream()

    # -- today's upstream control plane (docs/contracts.md, "CreateVm, RemoveVm, CVMInfo") --

    async def CreateVm(
        self, request: pb.CreateReq, context: grpc.aio.ServicerContext
    ) -> pb.CreateRes:
        try:
            return await self._service.create_vm(request)
        except Exception as error:
            await _abort(context, error, "CreateVm")
            raise

    async def RemoveVm(
        self, request: pb.RemoveReq, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        try:
            await self._service.stop(_required_id(request.cvm_id, "cvm_id"))
        except Exception as error:
            await _abort(context, error, "RemoveVm")
            raise
        return empty_pb2.Empty()

    async def CVMInfo(
        self, request: pb.CVMInfoReq, context: grpc.aio.ServicerContext
    ) -> pb.CVMInfoRes:
        try:
            return self._service.cvm_info(_required_id(request.id, "id"))
        except Exception as error:
            await _abort(context, error, "CVMInfo")
            raise

    async def Pause(
        self, request: pb.PauseRequest, context: grpc.aio.ServicerContext
    ) -> pb.PauseResponse:
        try:
            await self._service.pause(_required_id(request.computation_id))
        except Exception as error:
            await _abort(context, error, "Pause")
            raise
        return pb.PauseResponse()

    async def Resume(
        self, request: pb.ResumeRequest, context: grpc.aio.ServicerContext
    ) -> pb.ResumeResponse:
        try:
            await self._service.resume(_required_id(request.computation_id))
        except Exception as error:
            await _abort(context, error, "Resume")
            raise
        return pb.ResumeResponse()

    async def Get(
        self, request: pb.GetRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetResponse:
        try:
            return self._service.get(_required_id(request.computation_id))
        except Exception as error:
            await _abort(context, error, "Get")
            raise


def _required_id(value: str, field: str = "computation_id") -> str:
    if not value:
        raise InvalidArgumentError(f"{field}: required")
    return value
