"""token roles and hygiene

Revision ID: 0017
Revises: 0015
Create Date: 2026-12-07 14:30:00

API tokens hold several fine-grained roles (gateways/roles.py) instead of one, and gain an
expiry, a last-used time, a list of client networks, and a rotation's overlap (the
replaced secret's digest and until when it still works).

Each existing token keeps exactly its powers: ``admin`` and ``auditor`` stay as they are;
``issuer`` could also approve held requests, which is now the ``approver`` role, so an old
issuer token holds ``issuer approver``. No existing token expires or is bound to addresses.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("api_tokens", schema=None) as batch_op:
        batch_op.add_column(sa.Column("roles", sa.String(length=256), nullable=True))
        batch_op.add_column(sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(
            sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(sa.Column("allow_from", sa.Text(), nullable=True))
        batch_op.add_column(
            sa.Column("previous_secret_sha256", sa.String(length=64), nullable=True)
        )
        batch_op.add_column(
            sa.Column("previous_secret_until", sa.DateTime(timezone=True), nullable=True)
        )
    op.execute(
        "UPDATE api_tokens SET roles = CASE role WHEN 'issuer' THEN 'issuer approver' "
        "ELSE role END"
    )
    with op.batch_alter_table("api_tokens", schema=None) as batch_op:
        batch_op.alter_column("roles", existing_type=sa.String(length=256), nullable=False)
        batch_op.drop_column("role")


def downgrade() -> None:
    # One role per token again: the most powerful it holds of admin, issuer, auditor, and
    # auditor (read only) for a token that holds none of them.
    with op.batch_alter_table("api_tokens", schema=None) as batch_op:
        batch_op.add_column(sa.Column("role", sa.String(length=16), nullable=True))
    op.execute(
        "UPDATE api_tokens SET role = CASE "
        "WHEN ' ' || roles || ' ' LIKE '% admin %' THEN 'admin' "
        "WHEN ' ' || roles || ' ' LIKE '% issuer %' THEN 'issuer' "
        "ELSE 'auditor' END"
    )
    with op.batch_alter_table("api_tokens", schema=None) as batch_op:
        batch_op.alter_column("role", existing_type=sa.String(length=16), nullable=False)
        batch_op.drop_column("previous_secret_until")
        batch_op.drop_column("previous_secret_sha256")
        batch_op.drop_column("allow_from")
        batch_op.drop_column("last_used_at")
        batch_op.drop_column("expires_at")
        batch_op.drop_column("roles")
