"""What the daemon tells operators: structured logs, gRPC core's log lines, tracing (OTLP, Jaeger), Prometheus metrics, systemd notification.

Public names load their module on first use (docs/decisions.md, "Wings and one-way imports")."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cocos_manager.telemetry.grpc_log import capture_grpc_core_log as capture_grpc_core_log
    from cocos_manager.telemetry.grpc_log import grpc_core_silenced as grpc_core_silenced
    from cocos_manager.telemetry.logging import configure_logging as configure_logging
    from cocos_manager.telemetry.logging import get_logger as get_logger
    from cocos_manager.telemetry.metrics import METRICS as METRICS
    from cocos_manager.telemetry.metrics import Metrics as Metrics
    from cocos_manager.telemetry.metrics import MetricsServer as MetricsServer
    from cocos_manager.telemetry.metrics import MetricsServerError as MetricsServerError
    from cocos_manager.telemetry.metrics import metrics_host as metrics_host
    from cocos_manager.telemetry.metrics import probe_metrics_listen as probe_metrics_listen
    from cocos_manager.telemetry.metrics import start_metrics_server as start_metrics_server
    from cocos_manager.telemetry.sdnotify import READY as READY
    from cocos_manager.telemetry.sdnotify import STOPPING as STOPPING
    from cocos_manager.telemetry.sdnotify import notify as notify
    from cocos_manager.telemetry.tracing import describe_tracing as describe_tracing
    from cocos_manager.telemetry.tracing import probe_collector as probe_collector
    from cocos_manager.telemetry.tracing import setup_tracing as setup_tracing
    from cocos_manager.telemetry.tracing import shutdown_tracing as shutdown_tracing
    from cocos_manager.telemetry.vm_metrics import VmCollector as VmCollector
    from cocos_manager.telemetry.vm_metrics import register_vm_metrics as register_vm_metrics
    from cocos_manager.telemetry.vm_metrics import unregister_vm_metrics as unregister_vm_metrics

# Each public name and the module it lives in.
HOMES = {
    "probe_metrics_listen": "metrics",
    "probe_collector": "tracing",
    "capture_grpc_core_log": "grpc_log",
    "grpc_core_silenced": "grpc_log",
    "configure_logging": "logging",
    "get_logger": "logging",
    "METRICS": "metrics",
    "Metrics": "metrics",
    "metrics_host": "metrics",
    "MetricsServer": "metrics",
    "MetricsServerError": "metrics",
    "start_metrics_server": "metrics",
    "notify": "sdnotify",
    "READY": "sdnotify",
    "STOPPING": "sdnotify",
    "describe_tracing": "tracing",
    "setup_tracing": "tracing",
    "shutdown_tracing": "tracing",
    "register_vm_metrics": "vm_metrics",
    "unregister_vm_metrics": "vm_metrics",
    "VmCollector": "vm_metrics",
}


def __getattr__(name: str) -> object:
    if name in HOMES:
        return getattr(importlib.import_module(f"{__name__}.{HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
