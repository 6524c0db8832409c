"""acme nonces: a durable generation counter, and the nonce book in UNLOGGED tables

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07 05:00:00

Spent nonces no longer need a durable write: they live in an unlogged table beside the
live nonce generation (see pkigate.acme.nonces for why losing both together is safe).
The old, logged spent-nonce table is dropped: its rows name nonces of the old format,
which are refused anyway.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def _unlogged() -> list[str]:
    return ["UNLOGGED"] if op.get_bind().dialect.name == "postgresql" else []


def upgrade() -> None:
    with op.batch_alter_table("acme_spent_nonces", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_acme_spent_nonces_expires_at"))
    op.drop_table("acme_spent_nonces")
    op.create_table(
        "acme_nonce_generations",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_acme_nonce_generations")),
    )
    op.create_table(
        "acme_nonce_epoch",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_acme_nonce_epoch")),
        prefixes=_unlogged(),
    )
    op.create_table(
        "acme_spent_nonces",
        sa.Column("nonce", sa.String(length=64), nullable=False),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("nonce", name=op.f("pk_acme_spent_nonces")),
        prefixes=_unlogged(),
    )
    with op.batch_alter_table("acme_spent_nonces", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_acme_spent_nonces_expires_at"), ["expires_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("acme_spent_nonces", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_acme_spent_nonces_expires_at"))
    op.drop_table("acme_spent_nonces")
    op.drop_table("acme_nonce_epoch")
    op.drop_table("acme_nonce_generations")
    op.create_table(
        "acme_spent_nonces",
        sa.Column("nonce", sa.String(length=64), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("nonce", name=op.f("pk_acme_spent_nonces")),
    )
    with op.batch_alter_table("acme_spent_nonces", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_acme_spent_nonces_expires_at"), ["expires_at"], unique=False
        )
