"""A console form's fields as the admin API's body: text, numbers and comma- or
line-separated lists. On a new record an empty field is left out (the API's default); on
an edit it is sent as null, which clears it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ....wire import errors


def split_list(text: Any) -> list[str]:
    """``a, b`` or one per line."""
    return [v.strip() for v in str(text or "").replace("\n", ",").split(",") if v.strip()]


def form_fields(
    form: Mapping[str, Any],
    creating: bool,
    texts: Iterable[str] = (),
    numbers: Mapping[str, type[int] | type[float]] | None = None,
    lists: Iterable[str] = (),
) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for name in texts:
        value = str(form.get(name, "")).strip()
        if value or not creating:
            body[name] = value or None
    for name in lists:
        items = split_list(form.get(name, ""))
        if items or not creating:
            body[name] = items or None
    for name, kind in (numbers or {}).items():
        text = str(form.get(name, "")).strip()
        if text:
            try:
                body[name] = kind(text)
            except ValueError:
                raise errors.validation(f"{name}: {text!r} is not a number") from None
        elif not creating:
            body[name] = None
    return body
