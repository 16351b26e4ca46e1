"""What happened, for operators: Prometheus metrics, the access log, tracing. Each is an
observer of finished exchanges."""
