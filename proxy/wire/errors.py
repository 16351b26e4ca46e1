"""AWS-shaped errors: every refusal the proxy makes looks like one AWS would make.

REST-JSON services (bedrock-runtime, bedrock-agent-runtime, bedrock) read the error code
from ``x-amzn-ErrorType`` and the message from the JSON body, so boto3 raises the modelled
exception class. Mid-stream failures are reported as event-stream exception frames instead.

An error is a value (``AwsError``); its rendering in a protocol's shape is bytes
(``RenderedError``), which the server's fronts put on the wire: no layer below the server
builds an HTTP framework's response.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import orjson


class AwsError(Exception):
    """An error the proxy answers with itself, in the shape AWS would use."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: dict[str, str] | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        # Why a limit refused the request (rpm, tpm, parallel, budget), for the metrics.
        self.reason = reason

    def rest_json(self, request_id: str | None = None) -> RenderedError:
        """As a REST-JSON AWS service answers it (the fronts put it on the wire)."""
        return rest_json_error(
            self.status, self.code, self.message, request_id=request_id, headers=self.headers
        )


_ID_PREFIX = os.urandom(10).hex()
_ID_PREFIX = f"{_ID_PREFIX[:8]}-{_ID_PREFIX[8:12]}-4{_ID_PREFIX[13:16]}-8{_ID_PREFIX[17:20]}-"
_id_counter = itertools.count(1)


def new_request_id() -> str:
    """UUID-shaped and unique: a random per-process prefix and a counter (uuid4 is slow)."""
    return f"{_ID_PREFIX}{next(_id_counter):012x}"


@dataclass(frozen=True, slots=True)
class RenderedError:
    """An error as bytes in a protocol's shape: the status, headers and body a front sends
    (built here, once per protocol; no front builds its own)."""

    status: int
    headers: dict[str, str]
    body: bytes


def rest_json_error(
    status: int,
    code: str,
    message: str,
    *,
    request_id: str | None = None,
    headers: dict[str, str] | None = None,
) -> RenderedError:
    out_headers = {
        "Content-Type": "application/json",
        "x-amzn-ErrorType": code,
        "x-amzn-RequestId": request_id or new_request_id(),
    }
    if headers:
        out_headers.update(headers)
    return RenderedError(status, out_headers, orjson.dumps({"message": message}))


# The refusals the proxy makes, named as AWS names them.
def access_denied(message: str) -> AwsError:
    return AwsError(403, "AccessDeniedException", message)


def validation(message: str) -> AwsError:
    return AwsError(400, "ValidationException", message)


def unknown_operation(method: str, path: str) -> AwsError:
    return AwsError(
        404, "UnknownOperationException", f"No Bedrock operation matches {method} {path}"
    )


def payload_too_large(limit: int) -> AwsError:
    return AwsError(
        413,
        "ValidationException",
        f"Request body exceeds the proxy's limit of {limit} bytes",
    )


def throttled(
    message: str, retry_after: float | None = None, reason: str | None = None
) -> AwsError:
    headers = {"Retry-After": str(max(1, int(retry_after + 0.999)))} if retry_after else None
    return AwsError(429, "ThrottlingException", message, headers, reason)


def service_unavailable(message: str, retry_after: int | None = None) -> AwsError:
    headers = {"Retry-After": str(retry_after)} if retry_after else None
    return AwsError(503, "ServiceUnavailableException", message, headers)


def upstream_timeout(message: str) -> AwsError:
    return AwsError(408, "ModelTimeoutException", message)


def internal(
    message: str = "The proxy hit an internal error; the request was not completed",
) -> AwsError:
    return AwsError(500, "InternalServerException", message)
