"""Sentry project identity: project ids on mappings, renames, the issue → project index

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 04:00:00

- ``sentry_project_mappings.sentry_project_id``: Sentry's numeric project id (stable across renames),
  given by the admin or learned from the first delivery that pairs it with the mapping's slug;
  ``renamed_to``: the slug Sentry now uses for that project when it differs from the mapping's.
- ``sentry_issue_projects``: which project each Sentry issue belongs to, learned from every
  delivery that pairs them, so deliveries that name only the issue (seer) find their project.
- ``audit_records.renamed_from``: the mapping's slug when a delivery reached it under a new slug.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("sentry_project_mappings", sa.Column("sentry_project_id", sa.String(length=64), nullable=True))
    op.add_column("sentry_project_mappings", sa.Column("renamed_to", sa.String(length=100), nullable=True))
    op.create_index(
        "ix_sentry_project_mappings_org_id_sentry_project_id",
        "sentry_project_mappings",
        ["org_id", "sentry_project_id"],
    )
    op.add_column("audit_records", sa.Column("renamed_from", sa.String(length=100), nullable=True))
    op.create_table(
        "sentry_issue_projects",
        sa.Column("org_id", sa.BigInteger(), nullable=False),
        sa.Column("sentry_issue_id", sa.String(length=64), nullable=False),
        sa.Column("sentry_project_id", sa.String(length=64), nullable=True),
        sa.Column("project_slug", sa.String(length=100), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["organizations.id"],
            name=op.f("fk_sentry_issue_projects_org_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("org_id", "sentry_issue_id", name=op.f("pk_sentry_issue_projects")),
    )
    # What earlier deliveries already paired (their audit records), so seer finds old issues too.
    op.execute(
        """
        INSERT INTO sentry_issue_projects (org_id, sentry_issue_id, project_slug)
        SELECT DISTINCT ON (org_id, sentry_issue_id) org_id, sentry_issue_id, project_slug
        FROM audit_records
        WHERE org_id IS NOT NULL AND sentry_issue_id IS NOT NULL AND project_slug IS NOT NULL
        ORDER BY org_id, sentry_issue_id, id DESC
        """
    )


def downgrade() -> None:
    op.drop_table("sentry_issue_projects")
    op.drop_column("audit_records", "renamed_from")
    op.drop_index("ix_sentry_project_mappings_org_id_sentry_project_id", table_name="sentry_project_mappings")
    op.drop_column("sentry_project_mappings", "renamed_to")
    op.drop_column("sentry_project_mappings", "sentry_project_id")
