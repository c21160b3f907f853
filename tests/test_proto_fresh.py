"""The checked-in generated code must be what `make proto` produces from proto/manager.proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    subprocess.run(
        [str(ROOT / "scripts" / "gen-proto.sh"), str(tmp_path)],
        check=True,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
    )
    checked_in = ROOT / "src" / "cocos_manager" / "proto"
    for name in ("manager_pb2.py", "manager_pb2.pyi", "manager_pb2_grpc.py"):
        fresh = (tmp_path / name).read_text()
        assert (checked_in / name).read_text() == fresh, f"{name} is stale: run `make proto`"


def test_wire_field_numbers() -> None:
    from cocos_manager.proto import manager_pb2 as pb

    def numbers(message: type) -> dict[str, int]:
        return {f.name: f.number for f in message.DESCRIPTOR.fields}  # type: ignore[attr-defined]

    assert numbers(pb.ComputationRunReq) == {
        "id": 1, "name": 2, "description": 3, "datasets": 4, "algorithm": 5,
        "result_consumers": 6, "agent_config": 7, "ttl": 8, "vcpus": 9, "memory_mib": 10,
    }  # fmt: skip
    assert numbers(pb.Dataset) == numbers(pb.Algorithm) == {"provider": 1, "id": 2, "hash": 3}
    assert numbers(pb.AgentConfig) == {
        "port": 1, "host": 2, "cert_file": 3, "key_file": 4, "client_ca_file": 5,
        "server_ca_file": 6, "log_level": 7, "attested_tls": 8,
    }  # fmt: skip
    assert numbers(pb.RunResponse) == {"agent_port": 1, "computation_id": 2}
    assert numbers(pb.AgentEvent) == {
        "event_type": 1, "timestamp": 2, "computation_id": 3, "details": 4,
        "originator": 5, "status": 6,
    }  # fmt: skip
    assert numbers(pb.AgentLog) == {"message": 1, "computation_id": 2, "level": 3, "timestamp": 4}
    # The port's additions (seq, since) take new numbers and stay outside the seed's oneof.
    assert numbers(pb.ClientStreamMessage) == {
        "agent_log": 1, "agent_event": 2, "run_res": 3, "seq": 4,
    }  # fmt: skip
    oneof = pb.ClientStreamMessage.DESCRIPTOR.oneofs_by_name["message"]
    assert [f.name for f in oneof.fields] == ["agent_log", "agent_event", "run_res"]
    assert numbers(pb.StopRequest) == {"computation_id": 1, "force": 2}
    assert numbers(pb.EventsRequest) == {"computation_id": 1, "since": 2}
    # Operator queries.
    assert numbers(pb.ListResponse) == {"computations": 1}
    assert numbers(pb.ComputationInfo) == {
        "computation_id": 1, "state": 2, "agent_port": 3, "guest_cid": 4, "vnc_display": 5,
        "pid": 6, "started_at": 7, "expires_at": 8, "adopted": 9,
    }  # fmt: skip
    assert numbers(pb.LogsRequest) == {"computation_id": 1, "tail": 2, "follow": 3}
    # Operator verbs: Pause, Resume, Get.
    for request in (pb.PauseRequest, pb.ResumeRequest, pb.GetRequest):
        assert numbers(request) == {"computation_id": 1}
    assert numbers(pb.GetResponse) == {
        "computation": 1, "qemu_argv": 2, "files": 3, "settings": 4, "confidential_mode": 5,
        "binding": 6, "ttl": 7, "vcpus": 8, "memory_mib": 9, "paused_by": 10, "last_exit": 11,
    }  # fmt: skip
    assert numbers(pb.VmExit) == {
        "reason": 1, "event_type": 2, "status": 3, "exit": 4, "error": 5, "ended_at": 6,
        "last_lines": 7, "stop_error": 8,
    }  # fmt: skip
