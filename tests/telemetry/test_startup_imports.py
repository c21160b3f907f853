"""The daemon's start-up loads what its settings use, when they use it (docs/decisions.md,
"Start-up and the bench's targets"): the Jaeger exporter's thrift
library (about 40 modules: its IDL parser, protocols and transports) is loaded on the export
thread at the first export, not by importing the daemon; ctypes (for the console files'
inotify watch) at the first VM's console, not at start-up."""

from __future__ import annotations

import json
import subprocess
import sys


def loaded_after(code: str) -> set[str]:
    """Top-level packages in sys.modules of a fresh interpreter after running `code`."""
    probe = (
        code
        + "\nimport sys, json\nprint(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    return set(json.loads(result.stdout.splitlines()[-1]))


def test_importing_the_daemon_does_not_load_thrift() -> None:
    loaded = loaded_after("import cocos_manager.main, cocos_manager.daemon")
    assert "cocos_manager" in loaded and "grpc" in loaded  # the probe saw the daemon's imports
    assert "thriftpy2" not in loaded
    assert "ply" not in loaded  # thriftpy2's IDL parser
    assert "ctypes" not in loaded  # qemu/console_watch.py loads it for the first VM


def test_the_first_export_loads_it() -> None:
    """What the start-up no longer loads is still there when a span is exported."""
    loaded = loaded_after(
        "from opentelemetry.sdk.trace import TracerProvider\n"
        "from cocos_manager.telemetry.jaeger import JaegerThriftExporter\n"
        "span = TracerProvider().get_tracer('t').start_span('s'); span.end()\n"
        "assert JaegerThriftExporter('http://127.0.0.1:9/api/traces').encode([span])"
    )
    assert "thriftpy2" in loaded
