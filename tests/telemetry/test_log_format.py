"""MANAGER_LOG_FORMAT: JSON lines by default (journald, Loki, the Go daemon's tools), text
lines for a person at a terminal, the same fields either way."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cocos_manager.config.choices import LogFormat, LogLevel
from cocos_manager.telemetry.logging import configure_logging, get_logger
from tests.support.harness import base_env

DAEMON = str(Path(sys.executable).with_name("cocos-manager"))


def _lines(log_format: LogFormat) -> list[str]:
    stream = io.StringIO()
    configure_logging(LogLevel.INFO, stream, log_format=log_format)
    try:
        get_logger().warning(
            "VM exited on its own", computation_id="c1", returncode=3, line="a b\x1b[2J\x07"
        )
    finally:
        configure_logging(LogLevel.INFO)
    return stream.getvalue().splitlines()


def test_json_stays_the_default_with_the_originals_keys() -> None:
    (line,) = _lines(LogFormat.JSON)
    doc = json.loads(line)
    assert list(doc)[:3] == ["level", "message", "ts"]
    assert (doc["level"], doc["message"], doc["returncode"]) == ("warn", "VM exited on its own", 3)


def test_text_lines_carry_the_same_fields_and_keep_control_characters_visible() -> None:
    (line,) = _lines(LogFormat.TEXT)
    match = re.fullmatch(r"(\S+Z) warn  VM exited on its own (.*)", line)
    assert match is not None, line
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", match.group(1))
    assert match.group(2) == 'computation_id=c1 returncode=3 line="a b\\u001b[2J\\u0007"'
    assert "\x1b" not in line and "\x07" not in line


def test_the_daemon_writes_text_lines_when_asked(tmp_path: Path) -> None:
    env = {**base_env(tmp_path), "MANAGER_LOG_FORMAT": "text", "COCOS_JAEGER_URL": "off"}
    process = subprocess.Popen(
        [DAEMON], env={**env, "PATH": "/usr/bin:/bin"}, stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
    finally:
        process.terminate()
        process.wait(30)
    assert re.match(r"\d{4}-\d\d-\d\dT\S+Z info  state directory locked state_dir=", first), first
    assert not first.startswith("{")


@pytest.mark.parametrize("value", ["yaml", "JSON"])
def test_an_unknown_format_stops_start_up_naming_the_variable(tmp_path: Path, value: str) -> None:
    env = {**base_env(tmp_path), "MANAGER_LOG_FORMAT": value, "PATH": "/usr/bin:/bin"}
    out = subprocess.run([DAEMON], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 2
    assert f"invalid value for MANAGER_LOG_FORMAT: {value!r}" in out.stderr
