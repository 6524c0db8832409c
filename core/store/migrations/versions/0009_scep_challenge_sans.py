"""scep challenges: the alternative names a bound challenge enrolls

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-23 08:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("scep_challenges", schema=None) as batch_op:
        batch_op.add_column(sa.Column("sans", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("scep_challenges", schema=None) as batch_op:
        batch_op.drop_column("sans")
