"""Strict JSON for request bodies a check must read: the same document AWS reads, or a 400.

AWS's parser and ours must not read a body differently: a body only one of them accepts, or
reads another way (the first of two duplicate names against the last), could carry a field
past the check.
"""

from __future__ import annotations

import json
from typing import Any

from . import errors

__all__ = ["parse_strict"]


def _no_constants(name: str) -> Any:
    raise errors.validation(f"The request body is not strict JSON: {name} is not a number")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):
        raise errors.validation("The request body names the same field more than once")
    return document


# One decoder, built once: ``json.loads`` with any option builds a new one per call (a
# fifth of a small body's parse).
_DECODER = json.JSONDecoder(
    object_pairs_hook=_no_duplicates, parse_constant=_no_constants, strict=True
)


def parse_strict(body: bytes) -> Any:
    """The body as strict JSON (RFC 8259: one value, no trailing data, no comments, no raw
    control characters, no NaN, no duplicate names, UTF-8 only), or a 400.

    AWS's parser and ours must not read a body differently: a body only one of them
    accepts, or reads another way, could carry a field past the check.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise errors.validation("The request body is not valid UTF-8") from None
    if text.startswith("\ufeff"):
        raise errors.validation("The request body must not start with a byte-order mark")
    try:
        return _DECODER.decode(text)
    except RecursionError:  # nested deeper than the interpreter's stack: no API's document
        raise errors.validation("The request body is nested too deeply") from None
    except ValueError as exc:
        raise errors.validation(f"The request body is not valid JSON: {exc}") from None
