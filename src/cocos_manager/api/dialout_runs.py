"""What the dial-out does with a computations server's requests: decode each, Run it through
the service, and answer on the stream once, whatever happened (an undecodable message that
still names its id included). Apart from dialout.py, which keeps the connection."""

from __future__ import annotations

import asyncio

import grpc

from cocos_manager.api.dialout_buffer import OutgoingBuffer
from cocos_manager.api.dialout_requests import Complaints, Undecodable, decode_request
from cocos_manager.errors import ManagerError, was_told
from cocos_manager.events import MANAGER_ORIGINATOR, manager_event
from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.service import ManagerService
from cocos_manager.telemetry import Metrics, get_logger
from cocos_manager.vm import PROVISION

_log = get_logger()
SHUTTING_DOWN = "the manager is shutting down: the request was not run"


class RunRequests:
    def __init__(
        self,
        service: ManagerService,
        buffer: OutgoingBuffer,
        metrics: Metrics,
        complaints: Complaints,
    ) -> None:
        self._service = service
        self._buffer = buffer
        self._metrics = metrics
        self._complaints = complaints
        self._tasks: set[asyncio.Task[None]] = set()
        self._inflight: dict[str, int] = {}  # requests in flight per computation id
        self._closing = False

    def on_bus_message(self, message: pb.ClientStreamMessage, connected: bool) -> None:
        """Every message the service publishes, into the buffer (called inside
        EventBus.publish: never waits). The service's own failed start of a computation with
        a request in flight is that request's answer (errors.was_told): never dropped. So is
        another Run's of the same id meanwhile, at most one per admitted Run. An agent's event
        of that type and status is not (agents choose both; its originator is made "agent")."""
        if message.HasField("agent_event") and message.agent_event.computation_id in self._inflight:
            event = message.agent_event
            if (
                event.event_type == PROVISION
                and event.status == "failed"
                and event.originator == MANAGER_ORIGINATOR
            ):
                self._buffer.push(message)
                return
        self._buffer.offer(message, connected)

    def on_message(self, raw: bytes) -> None:
        """One message read from the stream (the reader made room for its answer first)."""
        request = decode_request(raw)
        if isinstance(request, Undecodable):
            self._on_undecodable(request)
            return
        cid = request.id
        if self._closing:  # read after the shutdown began: answered, not run
            self._failed(cid, SHUTTING_DOWN, grpc.StatusCode.UNAVAILABLE)
            return
        self._buffer.request_read(len(raw))
        self._inflight[cid] = self._inflight.get(cid, 0) + 1
        task = asyncio.ensure_future(self._handle(request, len(raw)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def settle(self, timeout: float) -> None:
        """At shutdown: no request read from now on is run (each is answered UNAVAILABLE at
        once), and the Runs in flight end (normally ended already: the service refuses and
        ends Runs at shutdown); those still going after `timeout` are cancelled, and answered
        unless their VM told of its failure."""
        self._closing = True
        if self._tasks:
            _, late = await asyncio.wait(list(self._tasks), timeout=timeout)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    def _on_undecodable(self, message: Undecodable) -> None:
        self._metrics.dialout_requests.labels(outcome="undecodable").inc()
        self._complaints.say(
            "dial-out: undecodable request dropped",
            size=message.size,
            error=message.error,
            computation_id=message.computation_id or None,
        )
        if message.computation_id:  # cut short after its id: that request can be answered
            self._buffer.push(
                answer(message.computation_id, message.describe(), grpc.StatusCode.INVALID_ARGUMENT)
            )

    def _failed(
        self, cid: str, error: str, code: grpc.StatusCode, raised: BaseException | None = None
    ) -> None:
        """A request that did not run: counted, and answered unless what its Run raised says
        its own VM's failed event went up already (on_bus_message). A request refused before
        admission (a duplicate id) is answered even while another Run of the same id
        publishes its own failure."""
        self._metrics.dialout_requests.labels(outcome="failed").inc()
        if raised is None or not was_told(raised):
            self._buffer.push(answer(cid, error, code))

    async def _handle(self, request: pb.ComputationRunReq, size: int) -> None:
        cid = request.id
        _log.debug("dial-out: Run requested", computation_id=cid, size=size)
        try:
            response = await self._service.run(request)
        except asyncio.CancelledError as error:  # only settle() cancels
            self._failed(cid, SHUTTING_DOWN, grpc.StatusCode.UNAVAILABLE, error)
            raise
        except ManagerError as error:
            self._failed(cid, str(error), error.code, error)
            # Refusals cost a server nothing to send: said at a bounded rate, counted always.
            self._complaints.say(
                "dial-out: Run failed", computation_id=cid, size=size, error=str(error)
            )
        except Exception as error:  # a bug; the stream and the daemon live on
            self._failed(cid, f"internal error: {error!r}", grpc.StatusCode.INTERNAL, error)
            _log.exception("dial-out: Run raised", computation_id=cid)
        else:
            self._metrics.dialout_requests.labels(outcome="ok").inc()
            self._buffer.push(pb.ClientStreamMessage(run_res=response))
            _log.info("dial-out: Run answered", computation_id=cid, agent_port=response.agent_port)
        finally:
            self._buffer.request_done(size)  # after its answer took its place
            left = self._inflight.get(cid, 1) - 1
            if left:
                self._inflight[cid] = left
            else:
                self._inflight.pop(cid, None)


def answer(computation_id: str, error: str, code: grpc.StatusCode) -> pb.ClientStreamMessage:
    """The stream's answer to a request whose Run failed before the service published why."""
    return manager_event(computation_id, PROVISION, "failed", {"error": error, "code": code.name})
