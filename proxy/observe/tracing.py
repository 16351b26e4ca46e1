"""Optional OpenTelemetry tracing: one span per proxied request (``tracing: true`` and the
``otel`` extra). The span continues the client's ``traceparent`` when it sends one; the
exporter is configured by the standard ``OTEL_*`` variables."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..exchange import Exchange

log = logging.getLogger("bedrock_proxy.tracing")


class Tracing:
    def __init__(self) -> None:
        from opentelemetry import propagate, trace

        self._propagate = propagate
        if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
            _install_sdk_provider(trace)
        self._tracer = trace.get_tracer("bedrock_proxy")
        # perf_counter marks are converted to wall-clock nanoseconds with this offset.
        self._offset_ns = time.time_ns() - int(time.perf_counter() * 1e9)

    def completed(self, x: Exchange) -> None:
        self.record(x, x.request_headers or {}, x.seconds)

    def record(self, x: Exchange, headers: Mapping[str, str], seconds: float) -> None:
        op = x.operation
        attributes: dict[str, Any] = {
            "http.request.method": x.method,
            "http.response.status_code": x.status,
            "bedrock_proxy.request_id": x.request_id,
        }
        if op is not None:
            attributes["rpc.system"] = "aws-api"
            attributes["rpc.service"] = op.service.name
            attributes["rpc.method"] = op.name
        if x.model:
            attributes["gen_ai.request.model"] = x.model
        if x.identity is not None and x.identity.key_id:
            attributes["bedrock_proxy.key_id"] = x.identity.key_id
        if x.usage is not None and x.usage.found:
            attributes["gen_ai.usage.input_tokens"] = x.usage.input_tokens
            attributes["gen_ai.usage.output_tokens"] = x.usage.output_tokens
        if x.upstream_request_id:
            attributes["aws.request_id"] = x.upstream_request_id
        if x.error:
            attributes["error.type"] = x.error
        start = self._offset_ns + int(x.started * 1e9)
        span = self._tracer.start_span(
            f"bedrock {op.name if op else x.method}",
            context=self._propagate.extract(dict(headers)),
            start_time=start,
            attributes=attributes,
        )
        span.end(end_time=start + int(seconds * 1e9))


def _install_sdk_provider(trace: Any) -> None:
    try:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning("tracing is on but opentelemetry-sdk is not installed: spans go nowhere")
        return
    provider = TracerProvider()
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    except ImportError:
        log.warning("no OTLP exporter installed (pip install 'bedrock-proxy[otel]')")
    trace.set_tracer_provider(provider)
