"""The console as a browser without JavaScript reaches it: pages with a session cookie,
forms posted, and the sign-in that yields the cookie."""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request
from typing import Any


def console_get(server, path: str, cookies: dict[str, str]) -> tuple[int, str]:
    return _call(urllib.request.Request(server.url + path), cookies)


def console_post(
    server, path: str, form: dict[str, str], cookies: dict[str, str]
) -> tuple[int, str]:
    data = urllib.parse.urlencode(form).encode()
    return _call(urllib.request.Request(server.url + path, data=data, method="POST"), cookies)


def _call(request: urllib.request.Request, cookies: dict[str, str]) -> tuple[int, str]:
    if cookies:
        request.add_header("Cookie", "; ".join(f"{k}={v}" for k, v in cookies.items()))
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def sign_in(server, key: str) -> tuple[int, str | None]:
    """POST the sign-in form; (status, session cookie or None)."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any) -> None:
            return None

    request = urllib.request.Request(
        server.url + "/ui/signin", data=urllib.parse.urlencode({"key": key}).encode()
    )
    try:
        with urllib.request.build_opener(NoRedirect).open(request, timeout=10) as answer:
            return answer.status, None
    except urllib.error.HTTPError as exc:
        cookie = exc.headers.get("Set-Cookie")
        return exc.code, cookie.split(";")[0].split("=", 1)[1] if cookie else None
