"""What /metrics reads from the store, each a few rows whatever the store's size.

Certificates are counted from ``certificate_counts`` and ``certificate_expiry_days``, which
triggers on the certificates table keep (migration 0013), never by counting the table;
CRLs and jobs are read through their indexes (one row per CA and partition; the jobs not
done, which a healthy queue keeps few of)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime

from sqlalchemy import Connection, and_, func, select

from pkigate.core.store import as_utc, schema
from pkigate.core.store.jobs import JobStatus


@dataclass(frozen=True)
class CRLTimes:
    ca_id: str
    partition: int
    this_update: datetime
    next_update: datetime


def certificates_by_status(conn: Connection) -> list[tuple[str, str, int]]:
    """(CA id, status, certificates) for every CA and status that has any."""
    c = schema.certificate_counts.c
    rows = conn.execute(select(c.ca_id, c.status, c.count).where(c.count > 0))
    return [(str(ca_id), str(status), int(count)) for ca_id, status, count in rows]


def unrevoked_by_expiry_day(
    conn: Connection, first: date, last: date
) -> list[tuple[str, date, int]]:
    """(CA id, UTC day, unrevoked certificates whose notAfter falls on it), days in
    ``first..last``: at most one row per CA and day."""
    d = schema.certificate_expiry_days.c
    rows = conn.execute(
        select(d.ca_id, d.day, d.count).where(
            d.day >= first.isoformat(), d.day <= last.isoformat(), d.count > 0
        )
    )
    return [(str(ca_id), date.fromisoformat(day), int(count)) for ca_id, day, count in rows]


def latest_crls(conn: Connection) -> list[CRLTimes]:
    """The newest CRL of every CA and partition (the unique index on CA, partition and
    number finds each maximum)."""
    c = schema.crls.c
    newest = (
        select(c.ca_id, c.crl_partition, func.max(c.crl_number).label("number"))
        .group_by(c.ca_id, c.crl_partition)
        .subquery()
    )
    rows = conn.execute(
        select(c.ca_id, c.crl_partition, c.this_update, c.next_update).join(
            newest,
            and_(
                c.ca_id == newest.c.ca_id,
                c.crl_partition == newest.c.crl_partition,
                c.crl_number == newest.c.number,
            ),
        )
    )
    return [
        CRLTimes(str(ca_id), int(partition), _utc(this_update), _utc(next_update))
        for ca_id, partition, this_update, next_update in rows
    ]


def unfinished_jobs(conn: Connection) -> list[tuple[str, str, int]]:
    """(kind, status, jobs) for the jobs not done: pending, running and failed (failed
    jobs are kept until the queue purges finished ones)."""
    j = schema.jobs.c
    rows = conn.execute(
        select(j.kind, j.status, func.count())
        .where(j.status.in_([JobStatus.PENDING, JobStatus.RUNNING, JobStatus.FAILED]))
        .group_by(j.kind, j.status)
    )
    return [(str(kind), str(status), int(count)) for kind, status, count in rows]


def _utc(moment: datetime) -> datetime:
    value = as_utc(moment)
    assert value is not None
    return value
