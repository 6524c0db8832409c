"""sealed secrets: generated secrets every host shares (a generated static SCEP challenge)

Revision ID: 0011
Revises: 0009
Create Date: 2026-12-07 04:50:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sealed_secrets",
        sa.Column("name", sa.String(length=256), nullable=False),
        sa.Column("sealed", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_sealed_secrets")),
    )


def downgrade() -> None:
    op.drop_table("sealed_secrets")
