"""certificate counters: by CA and status, and unrevoked ones by UTC expiry day

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07 11:30:00

/metrics reports certificates by CA and status and those expiring within 1, 7, 30 and 90
days. Counting the certificates table at every scrape costs a scan of a million rows; these
two tables are kept by triggers on the certificates table (so every writer keeps them:
issuance, revocation, audit recovery, bulk loads), and a scrape reads a few rows per CA.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

# SQLite: what a row adds to the counters (NEW) and takes from them (OLD).
_SQLITE_COUNT_NEW = """
  INSERT INTO certificate_counts (ca_id, status, count) VALUES (NEW.ca_id, NEW.status, 1)
    ON CONFLICT (ca_id, status) DO UPDATE SET count = count + 1;
  INSERT INTO certificate_expiry_days (ca_id, day, count)
    SELECT NEW.ca_id, substr(NEW.not_after, 1, 10), 1 WHERE NEW.status = 'ISSUED'
    ON CONFLICT (ca_id, day) DO UPDATE SET count = count + 1;
"""
_SQLITE_UNCOUNT_OLD = """
  UPDATE certificate_counts SET count = count - 1
    WHERE ca_id = OLD.ca_id AND status = OLD.status;
  UPDATE certificate_expiry_days SET count = count - 1
    WHERE OLD.status = 'ISSUED' AND ca_id = OLD.ca_id AND day = substr(OLD.not_after, 1, 10);
"""
_SQLITE_TRIGGERS = [
    f"CREATE TRIGGER certificates_counted_insert AFTER INSERT ON certificates "
    f"BEGIN {_SQLITE_COUNT_NEW} END",
    f"""CREATE TRIGGER certificates_counted_update AFTER UPDATE OF ca_id, status, not_after
    ON certificates
    WHEN OLD.ca_id IS NOT NEW.ca_id OR OLD.status IS NOT NEW.status
      OR OLD.not_after IS NOT NEW.not_after
    BEGIN {_SQLITE_UNCOUNT_OLD} {_SQLITE_COUNT_NEW} END""",
    f"CREATE TRIGGER certificates_counted_delete AFTER DELETE ON certificates "
    f"BEGIN {_SQLITE_UNCOUNT_OLD} END",
]

_POSTGRES_TRIGGER = [
    """
    CREATE FUNCTION pkigate_count_certificates() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      IF TG_OP = 'UPDATE' AND (OLD.ca_id, OLD.status, OLD.not_after)
          IS NOT DISTINCT FROM (NEW.ca_id, NEW.status, NEW.not_after) THEN
        RETURN NULL;
      END IF;
      -- Every writer of certificates locks the audit head before the commit anyway; taking
      -- it before the counter rows makes that the one lock order: two transactions
      -- counting certificates of several CAs or days in different orders would deadlock.
      PERFORM 1 FROM audit_head WHERE id = 1 FOR UPDATE;
      IF TG_OP IN ('UPDATE', 'DELETE') THEN
        UPDATE certificate_counts SET count = count - 1
          WHERE ca_id = OLD.ca_id AND status = OLD.status;
        IF OLD.status = 'ISSUED' THEN
          UPDATE certificate_expiry_days SET count = count - 1
            WHERE ca_id = OLD.ca_id
              AND day = to_char(OLD.not_after AT TIME ZONE 'UTC', 'YYYY-MM-DD');
        END IF;
      END IF;
      IF TG_OP IN ('INSERT', 'UPDATE') THEN
        INSERT INTO certificate_counts (ca_id, status, count) VALUES (NEW.ca_id, NEW.status, 1)
          ON CONFLICT (ca_id, status) DO UPDATE SET count = certificate_counts.count + 1;
        IF NEW.status = 'ISSUED' THEN
          INSERT INTO certificate_expiry_days (ca_id, day, count)
            VALUES (NEW.ca_id, to_char(NEW.not_after AT TIME ZONE 'UTC', 'YYYY-MM-DD'), 1)
            ON CONFLICT (ca_id, day) DO UPDATE SET count = certificate_expiry_days.count + 1;
        END IF;
      END IF;
      RETURN NULL;
    END
    $$
    """,
    """
    CREATE TRIGGER certificates_counted
      AFTER INSERT OR DELETE OR UPDATE OF ca_id, status, not_after ON certificates
      FOR EACH ROW EXECUTE FUNCTION pkigate_count_certificates()
    """,
]


def upgrade() -> None:
    op.create_table(
        "certificate_counts",
        sa.Column("ca_id", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("ca_id", "status"),
    )
    op.create_table(
        "certificate_expiry_days",
        sa.Column("ca_id", sa.String(length=64), nullable=False),
        sa.Column("day", sa.String(length=10), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("ca_id", "day"),
    )
    postgres = op.get_bind().dialect.name == "postgresql"
    day = (
        "to_char(not_after AT TIME ZONE 'UTC', 'YYYY-MM-DD')"
        if postgres
        else "substr(not_after, 1, 10)"
    )
    op.execute(
        "INSERT INTO certificate_counts (ca_id, status, count) "
        "SELECT ca_id, status, count(*) FROM certificates GROUP BY ca_id, status"
    )
    op.execute(
        f"INSERT INTO certificate_expiry_days (ca_id, day, count) "
        f"SELECT ca_id, {day}, count(*) FROM certificates WHERE status = 'ISSUED' "
        f"GROUP BY ca_id, {day}"
    )
    for statement in _POSTGRES_TRIGGER if postgres else _SQLITE_TRIGGERS:
        op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER certificates_counted ON certificates")
        op.execute("DROP FUNCTION pkigate_count_certificates()")
    else:
        for name in ("insert", "update", "delete"):
            op.execute(f"DROP TRIGGER certificates_counted_{name}")
    op.drop_table("certificate_expiry_days")
    op.drop_table("certificate_counts")
