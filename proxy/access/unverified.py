"""A process-wide cap on request-body bytes held before their signature is verified.

A SigV4 signature covers the body, so a signed request's body must be read before it can be
judged. The key id is checked first (an unknown one is refused without reading anything),
but key ids are not secrets: without a cap, anyone who knows one could make the proxy hold
many large bodies at once. Past the cap a request is refused at once with a 503, before
its body is read, and the client retries as it would for any throttle.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from ..wire import errors


class UnverifiedBodies:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    @contextmanager
    def hold(self, declared: int | None, max_body: int) -> Iterator[None]:
        """Reserve a body's bytes (its Content-Length, or the largest allowed when it has
        none) while it is read and its signature checked."""
        amount = min(declared, max_body) if declared is not None else max_body
        if self.held + amount > self.limit and self.held:
            raise errors.AwsError(
                503,
                "ServiceUnavailableException",
                "Too many request bodies are waiting for their signatures to be checked; "
                "retry the request",
            )
        self.held += amount
        try:
            yield
        finally:
            self.held -= amount
