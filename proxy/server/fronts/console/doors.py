"""The console's pages at the gate (``gate.Door``): a signed-in page's session (the
master's, where a page is for it), its same-origin POST and CSRF token; and the sign-in
form, whose key is the credential, read under the same bounds as any anonymous body
(size, deadline, the process-wide cap on unverified bytes) and counted by the throttle
before the key is looked at."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl, urlencode

import orjson
from aiohttp import web

from ....access.auth import Authenticator
from ....access.roles import Reach, actor_of, reach_of
from ....exchange import Exchange, Identity
from ....store import StoreUnavailable
from ....store.audit import Actor, AuditRepository, Change
from ....wire import errors
from ...gate import LocalDoor
from ...listen.bodies import RequestBody, read_body
from ...listen.forwarded import TrustedProxies
from ...sso import PENDING_COOKIE, SingleSignOn
from .security import PREFIX, SECURITY_HEADERS
from .sessions import COOKIE, ConsoleSession, SessionStore, SignInThrottle, csrf_ok

# A console form is a few fields: anything larger is refused, and a body must arrive
# within body_timeout, whoever sends it (the sign-in form is read before any key is known).
SIGNIN_FORM_BYTES = 4096
FORM_BYTES = 64 * 1024
# A POST's form, read (and its CSRF token checked) before the page's handler runs; the
# page's session.
FORM: web.RequestKey[dict[str, str]] = web.RequestKey("console_form", dict)
SESSION: web.RequestKey[ConsoleSession] = web.RequestKey("console_session", ConsoleSession)
REACH: web.RequestKey[Reach] = web.RequestKey("console_reach", Reach)
_ATTEMPT: web.RequestKey[tuple[str, float]] = web.RequestKey("console_signin", tuple)
# The refresh token a single sign-on for ``bedrock-proxy login`` brought, if any.
REFRESH: web.RequestKey[str] = web.RequestKey("console_refresh", str)


class FormRefused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _refused(status: int, message: str) -> errors.AwsError:
    return errors.AwsError(status, "AccessDeniedException", message)


def same_origin(request: web.Request, proxies: TrustedProxies) -> bool:
    """A browser's POST names its page's origin; another site's is refused (the CSRF
    token is the main defence, this one also covers the sign-in form). Behind a
    trusted TLS-terminating proxy the page's scheme is the one it forwards."""
    origin = request.headers.get("Origin")
    return origin is None or origin == f"{proxies.scheme(request)}://{request.host}"


class PageDoor(LocalDoor):
    """A signed-in page: a session (else the sign-in page) whose role grants what the page
    needs (``access.roles``; None: any session, a key's own page included), and on a POST
    its own origin and a valid CSRF token."""

    def __init__(
        self,
        sessions: SessionStore,
        proxies: TrustedProxies,
        need: str | None,
        body_timeout: float,
    ) -> None:
        self._sessions, self._proxies = sessions, proxies
        self._need, self._body_timeout = need, body_timeout

    async def credential(self, request: web.Request, x: Exchange) -> Identity | None:
        session = await self._sessions.get(request.cookies.get(COOKIE))
        if session is None:
            if request.method == "GET" and not request.path.endswith((".json", ".csv")):
                # Back here once signed in (single sign-on carries it through the provider).
                then = urlencode({"next": request.path_qs})
                raise web.HTTPSeeOther(f"{PREFIX}/signin?{then}", headers=SECURITY_HEADERS)
            raise _refused(401, "Sign in first.")
        request[SESSION] = session
        return session.identity()

    async def authorize(self, request: web.Request, x: Exchange, body: RequestBody | None) -> None:
        session = request[SESSION]
        identity = x.identity
        assert identity is not None
        reach = request[REACH] = reach_of(identity)
        if self._need is not None:
            if session.kind == "virtual":
                raise _refused(403, "This page is for the master key, or a role that opens it.")
            if not reach.may(self._need):
                raise _refused(403, _NO_ROLE if reach.role is None else _NOT_YOURS)
        if request.method != "POST":
            return
        if not same_origin(request, self._proxies):
            raise _refused(403, "Cross-site form refused.")
        form = await read_form(request, FORM_BYTES, self._body_timeout)
        token = form.get("csrf")
        if not isinstance(token, str) or not csrf_ok(session, token):
            raise _refused(403, "The form expired; reload the page.")
        request[FORM] = form


_NO_ROLE = (
    "Your account has no role in this proxy: ask an administrator to add you to one of "
    "its groups, then sign in again."
)
_NOT_YOURS = "Your role does not open this page."


class SignInDoor(LocalDoor):
    """The sign-in form: its key is the credential (the master key, or a virtual key for
    its own page)."""

    def __init__(
        self,
        auth: Authenticator,
        throttle: SignInThrottle,
        proxies: TrustedProxies,
        body_timeout: float,
        audit: AuditRepository,
        master_signin: bool,
    ) -> None:
        self._auth, self._throttle = auth, throttle
        self._proxies, self._body_timeout = proxies, body_timeout
        self._audit, self._master_signin = audit, master_signin

    async def credential(self, request: web.Request, x: Exchange) -> Identity | None:
        return None  # in the body

    async def read(self, request: web.Request, x: Exchange) -> RequestBody | None:
        if not same_origin(request, self._proxies):  # no signing a victim in to another's
            raise _refused(403, "Sign in from the console itself.")
        address = self._proxies.client(request)
        attempt = self._throttle.attempt(address)  # counted before the key is looked at
        if attempt is None:
            raise _refused(429, "Too many failed sign-ins; wait a minute and try again.")
        request[_ATTEMPT] = (address, attempt)
        request[FORM] = await read_form(request, SIGNIN_FORM_BYTES, self._body_timeout)
        return None

    async def verify(self, request: web.Request, x: Exchange, body: RequestBody | None) -> Identity:
        key = request[FORM].get("key")
        identity: Identity | None = None
        if isinstance(key, str) and key:
            try:
                identity = await self._auth.identify_key(key.strip())
            except StoreUnavailable:
                raise  # not a wrong key: the outage page
            except errors.AwsError:
                identity = None
        address, attempt = request[_ATTEMPT]
        if identity is not None and identity.is_master and not self._master_signin:
            identity = None  # the break-glass sign-in is switched off
        if identity is None or identity.kind not in ("master", "virtual"):
            failed = Actor("anonymous", "anonymous", source=address, request_id=x.request_id)
            await self._audit.append(Change(failed, "console.signin.failed"))
            raise _refused(401, "That key is not valid.")
        self._throttle.succeeded(address, attempt)
        who = actor_of(identity, address, x.request_id)
        await self._audit.append(Change(who, "console.signin", identity.key_id))
        return identity


async def read_form(request: web.Request, limit: int, timeout: float) -> dict[str, str]:
    """A URL-encoded form, read within ``limit`` bytes and ``timeout`` seconds (aiohttp's
    ``post()`` reads up to 1 MiB with no deadline: 40 anonymous HTTP/2 streams trickling
    a megabyte each held ~55 MiB for as long as they liked)."""
    if (request.content_length or 0) > limit:
        raise FormRefused(413, "The form is too large.")
    if request.body_exists and request.content_type != "application/x-www-form-urlencoded":
        raise FormRefused(415, "Send the form as the page does.")
    body = bytearray()
    try:
        async with asyncio.timeout(timeout):
            while chunk := await request.content.readany():
                body += chunk
                if len(body) > limit:
                    raise FormRefused(413, "The form is too large.")
    except TimeoutError:
        raise FormRefused(408, "The form took too long to arrive.") from None
    fields = parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
    return dict(fields)


def callback_url(request: web.Request, proxies: TrustedProxies) -> str:
    """Where the identity provider sends the browser back (registered with it)."""
    return f"{proxies.scheme(request)}://{request.host}{PREFIX}/sso/callback"


class SsoDoor(LocalDoor):
    """The single sign-on callback: the identity provider's code is the credential,
    exchanged and its ID token verified (``server.sso``); every outcome audited."""

    def __init__(
        self,
        sso: SingleSignOn,
        proxies: TrustedProxies,
        audit: AuditRepository,
        throttle: SignInThrottle,
        on_signin: Callable[[Identity, Actor], Awaitable[None]] | None = None,
    ) -> None:
        self._sso, self._proxies, self._audit = sso, proxies, audit
        self._throttle, self._on_signin = throttle, on_signin

    async def credential(self, request: web.Request, x: Exchange) -> Identity | None:
        address = self._proxies.client(request)
        # Counted as the key sign-in's are, before any work: a flood of forged callbacks
        # costs neither a call to the provider nor an audit row past the allowance.
        attempt = self._throttle.attempt(address)
        if attempt is None:
            raise _refused(429, "Too many failed sign-ins; wait a minute and try again.")
        try:
            identity, refresh = await self._sso.finish(
                dict(request.query),
                request.cookies.get(PENDING_COOKIE),
                callback_url(request, self._proxies),
            )
        except errors.AwsError as exc:
            if exc.status < 500:
                failed = Actor("anonymous", "anonymous", source=address, request_id=x.request_id)
                change = Change(failed, "console.signin.failed", extra={"reason": exc.message})
                await self._audit.append(change)
            raise
        self._throttle.succeeded(address, attempt)
        if refresh is not None:
            request[REFRESH] = refresh
        who = actor_of(identity, address, x.request_id)
        after = {"role": identity.role, "teams": list(identity.teams)}
        await self._audit.append(Change(who, "console.signin", identity.key_id, after=after))
        if self._on_signin is not None:  # the user's record and teams, as the groups say
            await self._on_signin(identity, who)
        return identity


def console_page(then: str | None) -> str | None:
    """``then`` if it is a console page of this proxy (never another site's address)."""
    if then and then.startswith(PREFIX + "/") and not then.startswith("//") and "\\" not in then:
        return then
    return None


# bedrock-proxy login's code and verifier, and the token they open.
CODE_BYTES = 16 * 1024
CLI_TOKEN: web.RequestKey[str] = web.RequestKey("cli_token", str)


class CliDoor(LocalDoor):
    """``POST /cli/token``: the credential is in the body (a code and its verifier)."""

    def __init__(self, sso: SingleSignOn, tokens: Any, body_timeout: float) -> None:
        self._sso, self._tokens, self._body_timeout = sso, tokens, body_timeout

    async def credential(self, request: web.Request, x: Exchange) -> Identity | None:
        return None

    async def read(self, request: web.Request, x: Exchange) -> RequestBody | None:
        return await read_body(request, CODE_BYTES, self._body_timeout)

    async def verify(self, request: web.Request, x: Exchange, body: RequestBody | None) -> Identity:
        assert body is not None
        try:
            sent = orjson.loads(body.joined())
        except orjson.JSONDecodeError:
            sent = None
        if not isinstance(sent, dict) or not all(
            isinstance(sent.get(k), str) for k in ("code", "verifier")
        ):
            raise errors.validation('Send {"code": ..., "verifier": ...}')
        token = self._sso.cli_token(sent["code"], sent["verifier"])
        request[CLI_TOKEN] = token
        identity: Identity = await self._tokens.identify(token)
        return identity
