"""Request and response bodies of the admin REST API (the OpenAPI document is built from these)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.mappings import SERVICE_NAME_MAX, SLUG_RULE, MappingView, UnmappedProject


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class ErrorDetail(_Out):
    code: str
    message: str
    field: str | None = None


class ErrorBody(_Out):
    error: ErrorDetail


class ServiceIn(_Body):
    name: str = Field(min_length=1, max_length=SERVICE_NAME_MAX)


class ServiceOut(_Out):
    id: int
    name: str


class MappingIn(_Body):
    sentry_project_slug: str = Field(description=f"Sentry project slug: {SLUG_RULE}")
    service_id: int
    active: bool = True


class MappingPatch(_Body):
    service_id: int | None = None
    active: bool | None = None


# The shared views under their API names (a subclass only names the OpenAPI schema; the
# handlers answer the views themselves).
class MappingOut(MappingView):
    pass


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


class AuditPage(_Out):
    items: list[AuditRecordOut]
    next: str | None


# --- query strings ----------------------------------------------------------------------------


class UnmappedQuery(_Body):
    days: int = Field(default=7, ge=1, le=90)


class IncidentQuery(_Body):
    service_id: int | None = None
    status: Literal["open", "resolved"] | None = None
    limit: int = Field(default=50, ge=1, le=500)
    cursor: int | None = Field(default=None, ge=1)


class AuditQuery(_Body):
    outcome: Literal["routed", "ignored"] | None = None
    reason: str | None = Field(default=None, max_length=32)
    project: str | None = Field(default=None, max_length=100)
    since: datetime | None = None
    limit: int = Field(default=50, ge=1, le=500)
    cursor: int | None = Field(default=None, ge=1)
