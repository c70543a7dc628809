"""SQLAlchemy 2 models: the one definition of BlameTrail's tables (migrations follow them)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import (
    ARRAY,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class IncidentStatus(StrEnum):
    """An incident's ``status``: the one list of its values (API, CLI, web page and writer use it)."""

    OPEN = "open"
    ARCHIVED = "archived"  # Sentry's "Archive" (ignored): muted until the issue is unresolved
    RESOLVED = "resolved"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


def _created() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)


class Organization(Base):
    __tablename__ = "organizations"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    slug: Mapped[str] = mapped_column(String(100), unique=True, nullable=False)
    name: Mapped[str] = mapped_column(String(200), nullable=False)
    created_at: Mapped[datetime] = _created()


class SentryIntegration(Base):
    """Per-org Sentry integration: the client secret, and the previous one during a rotation.

    Both secrets are stored encrypted (``fernet:…``, ``shared/secrets.py``): longer than the secret."""

    __tablename__ = "sentry_integrations"

    org_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("organizations.id", ondelete="CASCADE"), primary_key=True
    )
    client_secret: Mapped[str] = mapped_column(Text, nullable=False)
    previous_client_secret: Mapped[str | None] = mapped_column(Text)
    legacy_plugin_token: Mapped[str | None] = mapped_column(String(200))
    rotated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _created()


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    org_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("organizations.id", ondelete="CASCADE"), nullable=False, index=True
    )
    token_hash: Mapped[bytes] = mapped_column(LargeBinary(32), unique=True, nullable=False)
    name: Mapped[str] = mapped_column(String(200), nullable=False, server_default="default")
    created_at: Mapped[datetime] = _created()
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Service(Base):
    __tablename__ = "services"
    __table_args__ = (
        UniqueConstraint("org_id", "name"),
        # Target of the composite foreign key that keeps a mapping's service in the mapping's org.
        UniqueConstraint("org_id", "id", name="uq_services_org_id_id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    org_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("organizations.id", ondelete="CASCADE"), nullable=False)
    name: Mapped[str] = mapped_column(String(200), nullable=False)
    created_at: Mapped[datetime] = _created()


class SentryProjectMapping(Base):
    __tablename__ = "sentry_project_mappings"
    __table_args__ = (
        UniqueConstraint("org_id", "sentry_project_slug"),
        ForeignKeyConstraint(
            ["org_id", "service_id"],
            ["services.org_id", "services.id"],
            name="fk_sentry_project_mappings_service_same_org",
            ondelete="RESTRICT",
        ),
        Index("ix_sentry_project_mappings_service_id", "service_id"),
        Index("ix_sentry_project_mappings_org_id_sentry_project_id", "org_id", "sentry_project_id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    org_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("organizations.id", ondelete="CASCADE"), nullable=False)
    sentry_project_slug: Mapped[str] = mapped_column(String(100), nullable=False)
    service_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    active: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default="true")
    # Sentry's numeric project id: stable when the project is renamed (given, or learned by the writer).
    sentry_project_id: Mapped[str | None] = mapped_column(String(64))
    # The slug Sentry now sends for this project, when it differs from ``sentry_project_slug``.
    renamed_to: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now(), nullable=False
    )


class Incident(Base):
    """One incident per service and Sentry issue (or metric alert): resolved ones reopen in place."""

    __tablename__ = "incidents"
    __table_args__ = (
        UniqueConstraint("service_id", "incident_key"),
        Index("ix_incidents_org_id_status", "org_id", "status"),
        # The tenant seal: an incident's service belongs to the incident's organization.
        ForeignKeyConstraint(
            ["org_id", "service_id"],
            ["services.org_id", "services.id"],
            name="fk_incidents_service_same_org",
            ondelete="RESTRICT",
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    org_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("organizations.id", ondelete="CASCADE"), nullable=False)
    service_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("services.id", ondelete="RESTRICT"), nullable=False)
    incident_key: Mapped[str] = mapped_column(String(200), nullable=False)
    sentry_project_slug: Mapped[str | None] = mapped_column(String(100))
    sentry_issue_id: Mapped[str | None] = mapped_column(String(64))
    title: Mapped[str] = mapped_column(Text, nullable=False)
    level: Mapped[str | None] = mapped_column(String(32))
    culprit: Mapped[str | None] = mapped_column(Text)
    web_url: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), nullable=False, server_default=IncidentStatus.OPEN.value)
    event_count: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    first_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    last_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    resolved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now(), nullable=False
    )


class AuditRecord(Base):
    """Exactly one per delivery and project, for routed and ignored events alike."""

    __tablename__ = "audit_records"
    __table_args__ = (
        UniqueConstraint("delivery_id", "project_slug", postgresql_nulls_not_distinct=True),
        Index("ix_audit_records_org_id_id", "org_id", "id"),
        Index("ix_audit_records_org_project_received", "org_id", "project_slug", "received_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    delivery_id: Mapped[str] = mapped_column(String(64), nullable=False)
    project_slug: Mapped[str | None] = mapped_column(String(100))
    org_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("organizations.id", ondelete="CASCADE"))
    org_slug: Mapped[str] = mapped_column(String(100), nullable=False)
    resource: Mapped[str] = mapped_column(String(64), nullable=False)
    action: Mapped[str] = mapped_column(String(64), nullable=False)
    outcome: Mapped[str] = mapped_column(String(16), nullable=False)
    reason: Mapped[str | None] = mapped_column(String(32))
    service_id: Mapped[int | None] = mapped_column(BigInteger)
    mapping_id: Mapped[int | None] = mapped_column(BigInteger)
    incident_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("incidents.id", ondelete="SET NULL"))
    sentry_issue_id: Mapped[str | None] = mapped_column(String(64))
    title: Mapped[str | None] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    processed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)
    raw_topic: Mapped[str] = mapped_column(String(249), nullable=False)
    raw_partition: Mapped[int] = mapped_column(Integer, nullable=False)
    raw_offset: Mapped[int] = mapped_column(BigInteger, nullable=False)
    # The mapping's slug when the delivery reached it under another slug (a project renamed in Sentry).
    renamed_from: Mapped[str | None] = mapped_column(String(100))
    # The replay that created or changed this record; what an upgraded record was before (ignored, why).
    replay_id: Mapped[str | None] = mapped_column(String(64))
    previous_outcome: Mapped[str | None] = mapped_column(String(16))
    previous_reason: Mapped[str | None] = mapped_column(String(32))
    # What the router's boundary check changed in the delivery's values (``time_out_of_range``, …).
    flags: Mapped[list[str] | None] = mapped_column(ARRAY(String(32)))
    # Outcome ``failed``: the database's reason, and where the record's dead letter is (dlq topic).
    error: Mapped[str | None] = mapped_column(Text)
    dlq_partition: Mapped[int | None] = mapped_column(Integer)
    dlq_offset: Mapped[int | None] = mapped_column(BigInteger)


class SentryIssueProject(Base):
    """The issue → project index: which project each Sentry issue belongs to, as deliveries paired them.

    Deliveries that name only the issue (seer) resolve their project here.
    """

    __tablename__ = "sentry_issue_projects"

    org_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("organizations.id", ondelete="CASCADE"), primary_key=True
    )
    sentry_issue_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    sentry_project_id: Mapped[str | None] = mapped_column(String(64))
    project_slug: Mapped[str] = mapped_column(String(100), nullable=False)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)


class IncidentEvent(Base):
    """One entry of an incident's timeline: a delivery that touched the incident, once.

    Every event the writer applies to an incident leaves one (occurrences, resolves, reopens, and
    comments, assignments, seer and other events attached to it). Unique per (incident, delivery):
    the writer applies a delivery to an incident only when this row is new, so ``event_count``
    counts distinct deliveries even when one multi-project metric alert names two projects of one
    service. ``change`` is what the event did: opened, updated, resolved, reopened or attached.
    """

    __tablename__ = "incident_events"
    __table_args__ = (UniqueConstraint("incident_id", "delivery_id"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    incident_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("incidents.id", ondelete="CASCADE"), nullable=False)
    delivery_id: Mapped[str] = mapped_column(String(64), nullable=False)
    project_slug: Mapped[str | None] = mapped_column(String(100))
    resource: Mapped[str] = mapped_column(String(64), nullable=False)
    action: Mapped[str] = mapped_column(String(64), nullable=False)
    change: Mapped[str] = mapped_column(String(16), nullable=False)
    title: Mapped[str | None] = mapped_column(Text)
    level: Mapped[str | None] = mapped_column(String(32))
    event_id: Mapped[str | None] = mapped_column(String(64))
    occurred_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    created_at: Mapped[datetime] = _created()
