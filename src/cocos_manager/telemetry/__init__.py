"""What the daemon tells operators: structured logs, gRPC core's log lines, tracing (OTLP, Jaeger), Prometheus metrics, systemd notification."""
