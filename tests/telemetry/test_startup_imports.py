"""The daemon's start-up loads what its settings use, when they use it (docs/decisions.md,
"Start-up and the bench's targets"): the Jaeger exporter's thrift
library (about 40 modules: its IDL parser, protocols and transports) is loaded on the export
thread at the first export, not by importing the daemon; prometheus-client (with `wsgiref`,
`http.server`, `urllib.request`) only when /metrics is served; the dial-out's modules only with
MANAGER_GRPC_URL; server reflection at its first call; ctypes (for the console files' inotify
watch) at the first VM's console. What a daemon holds once it serves is read by
tests/support/serving_probe.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support.serving_probe import at_serving, packages


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


def test_a_daemon_without_metrics_port_serves_without_prometheus_client(tmp_path: Path) -> None:
    found = at_serving(tmp_path)
    loaded = packages(found)
    assert "cocos_manager" in loaded and "grpc" in loaded
    assert not {"prometheus_client", "wsgiref"} & loaded
    assert "http.server" not in found["modules"]


def test_a_daemon_serves_without_the_dial_out_or_reflection_loaded(tmp_path: Path) -> None:
    found = at_serving(tmp_path)
    assert "cocos_manager.api.server" in found["modules"]
    # (grpc's own __init__ imports the bare grpc_reflection package)
    assert "grpc_reflection.v1alpha.reflection" not in found["modules"]
    assert not [name for name in found["modules"] if name.startswith("cocos_manager.api.dialout")]


def test_with_a_metrics_port_it_is_loaded_at_start(tmp_path: Path) -> None:
    """/metrics is served from start-up on: what it needs is there before SERVING."""
    found = at_serving(tmp_path, {"MANAGER_METRICS_PORT": "0", "MANAGER_METRICS_HOST": "127.0.0.1"})
    assert "prometheus_client" in packages(found)
