"""Request and response bodies of the admin REST API (the OpenAPI document is built from these).

Every input is checked here, once, against what the API documents and what PostgreSQL can store:
ids are bigints (1 … 2^63-1), text holds no NUL and no lone surrogate, booleans and integers in a
JSON body are JSON booleans and integers (``"yes"``, ``"1"`` and ``1.5`` are 422), and query-string
or path integers are plain decimal digits, date-times RFC 3339 with an offset.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, Strict, TypeAdapter
from pydantic_core import PydanticCustomError

from shared.db.models import IncidentStatus
from shared.mappings import PROJECT_ID_RULE, SERVICE_NAME_MAX, SLUG_RULE, MappingView, UnmappedProject
from shared.sentry import SLUG_RE

BIGINT_MAX = 2**63 - 1  # PostgreSQL bigint, the type of every id
NO_NUL = "^[^\\x00]*$"  # JSON Schema pattern of Text
_DECIMAL = re.compile(r"-?[0-9]+")
_DATETIME: TypeAdapter[datetime] = TypeAdapter(datetime)
_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})"
)


def _storable_text(value: str) -> str:
    if "\x00" in value:
        raise PydanticCustomError("nul_character", "must not contain the NUL character (U+0000)")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise PydanticCustomError("surrogate_character", "must be valid Unicode (no lone surrogates)") from None
    return value


def _integral_float(value: object) -> object:
    """JSON Schema counts ``1.0`` as an integer, so a JSON body may send one; ``1.5`` stays a 422."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _from_decimal(value: object) -> object:
    """A query-string or path integer: decimal digits (no ``1.0``, ``1_000``, `` 1``), then its bounds."""
    if isinstance(value, str):
        if not _DECIMAL.fullmatch(value):
            raise PydanticCustomError("int_parsing", "must be an integer written in decimal digits")
        if len(value) > 20:  # beyond any bound here, and cheaper than int() of thousands of digits
            raise PydanticCustomError("int_range", "is out of range (at most {max})", {"max": BIGINT_MAX})
        return int(value)
    return value


def _from_rfc3339(value: object) -> object:
    """A query-string date-time: RFC 3339 with an offset (no ``0.5``, no bare date)."""
    if isinstance(value, str):
        if not _RFC3339.fullmatch(value):
            raise PydanticCustomError("datetime_parsing", "must be an RFC 3339 date-time like 2024-05-01T12:00:00Z")
        return _DATETIME.validate_strings(value, strict=True)
    return value


# Text that PostgreSQL can store; the OpenAPI document says it with a pattern.
Text = Annotated[str, AfterValidator(_storable_text), Field(json_schema_extra={"pattern": NO_NUL})]
_BIGINT_ID = Field(ge=1, le=BIGINT_MAX)
# An id in a JSON body: a JSON integer (``1.0`` too, not ``"1"``), a bigint >= 1.
Id = Annotated[int, _BIGINT_ID, BeforeValidator(_integral_float)]
# The same in a query string or path, and other query-string integers (bounded by their field).
QueryId = Annotated[int, _BIGINT_ID, BeforeValidator(_from_decimal)]
QueryInt = Annotated[int, BeforeValidator(_from_decimal)]
QueryDateTime = Annotated[datetime, BeforeValidator(_from_rfc3339)]
# Sentry's numeric project id, as a string of digits (shared.mappings.check_project_id).
ProjectId = Annotated[str, Field(pattern=r"^[0-9]{1,20}$", description=PROJECT_ID_RULE)]


class _Body(BaseModel):
    """A JSON request body or a query string: no unknown fields, no coercion beyond the Query* types."""

    model_config = ConfigDict(extra="forbid", strict=True)


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class ErrorDetail(_Out):
    code: str
    message: str
    field: str | None = None


class ErrorBody(_Out):
    error: ErrorDetail


class ServiceIn(_Body):
    name: Text = Field(min_length=1, max_length=SERVICE_NAME_MAX)


class ServiceOut(_Out):
    id: int
    name: str


class MappingIn(_Body):
    # Checked by shared.mappings.check_slug (422 invalid_slug); the pattern tells API clients.
    sentry_project_slug: Text = Field(
        description=f"Sentry project slug: {SLUG_RULE}", json_schema_extra={"pattern": SLUG_RE.pattern}
    )
    service_id: Id
    active: bool = True
    sentry_project_id: ProjectId | None = None


class MappingPatch(_Body):
    service_id: Id | None = None
    active: bool | None = None
    # Follow a project renamed in Sentry (the mapping's ``renamed_to`` shows the new slug).
    sentry_project_slug: Text | None = Field(
        default=None, description=f"Sentry project slug: {SLUG_RULE}", json_schema_extra={"pattern": SLUG_RE.pattern}
    )
    sentry_project_id: ProjectId | None = None


# The shared views under their API names (a subclass names the OpenAPI schema; the handlers answer
# the unmapped projects as they are, and the mappings with what only the API adds).
class MappingOut(MappingView):
    events_24h: int = Field(
        ge=0,
        description="Deliveries received for the project in the last 24 hours, whatever their outcome: audit records "
        "of its slug, or of the slug Sentry renamed it to (before the mapping existed too)",
    )


class UnmappedProjectOut(UnmappedProject):
    pass


class IntegrationOut(_Out):
    org: str
    webhook_url: str
    status: Literal["active"]
    secret_rotated_at: datetime | None
    previous_secret_valid: bool
    legacy_plugin_enabled: bool
    mappings: int
    active_mappings: int
    last_event_at: datetime | None


class IncidentOut(_Out):
    id: int
    service_id: int
    title: str
    level: str | None
    status: str
    event_count: int
    sentry_issue_id: str | None
    web_url: str | None
    first_seen_at: datetime
    last_seen_at: datetime


class TimelineEntryOut(_Out):
    delivery_id: str
    project_slug: str | None
    resource: str
    action: str
    change: str
    title: str | None
    level: str | None
    event_id: str | None
    occurred_at: datetime | None
    received_at: datetime
    replay_id: str | None = None  # the replay that delivered it (from the delivery's audit record)


class IncidentPage(_Out):
    items: list[IncidentOut]
    next: str | None


class AuditRecordOut(_Out):
    delivery_id: str
    resource: str
    action: str
    project_slug: str | None
    outcome: str
    reason: str | None
    service_id: int | None
    mapping_id: int | None
    incident_id: int | None
    received_at: datetime
    processed_at: datetime
    replay_id: str | None
    previous_outcome: str | None
    previous_reason: str | None
    renamed_from: str | None
    flags: list[str] | None
    error: str | None
    dlq_partition: int | None
    dlq_offset: int | None


class AuditPage(_Out):
    items: list[AuditRecordOut]
    next: str | None


# --- query strings ----------------------------------------------------------------------------


class UnmappedQuery(_Body):
    days: QueryInt = Field(default=7, ge=1, le=90)


class IncidentQuery(_Body):
    service_id: QueryId | None = None
    status: Annotated[IncidentStatus, Strict(False)] | None = None
    limit: QueryInt = Field(default=50, ge=1, le=500)
    cursor: QueryId | None = None


class AuditQuery(_Body):
    outcome: Literal["routed", "ignored", "failed"] | None = None
    reason: Text | None = Field(default=None, max_length=32)
    project: Text | None = Field(default=None, max_length=100)
    since: QueryDateTime | None = None
    limit: QueryInt = Field(default=50, ge=1, le=500)
    cursor: QueryId | None = None
