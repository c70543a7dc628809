"""incident timeline: incident_events

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 13:00:00

One row per (incident, delivery) that touched the incident. Existing incidents get their timeline
from the audit records already linked to them, so the writer's per-incident idempotency (a delivery
changes an incident only when its ``incident_events`` row is new) also holds for deliveries
written before this migration.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "incident_events",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("incident_id", sa.BigInteger(), nullable=False),
        sa.Column("delivery_id", sa.String(length=64), nullable=False),
        sa.Column("project_slug", sa.String(length=100), nullable=True),
        sa.Column("resource", sa.String(length=64), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("change", sa.String(length=16), nullable=False),
        sa.Column("title", sa.Text(), nullable=True),
        sa.Column("level", sa.String(length=32), nullable=True),
        sa.Column("event_id", sa.String(length=64), nullable=True),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["incident_id"],
            ["incidents.id"],
            name=op.f("fk_incident_events_incident_id_incidents"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_incident_events")),
        sa.UniqueConstraint("incident_id", "delivery_id", name=op.f("uq_incident_events_incident_id")),
    )
    # Timeline of incidents written before this revision, from their linked audit records. What each
    # event did then is not recorded; the closest reading of its resource and action is used.
    op.execute(
        """
        INSERT INTO incident_events
            (incident_id, delivery_id, project_slug, resource, action, change, title, received_at, created_at)
        SELECT DISTINCT ON (a.incident_id, a.delivery_id)
            a.incident_id, a.delivery_id, a.project_slug, a.resource, a.action,
            CASE
                WHEN (a.resource, a.action) IN (('issue', 'created'), ('error', 'created'),
                    ('event_alert', 'triggered'), ('metric_alert', 'critical'),
                    ('metric_alert', 'warning'), ('legacy_webhook', 'triggered')) THEN 'updated'
                WHEN (a.resource, a.action) IN (('issue', 'resolved'), ('metric_alert', 'resolved')) THEN 'resolved'
                WHEN (a.resource, a.action) = ('issue', 'unresolved') THEN 'reopened'
                ELSE 'attached'
            END,
            a.title, a.received_at, a.processed_at
        FROM audit_records a
        WHERE a.incident_id IS NOT NULL
        ORDER BY a.incident_id, a.delivery_id, a.id
        ON CONFLICT DO NOTHING
        """
    )


def downgrade() -> None:
    op.drop_table("incident_events")
