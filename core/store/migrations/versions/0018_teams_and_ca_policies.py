"""teams and per-CA policies

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-07 14:30:00

Access control (core/access.py): teams own CAs and hold tokens; a CA's policy is a
versioned document, every version kept. The "default" team is created here and every
existing token and CA joins it, so a data directory from before keeps working as it did.
Certificates name the team that asked for them (NULL: the CA owner's, which is what every
certificate issued before this revision is), so that a team a CA is shared with sees and
revokes only its own.
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None


def upgrade() -> None:
    teams = op.create_table(
        "teams",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=256), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_teams")),
    )
    op.bulk_insert(
        teams,
        [{"name": "default", "created_at": datetime.now(UTC), "created_by": "migration 0018"}],
    )
    op.create_table(
        "ca_policies",
        sa.Column("ca_id", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("document", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=256), nullable=False),
        sa.PrimaryKeyConstraint("ca_id", "version", name=op.f("pk_ca_policies")),
    )
    # Plain ADD COLUMNs with a default: existing rows take "default" without a table copy.
    with op.batch_alter_table("api_tokens", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("team", sa.String(length=64), server_default="default", nullable=False)
        )
    with op.batch_alter_table("authorities", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("team", sa.String(length=64), server_default="default", nullable=False)
        )
        batch_op.add_column(
            sa.Column("policy_version", sa.Integer(), server_default="0", nullable=False)
        )
    with op.batch_alter_table("certificates", schema=None) as batch_op:
        batch_op.add_column(sa.Column("team", sa.String(length=64), nullable=True))


def downgrade() -> None:
    # ALTER TABLE ... DROP COLUMN in place (SQLite 3.35+): a batch copy of `authorities`
    # would drop a table that certificates reference.
    op.drop_column("certificates", "team")
    op.drop_column("authorities", "policy_version")
    op.drop_column("authorities", "team")
    op.drop_column("api_tokens", "team")
    op.drop_table("ca_policies")
    op.drop_table("teams")
