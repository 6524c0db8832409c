"""adcs requests: whether the certificate's names came from the directory (login by it)

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-23 07:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Existing rows stay NULL: whether their certificates log in is decided from their
    # template's flags as the directory holds them (machines renew without a password).
    with op.batch_alter_table("adcs_requests", schema=None) as batch_op:
        batch_op.add_column(sa.Column("names_from_directory", sa.Boolean(), nullable=True))
        batch_op.create_index("ix_adcs_requests_certificate", ["ca_id", "serial"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("adcs_requests", schema=None) as batch_op:
        batch_op.drop_index("ix_adcs_requests_certificate")
        batch_op.drop_column("names_from_directory")
