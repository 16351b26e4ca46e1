"""The admin API's teams and users, with LiteLLM's routes and fields: /team/new, /update,
/delete, /info, /list, /member_add, /member_delete; /user/new, /update, /delete, /info,
/list; /key/block and /key/unblock; and /key/session, a signed-in user's short-lived key.
Every change is audited (``access.directory``)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ...access import roles
from ...access.directory import Directory
from ...access.keyservice import KeyService
from ...wire import errors
from ..login_recheck import LoginRecheck
from .admin_door import CALL, AdminRoutes, json_body


class DirectoryApi:
    def __init__(
        self,
        directory: Directory,
        keys: KeyService | None,
        routes: AdminRoutes,
        recheck: LoginRecheck | None = None,
    ) -> None:
        self._directory, self._keys, self._routes = directory, keys, routes
        self._recheck = recheck

    def add_routes(self, app: web.Application) -> None:
        json = self._routes.json
        get, post = app.router.add_get, app.router.add_post
        post("/team/new", json(self.team_new, roles.TEAMS))
        post("/team/update", json(self.team_update, roles.TEAMS))
        post("/team/delete", json(self.team_delete, roles.TEAMS))
        get("/team/info", json(self.team_info, roles.READ, ("team_id",)))
        get("/team/list", json(self.team_list, roles.READ))
        post("/team/member_add", json(self.member_add, roles.MEMBERS))
        post("/team/member_delete", json(self.member_delete, roles.MEMBERS))
        post("/user/new", json(self.user_new, roles.TEAMS))
        post("/user/update", json(self.user_update, roles.TEAMS))
        post("/user/delete", json(self.user_delete, roles.TEAMS))
        get("/user/info", json(self.user_info, roles.READ_ALL, ("user_id",)))
        get("/user/list", json(self.user_list, roles.READ_ALL))
        post("/key/block", json(self.key_block, roles.KEYS))
        post("/key/unblock", json(self.key_unblock, roles.KEYS))
        post("/key/session", json(self.key_session, roles.KEYS))

    async def team_new(self, request: web.Request) -> Any:
        return await self._directory.team_new(json_body(request), request[CALL].actor)

    async def team_update(self, request: web.Request) -> Any:
        return await self._directory.team_update(json_body(request), request[CALL].actor)

    async def team_delete(self, request: web.Request) -> Any:
        ids = _ids(json_body(request), "team_ids")
        return {"deleted_teams": await self._directory.team_delete(ids, request[CALL].actor)}

    async def team_info(self, request: web.Request) -> Any:
        team_id = request.query.get("team_id")
        if not team_id:
            raise errors.validation("team_id is required")
        request[CALL].reach.check_team_view(team_id)
        return await self._directory.team_info(team_id)

    async def team_list(self, request: web.Request) -> Any:
        # A team-admin's teams, a member's: the ones they are in.
        return {"teams": request[CALL].reach.visible(await self._directory.teams())}

    async def member_add(self, request: web.Request) -> Any:
        body = json_body(request)
        request[CALL].reach.check_team(body.get("team_id"))  # a team-admin: its own teams
        return await self._directory.member_add(body, request[CALL].actor)

    async def member_delete(self, request: web.Request) -> Any:
        body = json_body(request)
        request[CALL].reach.check_team(body.get("team_id"))
        return await self._directory.member_delete(body, request[CALL].actor)

    async def user_new(self, request: web.Request) -> Any:
        return await self._directory.user_new(json_body(request), request[CALL].actor)

    async def user_update(self, request: web.Request) -> Any:
        return await self._directory.user_update(json_body(request), request[CALL].actor)

    async def user_delete(self, request: web.Request) -> Any:
        ids = _ids(json_body(request), "user_ids")
        return {"deleted_users": await self._directory.user_delete(ids, request[CALL].actor)}

    async def user_info(self, request: web.Request) -> Any:
        user_id = request.query.get("user_id")
        if not user_id:
            raise errors.validation("user_id is required")
        return await self._directory.user_info(user_id)

    async def user_list(self, request: web.Request) -> Any:
        return {"users": await self._directory.users()}

    async def key_block(self, request: web.Request) -> Any:
        return await self._block(request, True)

    async def key_unblock(self, request: web.Request) -> Any:
        return await self._block(request, False)

    async def key_session(self, request: web.Request) -> Any:
        """A short-lived key for the calling user (their machine's login token, or a
        console session): what ``bedrock-proxy token`` prints."""
        if self._keys is None:
            raise errors.access_denied("The admin API needs a master key to be configured")
        call = request[CALL]
        if call.reach.user is None:
            raise errors.access_denied("A short-lived key is for a user: sign in first")
        identity = call.identity
        if self._recheck is not None and identity.kind == "token" and identity.key_id:
            await self._recheck.before_mint(identity.key_id)  # still in their groups?
        return await self._keys.session_key(call.identity, call.actor)

    async def _block(self, request: web.Request, blocked: bool) -> Any:
        """LiteLLM's /key/block and /key/unblock: {"key": token, id or alias}."""
        if self._keys is None:
            raise errors.access_denied("The admin API needs a master key to be configured")
        call = request[CALL]
        ref = json_body(request).get("key")
        if not isinstance(ref, str) or not ref:
            raise errors.validation("key is required")
        record = await self._keys.find(ref)
        if call.reach.scoped:
            call.reach.check_key(record)
        body = call.reach.check_key_body({"blocked": blocked}, creating=False)
        return await self._keys.update(record.key_id, {"blocked": body["blocked"]}, call.actor)


def _ids(body: dict[str, Any], name: str) -> list[str]:
    """LiteLLM's ``team_ids`` or ``user_ids``: a non-empty list of ids."""
    ids = body.get(name)
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) and i for i in ids):
        raise errors.validation(f"{name} must be a non-empty list of ids")
    return ids
