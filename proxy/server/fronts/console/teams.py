"""The console's teams and users, through the admin API's own ``Directory`` (so the
console and ``/team/*``, ``/user/*`` validate, audit and refuse alike):

- ``/teams``: the teams in reach (a team-admin's own, a member's own) and, for an admin,
  a new team's form and the users with their caps;
- ``/teams/{id}``: a team's policy (changed by an admin), its members (added and removed
  by an admin or the team's team-admin), and its deletion;
- ``/users/{id}``: a user's spend cap and teams (an admin), and their deletion, which
  ends their keys and their machines' logins.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

from aiohttp import web

from ....access import roles
from ....access.directory import Directory
from ....store.records import ALLOW_LIST_FIELDS
from ....wire import errors
from .base import ConsoleBase
from .doors import FORM, REACH
from .forms import form_fields, split_list
from .security import PREFIX
from .sessions import ConsoleSession

_TEAM_TEXTS = (
    "team_alias",
    "upstream",
    "budget_duration",
    "key_max_duration",
    "key_session_duration",
    "team_member_budget_duration",
)
_TEAM_NUMBERS: dict[str, type[int] | type[float]] = {
    "max_budget": float,
    "key_max_budget": float,
    "team_member_budget": float,
    "rpm_limit": int,
    "tpm_limit": int,
    "key_rpm_limit": int,
    "key_tpm_limit": int,
}
_TEAM_LISTS = ("models", "key_operation_groups")
_USER_TEXTS = ("user_email", "user_role", "budget_duration")
_USER_NUMBERS: dict[str, type[int] | type[float]] = {"max_budget": float}


class TeamPages(ConsoleBase):
    @property
    def directory(self) -> Directory:
        if self._directory is None:
            raise errors.access_denied("Teams need a master key to be configured")
        return self._directory

    async def _teams_page(
        self, request: web.Request, session: ConsoleSession, status: int = 200, **values: Any
    ) -> web.Response:
        """Teams in reach, their policy and members; for an admin, users and their caps."""
        reach = request[REACH]
        teams = reach.visible(await self._store.directory.teams())
        members = {t["team_id"]: await self._store.directory.members(t["team_id"]) for t in teams}
        users = await self._store.directory.users() if reach.may(roles.READ_ALL) else []
        values.setdefault("error", None)
        return self._render(
            "teams.html", status, session, teams=teams, members=members, users=users, **values
        )

    async def _team_create(self, request: web.Request, session: ConsoleSession) -> web.Response:
        form = request[FORM]
        body = _team_form(form, True)
        team_id = str(form.get("team_id", "")).strip()
        if team_id:
            body["team_id"] = team_id
        try:
            team = await self.directory.team_new(body, self._actor(request, session))
        except errors.AwsError as exc:
            return await self._teams_page(request, session, 400, error=exc.message)
        raise web.HTTPSeeOther(_team_url(team["team_id"]))

    async def _team_page(
        self, request: web.Request, session: ConsoleSession, status: int = 200, **values: Any
    ) -> web.Response:
        team_id = request.match_info["team_id"]
        request[REACH].check_team_view(team_id)
        if await self._store.directory.team(team_id) is None:
            raise errors.AwsError(404, "ResourceNotFoundException", f"No team {team_id!r}")
        info = await self.directory.team_info(team_id)
        values.setdefault("error", None)
        return self._render("team.html", status, session, team=info, **values)

    async def _team_update(
        self, request: web.Request, session: ConsoleSession
    ) -> web.StreamResponse:
        team_id = request.match_info["team_id"]
        body = {**_team_form(request[FORM], False), "team_id": team_id}
        change = self.directory.team_update(body, self._actor(request, session))
        return await self._made(request, session, change, self._team_page, _team_url(team_id))

    async def _team_delete(
        self, request: web.Request, session: ConsoleSession
    ) -> web.StreamResponse:
        team_id = request.match_info["team_id"]
        if request[FORM].get("confirm") != team_id:
            message = f"To delete the team, type its id ({team_id}) to confirm."
            return await self._team_page(request, session, 400, error=message)
        await self.directory.team_delete([team_id], self._actor(request, session))
        raise web.HTTPSeeOther(PREFIX + "/teams")

    async def _team_members(
        self, request: web.Request, session: ConsoleSession
    ) -> web.StreamResponse:
        """A member added (``add``) or removed (``remove``): an admin, or the team's own
        team-admin."""
        team_id = request.match_info["team_id"]
        request[REACH].check_team(team_id)
        form, actor = request[FORM], self._actor(request, session)
        user_id = str(form.get("user_id", "")).strip()
        if request.path.endswith("/add"):
            member = {"user_id": user_id, "role": form.get("role") or "user"}
            change = self.directory.member_add({"team_id": team_id, "member": member}, actor)
        else:
            change = self.directory.member_delete({"team_id": team_id, "user_id": user_id}, actor)
        return await self._made(request, session, change, self._team_page, _team_url(team_id))

    async def _user_create(self, request: web.Request, session: ConsoleSession) -> web.Response:
        form = request[FORM]
        body = form_fields(form, True, _USER_TEXTS, _USER_NUMBERS)
        body["user_id"] = str(form.get("user_id", "")).strip()
        teams = split_list(form.get("teams", ""))
        if teams:
            body["teams"] = teams
        try:
            user = await self.directory.user_new(body, self._actor(request, session))
        except errors.AwsError as exc:
            return await self._teams_page(request, session, 400, error=exc.message)
        raise web.HTTPSeeOther(_user_url(user["user_id"]))

    async def _user_page(
        self, request: web.Request, session: ConsoleSession, status: int = 200, **values: Any
    ) -> web.Response:
        user = await self.directory.user_info(request.match_info["user_id"])
        values.setdefault("error", None)
        return self._render("user_edit.html", status, session, user=user, **values)

    async def _user_update(
        self, request: web.Request, session: ConsoleSession
    ) -> web.StreamResponse:
        user_id = request.match_info["user_id"]
        form: dict[str, str] = request[FORM]
        body = {**form_fields(form, False, _USER_TEXTS, _USER_NUMBERS), "user_id": user_id}
        change = self.directory.user_update(body, self._actor(request, session))
        return await self._made(request, session, change, self._user_page, _user_url(user_id))

    async def _user_delete(
        self, request: web.Request, session: ConsoleSession
    ) -> web.StreamResponse:
        user_id = request.match_info["user_id"]
        if request[FORM].get("confirm") != user_id:
            message = f"To delete the user, type their id ({user_id}) to confirm."
            return await self._user_page(request, session, 400, error=message)
        await self.directory.user_delete([user_id], self._actor(request, session))
        raise web.HTTPSeeOther(PREFIX + "/teams")

    async def _made(
        self,
        request: web.Request,
        session: ConsoleSession,
        change: Awaitable[Any],
        page: Callable[..., Awaitable[web.Response]],
        then: str,
    ) -> web.StreamResponse:
        """A change made, then on to ``then``; refused, its page again saying why."""
        try:
            await change
        except errors.AwsError as exc:
            return await page(request, session, 400, error=exc.message)
        raise web.HTTPSeeOther(then)


def _team_url(team_id: str) -> str:
    return f"{PREFIX}/teams/{quote(team_id, safe='')}"


def _user_url(user_id: str) -> str:
    return f"{PREFIX}/users/{quote(user_id, safe='@')}"


def _team_form(form: dict[str, str], creating: bool) -> dict[str, Any]:
    """The team form → ``/team/new`` or ``/team/update``'s body; the allow-lists a key of
    the team stays within come as ``allow.<key field>``."""
    body = form_fields(form, creating, _TEAM_TEXTS, _TEAM_NUMBERS, _TEAM_LISTS)
    lists = {
        name: items
        for name in ALLOW_LIST_FIELDS
        if (items := split_list(form.get(f"allow.{name}", "")))
    }
    if lists or not creating:
        body["key_allow_lists"] = lists or None
    return body
