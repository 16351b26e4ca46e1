"""The console's key pages: the list (filtered, paged, exported), a key's edit page, and
its actions (block, regenerate, delete), through the admin API's own ``KeyService``."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from ....store import StoreUnavailable
from ....store.records import ALLOW_LIST_FIELDS, KeyRecord
from ....wire import errors
from ....wire.params import MAX_PAGE
from .base import ConsoleBase
from .doors import FORM, REACH
from .forms import form_fields, split_list
from .security import PREFIX
from .sessions import ConsoleSession
from .spend import csv_response

# The key fields the edit form carries, as the admin API names them.
_TEXT_FIELDS = ("key_alias", "user_id", "team_id", "budget_duration", "upstream")
_LIST_FIELDS = ("models", "operation_groups", *ALLOW_LIST_FIELDS)
_NUMBER_FIELDS: dict[str, type[int] | type[float]] = {
    "max_budget": float,
    "rpm_limit": int,
    "tpm_limit": int,
    "max_parallel_requests": int,
}
# Keys shown per page of the list (its CSV has them all).
_KEYS_PER_PAGE = 200


class KeyPages(ConsoleBase):
    async def _key_in_reach(self, request: web.Request) -> KeyRecord:
        """The page's key; for a team-admin or a member, one refusal whether it is out of
        their reach or unknown (no probing another team's keys by id)."""
        reach = request[REACH]
        ref = request.match_info["key_id"]
        if not reach.scoped:
            return await self.keys.find(ref)
        try:
            record: KeyRecord | None = await self.keys.find(ref)
        except StoreUnavailable:
            raise
        except errors.AwsError:
            record = None
        return reach.check_key(record)

    async def _filtered_keys(self, request: web.Request) -> list[dict[str, Any]]:
        q = request.query
        # A team-admin's listing is one of their teams', a member's their own keys.
        filters = request[REACH].narrow({k: q[k] for k in ("team_id", "user_id") if q.get(k)})
        keys: list[dict[str, Any]] = []
        page = 1
        while True:  # every key, page by page: the filters below run on all of them
            found = await self.keys.list(filters, page, MAX_PAGE, full=True)
            keys += found["keys"]
            if page >= found["total_pages"]:
                break
            page += 1
        text = q.get("q", "").strip().lower()
        if text:
            fields = ("key_alias", "key_id", "user_id", "team_id")
            keys = [k for k in keys if any(text in str(k.get(f) or "").lower() for f in fields)]
        if q.get("blocked") in ("yes", "no"):
            keys = [k for k in keys if k["blocked"] == (q["blocked"] == "yes")]
        if q.get("expiring"):
            horizon = (datetime.now(UTC) + timedelta(days=7)).isoformat()
            keys = [
                k for k in keys if k["expires"] and k["expires"].replace("Z", "+00:00") <= horizon
            ]
        return keys

    async def _key_list(self, request: web.Request, session: ConsoleSession) -> web.Response:
        keys = await self._filtered_keys(request)
        pages = max(1, (len(keys) + _KEYS_PER_PAGE - 1) // _KEYS_PER_PAGE)
        text = request.query.get("page", "1")
        page = min(int(text), pages) if text.isdigit() and text != "0" else 1
        query = {k: v for k, v in request.query.items() if k != "page"}
        return self._render(
            "keys.html",
            session=session,
            keys=keys[(page - 1) * _KEYS_PER_PAGE : page * _KEYS_PER_PAGE],
            total=len(keys),
            page=page,
            pages=pages,
            query=query,
        )

    async def _key_csv(self, request: web.Request, session: ConsoleSession) -> web.Response:
        columns = ("key_id", "key_alias", "user_id", "team_id", "max_budget", "rpm_limit",
                   "tpm_limit", "expires", "blocked")  # fmt: skip
        keys = await self._filtered_keys(request)
        return csv_response("keys", columns, [[k.get(c) for c in columns] for k in keys])

    async def _key_new(self, request: web.Request, session: ConsoleSession) -> web.Response:
        return self._render("key_edit.html", session=session, key=None, error=None)

    async def _key_create(self, request: web.Request, session: ConsoleSession) -> web.Response:
        try:
            reach, actor = request[REACH], self._actor(request, session)
            body = reach.check_key_body(_key_form(request[FORM], creating=True), True)
            created = await self.keys.generate(body, actor, reach.user)
        except errors.AwsError as exc:
            return self._render(
                "key_edit.html",
                400,
                session,
                key=None,
                error=str(exc),
                values=request[FORM].copy(),
            )
        return self._render(
            "key_created.html",
            session=session,
            key=created,
            base=self._base_url(request),
        )

    async def _key_edit(self, request: web.Request, session: ConsoleSession) -> web.Response:
        record = await self._key_in_reach(request)
        totals = await self._reports.key_totals(record)
        return self._render(
            "key_edit.html", session=session, key=record.public(), totals=totals, error=None
        )

    async def _key_update(
        self, request: web.Request, session: ConsoleSession
    ) -> web.StreamResponse:
        record = await self._key_in_reach(request)
        try:
            body = request[REACH].check_key_body(_key_form(request[FORM], creating=False), False)
            await self.keys.update(record.key_id, body, self._actor(request, session))
        except errors.AwsError as exc:
            return self._render(
                "key_edit.html", 400, session, key=record.public(), totals={}, error=str(exc)
            )
        raise web.HTTPSeeOther(f"{PREFIX}/keys/{record.key_id}")

    async def _key_action(
        self, request: web.Request, session: ConsoleSession
    ) -> web.StreamResponse:
        action = request.match_info["action"]
        record = await self._key_in_reach(request)
        form = request[FORM]
        actor = self._actor(request, session)
        if action in ("block", "unblock"):
            body = request[REACH].check_key_body({"blocked": action == "block"}, False)
            await self.keys.update(record.key_id, {"blocked": body["blocked"]}, actor)
            raise web.HTTPSeeOther(f"{PREFIX}/keys/{record.key_id}")
        if form.get("confirm") != record.key_id:
            return self._render(
                "error.html",
                400,
                session,
                message=f"To {action} a key, type its id ({record.key_id}) to confirm.",
            )
        if action == "delete":
            request[REACH].check_delete(record)
            await self.keys.delete([record.key_id], actor=actor)
            await self.sessions.end_key(record.key_id)
            raise web.HTTPSeeOther(PREFIX + "/keys")
        if action == "regenerate":
            fresh = await self.keys.regenerate(record.key_id, actor)
            await self.sessions.end_key(record.key_id)
            return self._render(
                "key_created.html",
                session=session,
                key=fresh,
                base=self._base_url(request),
            )
        raise web.HTTPNotFound()


def _key_form(form: Any, creating: bool) -> dict[str, Any]:
    """The edit form → the admin API's body (the same validation as the API's)."""
    lists = [name for name in _LIST_FIELDS if name != "operation_groups"]
    body = form_fields(form, creating, _TEXT_FIELDS, _NUMBER_FIELDS, lists)
    groups = split_list(form.get("operation_groups", ""))
    if groups:
        body["operation_groups"] = groups
    metadata = str(form.get("metadata", "")).strip()
    if metadata:
        try:
            body["metadata"] = json.loads(metadata)
        except ValueError:
            raise errors.validation("metadata: not a JSON object") from None
    elif not creating:
        body["metadata"] = {}
    expires = str(form.get("duration", "")).strip()
    if expires:
        body["duration"] = expires
    if body.get("models") is None:
        body.pop("models", None)
        if not creating:
            body["models"] = []
    return body
