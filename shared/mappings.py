"""Services and Sentry project mappings: the rules of the product page, shared by CLI and admin API.

Rules (enforced here and, where a race could break them, by the database):
- a project slug follows Sentry's pattern (``shared.sentry.SLUG_RE``, told to callers as ``SLUG_RULE``);
- a Sentry project maps to at most one service per org (unique constraint; 409 names the mapping);
- many projects may map to one service; the service must be in the same org (composite FK);
- disabling keeps the mapping and its service; editing changes ``service_id`` / ``active``, and the
  project's slug and Sentry project id (to follow a project renamed in Sentry);
- a service that mappings or incidents use cannot be deleted.

Every function takes the caller's org id: another org's ids behave exactly like missing ones.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from pydantic import BaseModel, ConfigDict
from sqlalchemy import and_, delete, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from shared.db.models import AuditRecord, Incident, SentryProjectMapping, Service
from shared.errors import conflict, invalid, not_found
from shared.sentry import is_valid_slug

SERVICE_NAME_MAX = 200
SLUG_RULE = "1-100 characters of a-z, 0-9, _ and -, not all digits"  # in words: shared.sentry.SLUG_RE


class MappingView(BaseModel):
    """A mapping as callers see it: the CLI prints it, the admin API answers it (as ``MappingOut``)."""

    model_config = ConfigDict(frozen=True)

    id: int
    sentry_project_slug: str
    service_id: int
    service_name: str
    active: bool
    # Sentry's numeric project id (stable across renames): given, or learned from the first delivery.
    sentry_project_id: str | None = None
    # The slug Sentry now sends for this project when it was renamed: update the mapping's slug to it.
    renamed_to: str | None = None
    created_at: datetime
    updated_at: datetime
    last_event_at: datetime | None


class UnmappedProject(BaseModel):
    """A project of the admin's inbox (the admin API's ``UnmappedProjectOut``)."""

    model_config = ConfigDict(frozen=True)

    slug: str
    events: int
    last_seen_at: datetime


def check_slug(slug: object, field: str = "sentry_project_slug", what: str = "a Sentry project slug") -> str:
    """``slug`` when it is a valid Sentry slug (``shared.sentry.is_valid_slug``), else ``invalid_slug`` on ``field``."""
    if not isinstance(slug, str) or not is_valid_slug(slug):
        raise invalid("invalid_slug", f"{slug!r} is not {what} ({SLUG_RULE})", field)
    return slug


PROJECT_ID_RULE = "Sentry's numeric project id: 1-20 digits"


def check_project_id(value: object, field: str = "sentry_project_id") -> str:
    """``value`` as a Sentry project id (digits; an integer is accepted), else ``invalid_project_id``."""
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(text, str) or not (text.isascii() and text.isdigit() and 1 <= len(text) <= 20):
        raise invalid("invalid_project_id", f"{value!r} is not {PROJECT_ID_RULE}", field)
    return text


# --- services ---------------------------------------------------------------------------------


async def create_service(session: AsyncSession, org_id: int, name: str) -> Service:
    name = name.strip()
    if not 1 <= len(name) <= SERVICE_NAME_MAX:
        raise invalid("invalid_name", f"service name must be 1-{SERVICE_NAME_MAX} characters", "name")
    service = Service(org_id=org_id, name=name)
    try:
        async with session.begin_nested():
            session.add(service)
            await session.flush()
    except IntegrityError as exc:
        raise conflict("exists", f"service {name!r} already exists", "name") from exc
    return service


async def list_services(session: AsyncSession, org_id: int) -> list[Service]:
    return list(await session.scalars(select(Service).where(Service.org_id == org_id).order_by(Service.id)))


async def get_service(session: AsyncSession, org_id: int, service_id: int, *, field: str | None = None) -> Service:
    """The org's service; a missing or foreign id is ``not_found`` (or ``invalid`` on ``field`` when given)."""
    service = await session.scalar(select(Service).where(Service.org_id == org_id, Service.id == service_id))
    if service is None:
        if field:
            raise invalid("service_not_found", f"service {service_id} does not exist in this organization", field)
        raise not_found("not_found", f"service {service_id} not found")
    return service


async def find_service(session: AsyncSession, org_id: int, ref: str) -> Service:
    """A service of this org by id or exact name (the CLI's ``--service``)."""
    query = select(Service).where(Service.org_id == org_id)
    query = query.where(Service.id == int(ref)) if ref.isdigit() else query.where(Service.name == ref)
    service = await session.scalar(query)
    if service is None:
        raise invalid("service_not_found", f"service {ref!r} does not exist in this organization", "service_id")
    return service


async def delete_service(session: AsyncSession, org_id: int, service_id: int) -> None:
    service = await get_service(session, org_id, service_id)
    used_by = list(
        await session.scalars(
            select(SentryProjectMapping.sentry_project_slug)
            .where(SentryProjectMapping.service_id == service.id)
            .order_by(SentryProjectMapping.sentry_project_slug)
        )
    )
    if used_by:
        raise conflict(
            "service_in_use",
            f"service {service.name!r} is used by mappings of {', '.join(used_by)}: delete or re-point them first",
        )
    if await session.scalar(select(func.count()).where(Incident.service_id == service.id)):
        raise conflict("service_has_incidents", f"service {service.name!r} has incidents and is kept for them")
    await session.delete(service)
    await session.flush()


# --- mappings ---------------------------------------------------------------------------------


async def _mapping(session: AsyncSession, org_id: int, mapping_id: int) -> SentryProjectMapping:
    mapping = await session.scalar(
        select(SentryProjectMapping).where(SentryProjectMapping.org_id == org_id, SentryProjectMapping.id == mapping_id)
    )
    if mapping is None:
        raise not_found("not_found", f"mapping {mapping_id} not found")
    return mapping


async def _existing_for(session: AsyncSession, org_id: int, slug: str) -> int | None:
    existing: int | None = await session.scalar(
        select(SentryProjectMapping.id).where(
            SentryProjectMapping.org_id == org_id, SentryProjectMapping.sentry_project_slug == slug
        )
    )
    return existing


async def add_mapping(
    session: AsyncSession,
    org_id: int,
    slug: object,
    service_id: int,
    *,
    active: bool = True,
    sentry_project_id: object | None = None,
) -> MappingView:
    slug = check_slug(slug)
    project_id = None if sentry_project_id is None else check_project_id(sentry_project_id)
    service = await get_service(session, org_id, service_id, field="service_id")
    existing = await _existing_for(session, org_id, slug)
    if existing is None:
        mapping = SentryProjectMapping(
            org_id=org_id, sentry_project_slug=slug, service_id=service.id, active=active, sentry_project_id=project_id
        )
        try:
            async with session.begin_nested():
                session.add(mapping)
                await session.flush()
            return await get_mapping(session, org_id, mapping.id)
        except IntegrityError:
            # A concurrent add won the unique (org_id, sentry_project_slug) race.
            existing = await _existing_for(session, org_id, slug)
    raise conflict(
        "already_mapped",
        f"Sentry project {slug!r} is already mapped (mapping {existing}); each project maps to one service",
        "sentry_project_slug",
    )


async def edit_mapping(
    session: AsyncSession,
    org_id: int,
    mapping_id: int,
    *,
    service_id: int | None = None,
    active: bool | None = None,
    sentry_project_slug: object | None = None,
    sentry_project_id: object | None = None,
) -> MappingView:
    """Change the service, the active flag, the project's slug (a project renamed in Sentry: the
    ``renamed_to`` flag clears) or its Sentry project id. Existing incidents stay where they are."""
    mapping = await _mapping(session, org_id, mapping_id)
    if sentry_project_slug is not None:
        slug = check_slug(sentry_project_slug)
        if slug != mapping.sentry_project_slug:
            owner = await _existing_for(session, org_id, slug)
            if owner is not None:
                raise conflict(
                    "already_mapped",
                    f"Sentry project {slug!r} is already mapped (mapping {owner}); each project maps to one service",
                    "sentry_project_slug",
                )
            mapping.sentry_project_slug = slug
        mapping.renamed_to = None
    if sentry_project_id is not None:
        mapping.sentry_project_id = check_project_id(sentry_project_id)
    if service_id is not None:
        mapping.service_id = (await get_service(session, org_id, service_id, field="service_id")).id
    if active is not None:
        mapping.active = active
    mapping.updated_at = func.now()
    try:
        async with session.begin_nested():
            await session.flush()
    except IntegrityError as exc:  # a concurrent add took the new slug
        raise conflict("already_mapped", "that Sentry project is already mapped", "sentry_project_slug") from exc
    return await get_mapping(session, org_id, mapping_id)


async def delete_mapping(session: AsyncSession, org_id: int, mapping_id: int) -> None:
    result = await session.execute(
        delete(SentryProjectMapping)
        .where(SentryProjectMapping.org_id == org_id, SentryProjectMapping.id == mapping_id)
        .returning(SentryProjectMapping.id)
    )
    if result.scalar_one_or_none() is None:
        raise not_found("not_found", f"mapping {mapping_id} not found")


async def list_mappings(session: AsyncSession, org_id: int, *, mapping_id: int | None = None) -> list[MappingView]:
    last_event = (
        select(func.max(AuditRecord.received_at))
        .where(
            and_(
                AuditRecord.org_id == SentryProjectMapping.org_id,
                or_(
                    AuditRecord.project_slug == SentryProjectMapping.sentry_project_slug,
                    AuditRecord.project_slug == SentryProjectMapping.renamed_to,
                ),
            )
        )
        .correlate(SentryProjectMapping)
        .scalar_subquery()
    )
    query = (
        select(SentryProjectMapping, Service.name, last_event)
        .join(Service, Service.id == SentryProjectMapping.service_id)
        .where(SentryProjectMapping.org_id == org_id)
        .order_by(SentryProjectMapping.sentry_project_slug)
    )
    if mapping_id is not None:
        query = query.where(SentryProjectMapping.id == mapping_id)
    rows = await session.execute(query)
    return [
        MappingView(
            id=m.id,
            sentry_project_slug=m.sentry_project_slug,
            service_id=m.service_id,
            service_name=name,
            active=m.active,
            sentry_project_id=m.sentry_project_id,
            renamed_to=m.renamed_to,
            created_at=m.created_at,
            updated_at=m.updated_at,
            last_event_at=last,
        )
        for m, name, last in rows
    ]


async def get_mapping(session: AsyncSession, org_id: int, mapping_id: int) -> MappingView:
    found = await list_mappings(session, org_id, mapping_id=mapping_id)
    if not found:
        raise not_found("not_found", f"mapping {mapping_id} not found")
    return found[0]


async def find_mapping(session: AsyncSession, org_id: int, ref: str) -> MappingView:
    """A mapping by id or by Sentry project slug (the CLI's argument)."""
    if ref.isdigit():
        return await get_mapping(session, org_id, int(ref))
    mapping_id = await _existing_for(session, org_id, ref)
    if mapping_id is None:
        raise not_found("not_found", f"no mapping for Sentry project {ref!r}")
    return await get_mapping(session, org_id, mapping_id)


async def unmapped_projects(session: AsyncSession, org_id: int, *, days: int = 7) -> list[UnmappedProject]:
    """Projects that sent events in the last ``days`` days and have no mapping now (the admin's inbox)."""
    since = func.now() - timedelta(days=days)
    mapped = select(SentryProjectMapping.sentry_project_slug).where(SentryProjectMapping.org_id == org_id)
    rows = await session.execute(
        select(AuditRecord.project_slug, func.count(), func.max(AuditRecord.received_at))
        .where(
            AuditRecord.org_id == org_id,
            AuditRecord.reason == "unmapped",
            AuditRecord.received_at >= since,
            AuditRecord.project_slug.is_not(None),
            AuditRecord.project_slug.not_in(mapped),
        )
        .group_by(AuditRecord.project_slug)
        .order_by(func.max(AuditRecord.received_at).desc())
    )
    return [UnmappedProject(slug=str(slug), events=count, last_seen_at=last) for slug, count, last in rows]
