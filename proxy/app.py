"""Builds the aiohttp application: routes, startup and shutdown of what requests share."""

from __future__ import annotations

from aiohttp import web

from . import errors
from .accesslog import AccessLog
from .auth import Authenticator
from .config import ConfigError, Settings
from .credentials import CredentialProvider
from .endpoints import Endpoints, sdk_endpoint_overrides, valid_region
from .forward import BASE_PATH, Forwarder
from .routing import SERVICE_NAMES, Router, load_operations

FORWARDER = web.AppKey("forwarder", Forwarder)
CREDENTIALS = web.AppKey("credentials", CredentialProvider)
STATE = web.AppKey("state", dict)


def create_app(settings: Settings, access_log: AccessLog | None = None) -> web.Application:
    if settings.master_key is None and not settings.allow_unauthenticated:
        raise ConfigError(
            "config error: master_key: BEDROCK_PROXY_MASTER_KEY is not set "
            "(pass --allow-unauthenticated to run without client authentication)"
        )
    router = Router(load_operations())
    overrides = {**sdk_endpoint_overrides(SERVICE_NAMES), **settings.endpoints}
    region = settings.region or _profile_region(settings) or "us-east-1"
    if not valid_region(region):
        raise ConfigError(f"config error: region: {region!r} is not an AWS region name")
    try:
        endpoints = Endpoints(overrides, region)
    except ValueError as exc:
        raise ConfigError(f"config error: endpoints: {exc}") from None
    credentials = CredentialProvider(settings.aws_profile)
    forwarder = Forwarder(
        settings,
        router,
        endpoints,
        credentials,
        Authenticator(settings.master_key, settings.auth_headers, settings.allow_unauthenticated),
        access_log or AccessLog(settings.access_log),
    )

    app = web.Application(handler_args={"max_field_size": 65536})
    app[FORWARDER] = forwarder
    app[CREDENTIALS] = credentials
    app[STATE] = {"ready": False, "needs_credentials": not settings.upstream_bearer_token}
    app.cleanup_ctx.append(_lifecycle)
    app.router.add_get("/health/liveness", _liveness)
    app.router.add_get("/health/readiness", _readiness)
    for path in (BASE_PATH, BASE_PATH + "/{tail:.*}"):
        app.router.add_route("*", path, forwarder.handle, expect_handler=forwarder.expect_handler)
    app.router.add_route("*", "/{tail:.*}", _unknown_route)
    return app


def create_ops_app(main: web.Application) -> web.Application:
    """Health checks alone, for a plain-HTTP listener beside an HTTPS one."""
    app = web.Application()
    app[STATE] = main[STATE]
    app[CREDENTIALS] = main[CREDENTIALS]
    app.router.add_get("/health/liveness", _liveness)
    app.router.add_get("/health/readiness", _readiness)
    app.router.add_route("*", "/{tail:.*}", _unknown_route)
    return app


async def _lifecycle(app: web.Application):
    forwarder = app[FORWARDER]
    await forwarder.start()
    if app[STATE]["needs_credentials"]:
        await app[CREDENTIALS].start()
    app[STATE]["ready"] = True
    yield
    app[STATE]["ready"] = False
    await forwarder.close()
    await app[CREDENTIALS].close()


async def _liveness(request: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


async def _readiness(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if not state["ready"]:
        return web.json_response({"status": "not ready"}, status=503)
    if state["needs_credentials"]:
        try:
            await request.app[CREDENTIALS].get()
        except Exception:
            return web.json_response(
                {"status": "not ready", "reason": "no AWS credentials"}, status=503
            )
    return web.json_response({"status": "ready"})


async def _unknown_route(request: web.Request) -> web.Response:
    return errors.unknown_operation(request.method, request.path).to_response()


def _profile_region(settings: Settings) -> str | None:
    import botocore.session

    try:
        return botocore.session.Session(profile=settings.aws_profile).get_config_variable("region")
    except Exception:
        return None
