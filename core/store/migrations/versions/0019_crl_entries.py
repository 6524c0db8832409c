"""CRL entries stored with the revocation

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-07 17:40:00

A revoked certificate's entry in revokedCertificates (RFC 5280 5.1: serial, revocationDate,
reasonCode) never changes, so it is encoded once, when the revocation is stored, in the new
``certificates.crl_entry`` column; a CRL is these entries joined, read from a covering
index of revoked rows (a million-entry CRL had spent seconds encoding them at every
build). Existing revoked certificates get their entries here, in batches, encoded by the
same function the revocation uses, so the next CRL lists exactly what the last one did.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

# The encoding, not a copy of it: a copy could drift from what revocations store.
from pkigate.core.crl import entry

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None

BACKFILL_BATCH = 10_000  # rows read, encoded and written at a time

_certificates = sa.table(
    "certificates",
    sa.column("id", sa.Integer()),
    sa.column("serial", sa.String()),
    sa.column("status", sa.String()),
    sa.column("revoked_at", sa.DateTime(timezone=True)),
    sa.column("revocation_reason", sa.String()),
    sa.column("crl_entry", sa.LargeBinary()),
)


def upgrade() -> None:
    op.add_column("certificates", sa.Column("crl_entry", sa.LargeBinary(), nullable=True))
    conn = op.get_bind()
    c = _certificates.c
    read = (
        sa.select(c.id, c.serial, c.revoked_at, c.revocation_reason)
        .where(c.status == "REVOKED", c.id > sa.bindparam("after"))
        .order_by(c.id)
        .limit(BACKFILL_BATCH)
    )
    write = (
        sa.update(_certificates)
        .where(c.id == sa.bindparam("row_id"))
        .values(crl_entry=sa.bindparam("entry"))
    )
    after = 0
    while rows := conn.execute(read, {"after": after}).all():
        conn.execute(
            write,
            [
                {"row_id": row_id, "entry": entry(serial, revoked_at, reason)}
                for row_id, serial, revoked_at, reason in rows
            ],
        )
        after = rows[-1][0]
    # Built after the backfill: one sort instead of a million index updates.
    op.create_index(
        "ix_certificates_crl_entries",
        "certificates",
        ["ca_id", "crl_partition", "not_after", "crl_entry"],
        unique=False,
        sqlite_where=sa.text("crl_entry IS NOT NULL"),
        postgresql_where=sa.text("crl_entry IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_certificates_crl_entries", table_name="certificates")
    # ALTER TABLE ... DROP COLUMN in place (SQLite 3.35+), as 0018 does.
    op.drop_column("certificates", "crl_entry")
