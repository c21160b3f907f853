"""`cocos-manager-cli logs` prints the guest's console: guest-controlled text, made safe for
the operator's terminal as `events` does (found in review: logs printed it raw)."""

from __future__ import annotations

from cocos_manager.cli.output import console_line
from cocos_manager.proto import manager_pb2 as pb


def test_console_lines_lose_escape_sequences_and_show_controls() -> None:
    hostile = "\x1b]0;owned\x07ok\x1b[2J\x1b[1A\rhidden\x9b31m"
    line = console_line(pb.AgentLog(computation_id="c", message=hostile, level="info"))
    assert "\x1b" not in line and "\x07" not in line and "\x9b" not in line
    assert "\r" not in line
    assert line.endswith(" info  ok\\x0dhidden")
