"""Services and Sentry project mappings: the rules of the product page, shared by CLI and admin API."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from shared.db.models import SentryProjectMapping, Service
from shared.orgs import OrgError
from shared.sentry import is_valid_slug


@dataclass(frozen=True)
class MappingView:
    id: int
    sentry_project_slug: str
    service_id: int
    service_name: str
    active: bool
    created_at: datetime
    updated_at: datetime


async def create_service(session: AsyncSession, org_id: int, name: str) -> Service:
    name = name.strip()
    if not name or len(name) > 200:
        raise OrgError("invalid_name", "service name must be 1-200 characters")
    service = Service(org_id=org_id, name=name)
    session.add(service)
    try:
        await session.flush()
    except IntegrityError as exc:
        raise OrgError("exists", f"service {name!r} already exists") from exc
    return service


async def list_services(session: AsyncSession, org_id: int) -> list[Service]:
    return list(await session.scalars(select(Service).where(Service.org_id == org_id).order_by(Service.id)))


async def find_service(session: AsyncSession, org_id: int, ref: str | int) -> Service:
    """A service of this org by id or by exact name."""
    query = select(Service).where(Service.org_id == org_id)
    if isinstance(ref, int) or ref.isdigit():
        query = query.where(Service.id == int(ref))
    else:
        query = query.where(Service.name == ref)
    service = await session.scalar(query)
    if service is None:
        raise OrgError("service_not_found", f"service {ref!r} does not exist in this organization")
    return service


async def add_mapping(
    session: AsyncSession, org_id: int, slug: str, service_id: int, *, active: bool = True
) -> SentryProjectMapping:
    if not is_valid_slug(slug):
        raise OrgError(
            "invalid_slug",
            f"sentry_project_slug {slug!r} is not a Sentry project slug (1-100 of a-z 0-9 _ -, not all digits)",
        )
    await find_service(session, org_id, service_id)
    existing = await session.scalar(
        select(SentryProjectMapping).where(
            SentryProjectMapping.org_id == org_id, SentryProjectMapping.sentry_project_slug == slug
        )
    )
    if existing is not None:
        raise OrgError("conflict", f"project {slug!r} is already mapped (mapping {existing.id})")
    mapping = SentryProjectMapping(org_id=org_id, sentry_project_slug=slug, service_id=service_id, active=active)
    session.add(mapping)
    try:
        await session.flush()
    except IntegrityError as exc:
        raise OrgError("conflict", f"project {slug!r} is already mapped") from exc
    return mapping


async def list_mappings(session: AsyncSession, org_id: int) -> list[MappingView]:
    rows = await session.execute(
        select(SentryProjectMapping, Service.name)
        .join(Service, Service.id == SentryProjectMapping.service_id)
        .where(SentryProjectMapping.org_id == org_id)
        .order_by(SentryProjectMapping.sentry_project_slug)
    )
    return [
        MappingView(
            id=m.id,
            sentry_project_slug=m.sentry_project_slug,
            service_id=m.service_id,
            service_name=name,
            active=m.active,
            created_at=m.created_at,
            updated_at=m.updated_at,
        )
        for m, name in rows
    ]
