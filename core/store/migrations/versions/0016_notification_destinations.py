"""notification destinations created through the API

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-07 14:10:00

Webhook and email destinations an administrator creates with `POST /api/v1/notifications`
(the TOML's ``[[notifications]]`` are not stored): their settings and filters as JSON,
their secret (webhook HMAC key, SMTP password) sealed under the KEK, who made and last
changed them, and a version that each change increments (how every worker sees a change
without reloading them all).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "notification_destinations",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("type", sa.String(length=16), nullable=False),
        sa.Column("settings", sa.Text(), nullable=False),
        sa.Column("filters", sa.Text(), nullable=False),
        sa.Column("sealed_secret", sa.LargeBinary(), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=256), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(length=256), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_notification_destinations")),
    )


def downgrade() -> None:
    op.drop_table("notification_destinations")
