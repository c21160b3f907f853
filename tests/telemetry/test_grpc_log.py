"""gRPC core's fd-2 lines turned into JSON records (grpc_log.Pump), on recorded lines."""

from __future__ import annotations

import io
import os
from typing import Any

import pytest

from cocos_manager.telemetry.grpc_log import Pump, grpc_core_silenced, prepare_environment

FAILURE = [
    "I1130 05:01:40.512492    9515 ssl_transport_security.cc:2563] Handshake failed with "
    "error SSL_ERROR_SSL: error:100000f7:SSL routines:OPENSSL_internal:WRONG_VERSION_NUMBER: "
    "Invalid certificate verification context",
    "I1130 05:01:40.512516    9515 handshaker.cc:155] CallNextHandshakerLocked: error=UNKNOWN: "
    "Ssl handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:100000f7:SSL routines:"
    "OPENSSL_internal:WRONG_VERSION_NUMBER: Invalid certificate verification context: OK",
    "=== Source Location Trace: ===",
    "src/core/util/status_helper.cc:68",
    " shutdown=false index=2, args={endpoint=0x7f9788001c60, args={grpc.internal."
    "endpoint_local_address=ipv4:127.0.0.1:45413, grpc.internal.endpoint_peer_address="
    "ipv4:127.0.0.1:49260, grpc.internal.server_credentials=0x5605f8a05470}, exit_early=0}",
    "I1130 05:01:40.512569    9515 channel_trace.h:396] handshake manager 0x7f9788002100: "
    "Failed with error: UNKNOWN: Ssl handshake failed",
    "=== Source Location Trace: ===",
    "src/core/util/status_helper.cc:68",
    "",
]
ROUTINE = (
    "I1130 05:01:40.511697    9514 handshaker.cc:155] CallNextHandshakerLocked: error=OK "
    "shutdown=false index=0, args={endpoint=(nil)}"
)


class Recorder:
    def __init__(self) -> None:
        self.records: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda message, **fields: self.records.append((level, message, fields))


def pump(lines: list[str]) -> tuple[Recorder, str]:
    log, passthrough = Recorder(), io.StringIO()
    p = Pump(passthrough, log)
    for line in lines:
        p.line(line)
    p.flush()
    return log, passthrough.getvalue()


def test_a_failed_handshake_becomes_one_record_with_the_peer() -> None:
    log, passed = pump([ROUTINE, *FAILURE])
    assert passed == ""
    ((level, message, fields),) = log.records
    assert (level, message) == ("warning", "TLS handshake failed")
    assert fields["peer"] == "ipv4:127.0.0.1:49260"
    assert fields["side"] == "server"
    assert fields["reason"] == "WRONG_VERSION_NUMBER"
    assert fields["likely"] == "the client speaks plaintext to this TLS port"


def test_other_grpc_lines_become_json_and_the_rest_passes_through() -> None:
    log, passed = pump(
        [
            "E1130 05:01:40.100000    9515 chttp2_server.cc:100] something broke",
            "Traceback (most recent call last):",
            '  File "x.py", line 1, in <module>',
            "W1130 05:01:41.100000    9515 tcp_posix.cc:7] careful",
        ]
    )
    assert log.records == [
        ("error", "grpc core: something broke", {"source": "chttp2_server.cc:100"}),
        ("warning", "grpc core: careful", {"source": "tcp_posix.cc:7"}),
    ]
    assert passed == 'Traceback (most recent call last):\n  File "x.py", line 1, in <module>\n'


def test_the_handshaker_tracer_is_added_to_grpc_trace() -> None:
    env: dict[str, str] = {}
    prepare_environment(env)
    assert env["GRPC_TRACE"] == "handshaker"
    env = {"GRPC_TRACE": "api,tcp"}
    prepare_environment(env)
    assert env["GRPC_TRACE"] == "api,tcp,handshaker"
    prepare_environment(env)
    assert env["GRPC_TRACE"] == "api,tcp,handshaker"


def test_silenced_drops_grpc_core_records_and_passes_the_rest(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """check's bind probe: gRPC core's record of a failed bind (with its continuation lines)
    is dropped; anything else written to fd 2 meanwhile still reaches stderr."""
    with grpc_core_silenced():
        os.write(
            2,
            b"E1207 11:19:01.388420    1097 add_port.cc:83] Failed to add port to server\n"
            b"=== Source Location Trace: ===\n"
            b"not gRPC's\n",
        )
    err = capfd.readouterr().err
    assert err == "not gRPC's\n"
