"""tenant seal and no silent loss: incidents' service in their org; flags and failures on audit records

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 05:30:00

- ``incidents``: composite foreign key ``(org_id, service_id) → services(org_id, id)``, as mappings
  already have: an incident can only be on a service of its own organization.
- ``audit_records.flags``: what the router's boundary check changed (``time_out_of_range``, …).
- ``audit_records.error``, ``dlq_partition``, ``dlq_offset``: a record the database rejected is
  audited as ``failed`` with the database's reason and where its dead letter is.
- organizations and their Sentry integration notify the mappings channel, so routers know a new org
  at once (not at the next timer reload).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_foreign_key(
        "fk_incidents_service_same_org",
        "incidents",
        "services",
        ["org_id", "service_id"],
        ["org_id", "id"],
        ondelete="RESTRICT",
    )
    op.add_column("audit_records", sa.Column("flags", sa.ARRAY(sa.String(length=32)), nullable=True))
    op.add_column("audit_records", sa.Column("error", sa.Text(), nullable=True))
    op.add_column("audit_records", sa.Column("dlq_partition", sa.Integer(), nullable=True))
    op.add_column("audit_records", sa.Column("dlq_offset", sa.BigInteger(), nullable=True))
    op.execute(
        """
        CREATE FUNCTION notify_organization_change() RETURNS trigger AS $$
        BEGIN
            PERFORM pg_notify(
                'sentry_project_mappings',
                json_build_object('op', TG_OP, 'table', TG_TABLE_NAME)::text
            );
            RETURN NULL;
        END;
        $$ LANGUAGE plpgsql
        """
    )
    for table in ("organizations", "sentry_integrations"):
        op.execute(
            f"""
            CREATE TRIGGER {table}_notify
            AFTER INSERT OR UPDATE OR DELETE ON {table}
            FOR EACH STATEMENT EXECUTE FUNCTION notify_organization_change()
            """
        )


def downgrade() -> None:
    for table in ("organizations", "sentry_integrations"):
        op.execute(f"DROP TRIGGER IF EXISTS {table}_notify ON {table}")
    op.execute("DROP FUNCTION IF EXISTS notify_organization_change()")
    op.drop_column("audit_records", "dlq_offset")
    op.drop_column("audit_records", "dlq_partition")
    op.drop_column("audit_records", "error")
    op.drop_column("audit_records", "flags")
    op.drop_constraint("fk_incidents_service_same_org", "incidents", type_="foreignkey")
