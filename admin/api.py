"""The admin REST API under ``/api/v1``: one table of endpoints feeds both the routes and OpenAPI.

Every call needs ``Authorization: Bearer <org API token>`` and sees only that org: another org's
ids answer 404 exactly like missing ones. Each call runs in one database transaction. Errors are
``{"error": {"code", "message", "field"?}}``: 400 (a body that is not JSON: malformed, invalid UTF-8,
nested deeper than 1024), 401, 404, 409, 413 (a body over MAX_BODY_BYTES), 422 (anything the models
of ``admin.schemas`` reject: ids beyond bigint, NUL characters, wrong JSON types, ...), 503 with
``Retry-After`` while PostgreSQL is unreachable (the pool reconnects by itself, ``pool_pre_ping``)
and, for a bug, 500 (logged). No input answers 5xx: ``tests/admin/test_fuzz.py`` holds us to it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypeVar
from urllib.parse import urlencode

import orjson
from pydantic import BaseModel, TypeAdapter, ValidationError
from sqlalchemy import Select, func, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import InstrumentedAttribute
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from admin import schemas
from shared import mappings
from shared.db.models import (
    ApiToken,
    AuditRecord,
    Incident,
    IncidentEvent,
    Organization,
    SentryIntegration,
    SentryProjectMapping,
)
from shared.errors import DomainError, ErrorKind, error_body
from shared.security import hash_token
from shared.settings import Settings

PREFIX = "/api/v1"
MAX_BODY_BYTES = 64 * 1024
RETRY_AFTER_SECONDS = 5  # told to callers while the database is unreachable
M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")
Row = TypeVar("Row", Incident, AuditRecord)
STATUS = {ErrorKind.INVALID: 422, ErrorKind.NOT_FOUND: 404, ErrorKind.CONFLICT: 409}
# The database (or the way to it) is down: connect refused or reset, pool exhausted, server shutting down.
UNAVAILABLE = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError, OSError)
PATH_ID: TypeAdapter[int] = TypeAdapter(schemas.QueryId)
RECENT = timedelta(hours=24)  # a mapping's ``events_24h``
log = logging.getLogger("blametrail.admin")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field


@dataclass
class Call:
    """What a handler gets: the request, its org, and a session inside the call's transaction."""

    request: Request
    session: AsyncSession
    org_id: int
    org_slug: str
    settings: Settings

    def path_int(self, name: str) -> int:
        """A path id (``schemas.QueryId``: decimal digits, 1 … 2^63-1), else 422 naming it."""
        return validate(lambda: PATH_ID.validate_python(self.request.path_params[name], strict=True), name)

    async def body(self, model: type[M]) -> M:
        raw = await read_body(self.request)
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, "malformed_json", f"request body is not valid JSON: {exc}") from exc
        return validate(lambda: model.model_validate(data))

    def query(self, model: type[M]) -> M:
        params: dict[str, str] = {}
        for key, value in self.request.query_params.multi_items():
            if key in params:
                raise ApiError(422, "invalid", f"{key}: given more than once", key)
            params[key] = value
        return validate(lambda: model.model_validate(params))


async def read_body(request: Request) -> bytes:
    """The request body, at most MAX_BODY_BYTES (else 413, before reading more than that)."""
    too_large = ApiError(413, "body_too_large", f"request body is larger than {MAX_BODY_BYTES} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and (len(declared) > 9 or int(declared) > MAX_BODY_BYTES):
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def validate(run: Callable[[], T], field: str | None = None) -> T:
    """``run()``, a pydantic validation; its first error as a 422 naming the field (or ``field``)."""
    try:
        return run()
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or field
        message = f"{field}: {first['msg']}" if field else first["msg"]
        raise ApiError(422, "invalid", message, field) from exc


def error_response(
    status: int, code: str, message: str, field: str | None = None, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(code, message, field), status_code=status, headers=headers)


def unavailable_response() -> JSONResponse:
    return error_response(
        503, "unavailable", "the database is unreachable: retry later",
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )  # fmt: skip


def internal_error_response() -> JSONResponse:
    return error_response(500, "internal", "unexpected server error (logged)")


def json_response(data: BaseModel | Sequence[BaseModel], status: int = 200) -> Response:
    if isinstance(data, BaseModel):
        content = data.model_dump_json().encode()
    else:
        content = b"[" + b",".join(item.model_dump_json().encode() for item in data) + b"]"
    return Response(content, status_code=status, media_type="application/json")


def next_link(request: Request, cursor: int | None) -> str | None:
    if cursor is None:
        return None
    params = {k: v for k, v in request.query_params.items() if k != "cursor"}
    params["cursor"] = str(cursor)
    return f"{request.url.path}?{urlencode(params)}"


# --- handlers ---------------------------------------------------------------------------------


async def list_services(call: Call) -> Response:
    services = await mappings.list_services(call.session, call.org_id)
    return json_response([schemas.ServiceOut.model_validate(s) for s in services])


async def create_service(call: Call) -> Response:
    body = await call.body(schemas.ServiceIn)
    service = await mappings.create_service(call.session, call.org_id, body.name)
    return json_response(schemas.ServiceOut.model_validate(service), 201)


async def delete_service(call: Call) -> Response:
    await mappings.delete_service(call.session, call.org_id, call.path_int("service_id"))
    return Response(status_code=204)


async def get_integration(call: Call) -> Response:
    integration = await call.session.get(SentryIntegration, call.org_id)
    counts = (
        await call.session.execute(
            select(func.count(), func.count().filter(SentryProjectMapping.active)).where(
                SentryProjectMapping.org_id == call.org_id
            )
        )
    ).one()
    last_event: datetime | None = await call.session.scalar(
        select(func.max(AuditRecord.received_at)).where(AuditRecord.org_id == call.org_id)
    )
    out = schemas.IntegrationOut(
        org=call.org_slug,
        webhook_url=call.settings.webhook_url(call.org_slug),
        status="active",
        secret_rotated_at=integration.rotated_at if integration else None,
        previous_secret_valid=bool(integration and integration.previous_client_secret),
        legacy_plugin_enabled=bool(integration and integration.legacy_plugin_token),
        mappings=counts[0],
        active_mappings=counts[1],
        last_event_at=last_event,
    )
    return json_response(out)


async def with_recent_events(call: Call, views: Sequence[mappings.MappingView]) -> list[schemas.MappingOut]:
    """The mappings with their ``events_24h``: the org's audit records of the last 24 h per project
    slug (the mapping's, and the one Sentry renamed it to), counted in one query on the index
    ``ix_audit_records_org_project_received`` (org_id, project_slug, received_at)."""
    slugs = {slug for v in views for slug in (v.sentry_project_slug, v.renamed_to) if slug}
    counts: dict[str | None, int] = {}
    if slugs:
        rows = await call.session.execute(
            select(AuditRecord.project_slug, func.count())
            .where(
                AuditRecord.org_id == call.org_id,
                AuditRecord.project_slug.in_(slugs),
                AuditRecord.received_at >= func.now() - RECENT,
            )
            .group_by(AuditRecord.project_slug)
        )
        counts = {slug: count for slug, count in rows}
    return [
        schemas.MappingOut(
            **v.model_dump(),
            events_24h=counts.get(v.sentry_project_slug, 0) + (counts.get(v.renamed_to, 0) if v.renamed_to else 0),
        )
        for v in views
    ]


async def list_mappings(call: Call) -> Response:
    views = await mappings.list_mappings(call.session, call.org_id)
    return json_response(await with_recent_events(call, views))


async def create_mapping(call: Call) -> Response:
    body = await call.body(schemas.MappingIn)
    view = await mappings.add_mapping(
        call.session,
        call.org_id,
        body.sentry_project_slug,
        body.service_id,
        active=body.active,
        sentry_project_id=body.sentry_project_id,
    )
    return json_response((await with_recent_events(call, [view]))[0], 201)


async def edit_mapping(call: Call) -> Response:
    body = await call.body(schemas.MappingPatch)
    view = await mappings.edit_mapping(
        call.session,
        call.org_id,
        call.path_int("mapping_id"),
        service_id=body.service_id,
        active=body.active,
        sentry_project_slug=body.sentry_project_slug,
        sentry_project_id=body.sentry_project_id,
    )
    return json_response((await with_recent_events(call, [view]))[0])


async def delete_mapping(call: Call) -> Response:
    await mappings.delete_mapping(call.session, call.org_id, call.path_int("mapping_id"))
    return Response(status_code=204)


async def list_unmapped(call: Call) -> Response:
    query = call.query(schemas.UnmappedQuery)
    found = await mappings.unmapped_projects(call.session, call.org_id, days=query.days)
    return json_response(found)


async def keyset_page(
    call: Call, stmt: Select[Row], id_column: InstrumentedAttribute[int], limit: int, cursor: int | None
) -> tuple[list[Row], str | None]:
    """One page, newest (highest id) first, and the link to the next page (None on the last)."""
    if cursor is not None:
        stmt = stmt.where(id_column < cursor)
    rows = list(await call.session.scalars(stmt.order_by(id_column.desc()).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, next_link(call.request, rows[-1].id if more else None)


async def list_incidents(call: Call) -> Response:
    q = call.query(schemas.IncidentQuery)
    stmt = select(Incident).where(Incident.org_id == call.org_id)
    if q.service_id is not None:
        stmt = stmt.where(Incident.service_id == q.service_id)
    if q.status is not None:
        stmt = stmt.where(Incident.status == q.status)
    rows, next_page = await keyset_page(call, stmt, Incident.id, q.limit, q.cursor)
    return json_response(
        schemas.IncidentPage(items=[schemas.IncidentOut.model_validate(r) for r in rows], next=next_page)
    )


async def own_incident(call: Call) -> Incident:
    """The path's incident when it is the caller's org's, else 404 (another org's id too)."""
    incident_id = call.path_int("incident_id")
    found = await call.session.scalar(
        select(Incident).where(Incident.org_id == call.org_id, Incident.id == incident_id)
    )
    if found is None:
        raise ApiError(404, "not_found", f"incident {incident_id} not found")
    return found


async def get_incident(call: Call) -> Response:
    return json_response(schemas.IncidentOut.model_validate(await own_incident(call)))


async def incident_timeline(call: Call) -> Response:
    incident = await own_incident(call)
    # The delivery's audit record tells whether a replay made the entry (its replay_id).
    rows = await call.session.execute(
        select(IncidentEvent, AuditRecord.replay_id)
        .outerjoin(
            AuditRecord,
            (AuditRecord.org_id == call.org_id)
            & (AuditRecord.delivery_id == IncidentEvent.delivery_id)
            & AuditRecord.project_slug.is_not_distinct_from(IncidentEvent.project_slug),
        )
        .where(IncidentEvent.incident_id == incident.id)
        .order_by(IncidentEvent.id)
    )
    return json_response(
        [schemas.TimelineEntryOut.model_validate(e).model_copy(update={"replay_id": r}) for e, r in rows]
    )


async def list_audit(call: Call) -> Response:
    q = call.query(schemas.AuditQuery)
    stmt = select(AuditRecord).where(AuditRecord.org_id == call.org_id)
    if q.outcome is not None:
        stmt = stmt.where(AuditRecord.outcome == q.outcome)
    if q.reason is not None:
        stmt = stmt.where(AuditRecord.reason == q.reason)
    if q.project is not None:
        stmt = stmt.where(AuditRecord.project_slug == q.project)
    if q.since is not None:
        stmt = stmt.where(AuditRecord.received_at >= q.since)
    rows, next_page = await keyset_page(call, stmt, AuditRecord.id, q.limit, q.cursor)
    return json_response(
        schemas.AuditPage(items=[schemas.AuditRecordOut.model_validate(r) for r in rows], next=next_page)
    )


# --- the endpoint table -----------------------------------------------------------------------


_PATH_PARAM = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str  # Starlette path under PREFIX; every ``{name}`` in it is an id, read with ``Call.path_int``
    handler: Callable[[Call], Awaitable[Response]]
    summary: str
    status: int = 200
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    many: bool = False  # the response is a JSON array of ``response``
    errors: tuple[int, ...] = ()  # what the handler itself answers (404, 409, 422 of shared.mappings)

    @property
    def path_params(self) -> list[str]:
        return _PATH_PARAM.findall(self.path)

    def error_statuses(self) -> list[int]:
        """Every error status the endpoint can answer, the dispatcher's and validation's included."""
        codes = {401, 500, 503, *self.errors}
        if self.path_params or self.query is not None or self.body is not None:
            codes.add(422)
        if self.body is not None:
            codes |= {400, 413}
        return sorted(codes)


MAPPING = "/integrations/sentry/mappings/{mapping_id}"
ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("GET", "/services", list_services, "List services", response=schemas.ServiceOut, many=True),
    Endpoint(
        "POST", "/services", create_service, "Create a service", 201, body=schemas.ServiceIn,
        response=schemas.ServiceOut, errors=(409,),
    ),
    Endpoint(
        "DELETE", "/services/{service_id}", delete_service,
        "Delete a service (409 while mappings or incidents use it)", 204, errors=(404, 409),
    ),
    Endpoint(
        "GET", "/integrations/sentry", get_integration, "Webhook URL and integration status",
        response=schemas.IntegrationOut,
    ),
    Endpoint(
        "GET", "/integrations/sentry/mappings", list_mappings, "List Sentry project mappings",
        response=schemas.MappingOut, many=True,
    ),
    Endpoint(
        "POST", "/integrations/sentry/mappings", create_mapping, "Map a Sentry project to a service", 201,
        body=schemas.MappingIn, response=schemas.MappingOut, errors=(409,),
    ),
    Endpoint(
        "PATCH", MAPPING, edit_mapping, "Change a mapping's service, enable or disable it",
        body=schemas.MappingPatch, response=schemas.MappingOut, errors=(404,),
    ),
    Endpoint("DELETE", MAPPING, delete_mapping, "Delete a mapping", 204, errors=(404,)),
    Endpoint(
        "GET", "/integrations/sentry/unmapped-projects", list_unmapped,
        "Projects that sent events recently and have no mapping", query=schemas.UnmappedQuery,
        response=schemas.UnmappedProjectOut, many=True,
    ),
    Endpoint(
        "GET", "/incidents", list_incidents, "Incidents, newest first", query=schemas.IncidentQuery,
        response=schemas.IncidentPage,
    ),
    Endpoint(
        "GET", "/incidents/{incident_id}", get_incident, "One incident", response=schemas.IncidentOut,
        errors=(404,),
    ),
    Endpoint(
        "GET", "/incidents/{incident_id}/events", incident_timeline,
        "An incident's timeline: every delivery that touched it, oldest first",
        response=schemas.TimelineEntryOut, many=True, errors=(404,),
    ),
    Endpoint(
        "GET", "/integrations/sentry/audit", list_audit, "Audit records, newest first", query=schemas.AuditQuery,
        response=schemas.AuditPage,
    ),
)  # fmt: skip


# --- dispatch ---------------------------------------------------------------------------------


async def authenticate(session: AsyncSession, request: Request) -> tuple[int, str]:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "unauthorized", "send Authorization: Bearer <API token>")
    row = (
        await session.execute(
            select(Organization.id, Organization.slug)
            .join(ApiToken, ApiToken.org_id == Organization.id)
            .where(ApiToken.token_hash == hash_token(token.strip()), ApiToken.revoked_at.is_(None))
        )
    ).one_or_none()
    if row is None:
        raise ApiError(401, "unauthorized", "the API token is not valid")
    return int(row[0]), str(row[1])


def make_handler(
    endpoint: Endpoint, sessions: async_sessionmaker[AsyncSession], settings: Settings
) -> Callable[[Request], Awaitable[Response]]:
    async def handle(request: Request) -> Response:
        try:
            async with sessions() as session, session.begin():
                org_id, org_slug = await authenticate(session, request)
                return await endpoint.handler(Call(request, session, org_id, org_slug, settings))
        except ApiError as exc:
            return error_response(exc.status, exc.code, exc.message, exc.field)
        except DomainError as exc:
            return error_response(STATUS[exc.kind], exc.code, exc.message, exc.field)
        except UNAVAILABLE as exc:
            log.warning("database unreachable, answering 503: %s: %s", type(exc).__name__, exc)
            return unavailable_response()
        except Exception:
            log.exception("unexpected error in %s %s", request.method, request.url.path)
            return internal_error_response()

    handle.__name__ = endpoint.handler.__name__
    return handle


def api_routes(sessions: async_sessionmaker[AsyncSession], settings: Settings) -> list[Route]:
    """One route per path, dispatching on the method, so that a 405 lists all of the path's methods."""
    by_path: dict[str, dict[str, Callable[[Request], Awaitable[Response]]]] = {}
    for e in ENDPOINTS:
        by_path.setdefault(e.path, {})[e.method] = make_handler(e, sessions, settings)

    def route(path: str, handlers: dict[str, Callable[[Request], Awaitable[Response]]]) -> Route:
        async def dispatch(request: Request) -> Response:
            return await handlers["GET" if request.method == "HEAD" else request.method](request)

        return Route(PREFIX + path, dispatch, methods=list(handlers))

    return [route(path, handlers) for path, handlers in by_path.items()]
