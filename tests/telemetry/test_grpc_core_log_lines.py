"""gRPC core's lines for a refused connection (the dial-out retrying an unreachable server),
as gRPC 1.7x writes them: the "=== Source Location Trace: === " line ends with a space. The
pump did not take it for a continuation, so it and the next two lines reached stderr (the
journal) as raw text, three lines per retry (found in review)."""

from __future__ import annotations

from tests.telemetry.test_grpc_log import pump

REFUSED = [
    "I1130 06:01:38.595280   25638 handshaker.cc:155] CallNextHandshakerLocked: error=UNKNOWN: "
    "Failed to connect to remote host: Connection refused",
    "=== Source Location Trace: === ",
    "src/core/lib/event_engine/posix_engine/posix_engine.cc:309",
    " shutdown=false index=1, args={endpoint=(nil), args={grpc.client_channel_factory="
    "0x7fccf4255820, grpc.default_authority=localhost:7001}, exit_early=0}",
    "I1130 06:01:38.595306   25638 channel_trace.h:396] handshake manager 0x7fcce4001f40: "
    "Failed with error: UNKNOWN: Failed to connect to remote host: Connection refused",
    "=== Source Location Trace: === ",
    "src/core/lib/event_engine/posix_engine/posix_engine.cc:309",
    "",
]


def test_a_refused_connection_leaves_no_raw_line_and_is_no_tls_failure() -> None:
    log, passed = pump(REFUSED)
    assert passed == ""
    assert [message for _, message, _ in log.records] == []
