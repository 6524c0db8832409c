"""Does issuance slow down as the store fills? ``core.issue()`` on an empty store and on
one already holding a million certificates, in one run.

Two stores are made (each a fresh data directory; SQLite by default, or two fresh
databases on a PostgreSQL server), each with an EC P-256 root and issuing CA. The second
is bulk-loaded (not timed as issuance: raw ``executemany`` on SQLite, ``COPY`` on
PostgreSQL) with R certificate rows under its issuing CA, as many as the rows issuance
keeps an index on would hold after R issuances:

* certificates: random 20-octet positive serials, notBefore spread over the last year,
  lifetimes of 30 to 398 days (so some have expired), ~10% REVOKED with a time and an
  RFC 5280 reason, as the CRL and OCSP code read them; the DER of one certificate this CA
  issued is used for every row (the bytes are not what an index or a lookup touches);
* audit events: one ``certificate.issue`` per row and one ``certificate.revoke`` per
  revoked row, appended through ``AuditLog.record_many`` (a valid chain, so ``audit verify``
  still passes; the chain head is what every issuance locks and extends).

Then both stores issue the same kind of CSRs (P-256, CN + DNS SAN), in-process, durable and
audited (the path ``bench/core_issue.py`` measures), with T threads, in paired rounds
(a slice on the empty store, then a slice on the loaded one), and the ratio loaded/empty is
the median of the per-round ratios (steadier than either rate on a shared machine). At the
end the loaded store must hold R + issued certificates with distinct serials, and both
audit chains must verify.

    .venv/bin/python bench/store_scale.py [--quick] [--rows R] [--count N] [--threads T]
        [--rounds K] [--postgres | --database-url postgresql://USER@HOST:PORT] [--json FILE]

Full run: R=1,000,000, N=2000, T=8 (the load takes most of it: ~25 min on a busy 2-CPU VM);
``--quick``: R=50,000, N=300 (about a minute). ``--postgres`` starts a private PostgreSQL
cluster for the run (as tests/conftest.py does); ``--database-url`` names a server on which
the run creates, then drops, two databases. These are figures, not a test: the script exits
non-zero only when a store or an audit chain disagrees with what was issued.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import event

from pkigate.core import Core, IssuanceRequest, Requester, Validity
from pkigate.core import crl as crl_der
from pkigate.core.audit import Actor, AuditEntry
from pkigate.core.model import CertificateStatus, RevocationReason
from pkigate.core.store import schema

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "tests"))
from _peers import PostgresServer, drop_database, fresh_database  # noqa: E402
from core_issue import (  # noqa: E402
    create_hierarchy,
    describe_database,
    make_csrs,
    rate,
    run_threads,
)

TARGET_RATIO = 0.9  # the [serving] issue: issued/s on 1M certificates >= 0.9x an empty store
FULL_ROWS, QUICK_ROWS = 1_000_000, 50_000
FULL_COUNT, QUICK_COUNT = 2000, 300
DEFAULT_THREADS = 8
DEFAULT_ROUNDS = 10  # short paired rounds: on a shared machine, more of them
KEY_TYPE = "EC_prime256v1"
VALIDITY = "30d"
LOAD_BATCH = 20_000  # rows per executemany / audit append: bounded memory, few statements
REVOKED_FRACTION = 0.10
WARM_UP_ISSUES = 5
ISSUE_ACTION = "certificate.issue"
REVOKE_ACTION = "certificate.revoke"
REASONS = [r.value for r in RevocationReason]
LOADER = Requester("bench-loader", connector="bench")


def progress(message: str) -> None:
    print(f"... {message}", file=sys.stderr, flush=True)


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


# -- the bulk load ------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedRow:
    """What the audit event of a loaded certificate names."""

    serial: str
    subject: str
    not_after: datetime
    revoked: tuple[datetime, str] | None


def certificate_rows(
    ca_id: str, template_der: bytes, count: int, now: datetime, start: int
) -> Iterator[tuple[dict[str, Any], LoadedRow]]:
    """``count`` certificate rows (values as the issuer writes them) for ``ca_id``."""
    randoms = secrets.token_bytes(count * 20)
    fingerprints = secrets.token_bytes(count * 32)
    year = 365 * 86400
    for index in range(count):
        raw = int.from_bytes(randoms[index * 20 : index * 20 + 20], "big") >> 1
        serial = format(raw | 1, "x")  # positive, at most 159 bits, never zero
        spread = raw % year  # the serial's own bits: no second random source per row
        issued = now - timedelta(seconds=spread)
        not_after = issued + timedelta(days=30 + raw % 369)
        name = f"h{start + index}.loaded.example"
        revoked = None
        if raw % 1000 < REVOKED_FRACTION * 1000:
            revoked_at = issued + (min(now, not_after) - issued) / 2
            revoked = (revoked_at, REASONS[raw % len(REASONS)])
        row = {
            "ca_id": ca_id,
            "serial": serial,
            "subject": f"CN={name}",
            "sans": json.dumps([f"DNS:{name}"]),
            "not_before": issued,
            "not_after": not_after,
            "issued_at": issued,
            "template": "EndEntityCertificate/V1",
            "requester": LOADER.principal,
            "connector": LOADER.connector,
            "correlation_id": None,
            "status": (CertificateStatus.REVOKED if revoked else CertificateStatus.ISSUED).value,
            "revoked_at": revoked[0] if revoked else None,
            "revocation_reason": revoked[1] if revoked else None,
            "fingerprint_sha256": fingerprints[index * 32 : index * 32 + 32].hex(),
            "der": template_der,
            "crl_partition": None,
            "team": None,  # the CA owner's (see core/tenancy.py)
            # What a revocation stores with it (the entry its CRLs list).
            "crl_entry": crl_der.entry(serial, *revoked) if revoked else None,
        }
        yield row, LoadedRow(serial, row["subject"], not_after, revoked)


def insert_rows(core: Core, rows: Sequence[dict[str, Any]]) -> None:
    """One batch of certificate rows, bypassing the issuer: COPY on PostgreSQL, one
    executemany on SQLite (values converted by the column types, as SQLAlchemy would)."""
    table = schema.certificates
    columns = [c.name for c in table.columns if c.name != "id"]
    with core.store.write() as conn:
        dialect = conn.dialect
        cursor = conn.connection.cursor()
        try:
            if dialect.name == "postgresql":
                with cursor.copy(f"COPY certificates ({', '.join(columns)}) FROM STDIN") as copy:
                    for row in rows:
                        copy.write_row([row[name] for name in columns])
                return
            processors = [
                (i, p)
                for i, name in enumerate(columns)
                if (p := table.c[name].type.dialect_impl(dialect).bind_processor(dialect))
            ]

            def values(row: dict[str, Any]) -> list[Any]:
                out = [row[name] for name in columns]
                for i, process in processors:
                    if out[i] is not None:
                        out[i] = process(out[i])
                return out

            marks = ", ".join("?" for _ in columns)
            cursor.executemany(
                f"INSERT INTO certificates ({', '.join(columns)}) VALUES ({marks})",  # noqa: S608
                [values(row) for row in rows],
            )
        finally:
            cursor.close()


def audit_entries(ca_id: str, loaded: Sequence[LoadedRow], key_id: str) -> list[AuditEntry]:
    actor = LOADER.actor
    resource = f"ca/{ca_id}"
    entries = []
    for row in loaded:
        entries.append(
            AuditEntry(
                actor,
                ISSUE_ACTION,
                resource,
                row.not_after,  # any moment: the chain orders by sequence, not time
                parameters={
                    "serial": row.serial,
                    "template": "EndEntityCertificate/V1",
                    "subject": row.subject,
                    "not_after": row.not_after,
                    "key_id": key_id,
                    "signing_algorithm": "SHA256WITHECDSA",
                    "correlation_id": None,
                },
            )
        )
        if row.revoked:
            entries.append(
                AuditEntry(
                    actor,
                    REVOKE_ACTION,
                    resource,
                    row.revoked[0],
                    parameters={"serial": row.serial, "reason": row.revoked[1]},
                )
            )
    return entries


def bulk_load(core: Core, ca_id: str, template_der: bytes, rows: int) -> dict[str, float]:
    """``rows`` certificates and their audit events; seconds spent on each, and how many
    of the rows are REVOKED."""
    now = datetime.now(UTC)
    key_id = core.authorities.get(ca_id).key_id
    certificates_s = audit_s = 0.0
    done = revoked = 0
    while done < rows:
        size = min(LOAD_BATCH, rows - done)
        began = time.perf_counter()
        batch = list(certificate_rows(ca_id, template_der, size, now, done))
        insert_rows(core, [row for row, _ in batch])
        revoked += sum(1 for _, loaded in batch if loaded.revoked)
        certificates_s += time.perf_counter() - began
        began = time.perf_counter()
        entries = audit_entries(ca_id, [loaded for _, loaded in batch], key_id)
        with core.store.write() as conn:
            core.audit.record_many(conn, entries)
        audit_s += time.perf_counter() - began
        done += size
        if done % (LOAD_BATCH * 10) == 0 or done == rows:
            progress(f"  loaded {done} certificates")
    return {
        "certificates_s": round(certificates_s, 1),
        "audit_s": round(audit_s, 1),
        "revoked": revoked,
    }


def check_crl(store: Store, revoked: int) -> dict[str, Any]:
    """The loaded rows are what the revocation code reads: the CA's first complete CRL
    lists every REVOKED row."""
    core = store.core
    settings = core.authorities.signing_material(store.ca_id, datetime.now(UTC)).settings
    core.authorities.update_settings(
        store.ca_id, replace(settings, crl_enabled=True), Actor("bench", "bench")
    )
    began = time.perf_counter()
    published = core.revocation.generate_crl(store.ca_id)
    seconds = time.perf_counter() - began
    entries = len(x509.load_der_x509_crl(published.der))
    return {
        "revoked_rows": revoked,
        "crl_entries": entries,
        "crl_s": round(seconds, 1),
        "ok": entries == revoked,
    }


# -- the measurement ----------------------------------------------------------------------


@dataclass
class Store:
    """One store under test: its core, issuing CA, and what was issued into it."""

    name: str
    core: Core
    ca_id: str
    serials: list[str]
    lock: threading.Lock

    def issue(self, csr: x509.CertificateSigningRequest) -> x509.Certificate:
        issued = self.core.issue(
            IssuanceRequest(self.ca_id, csr, Validity.parse(VALIDITY), Requester("bench", "bench"))
        )
        with self.lock:
            self.serials.append(issued.serial)
        return issued.certificate


@dataclass(frozen=True)
class Verification:
    store: str
    loaded: int
    issued: int
    distinct_serials: int
    stored: int
    audit_events: int
    audit_chain_ok: bool
    verify_s: float

    @property
    def ok(self) -> bool:
        return (
            self.audit_chain_ok
            and self.issued == self.distinct_serials
            and self.stored == self.loaded + self.issued
        )


WAL_SAMPLE = 200  # issuances over which SQLite's WAL pages are counted


def wal_pages_per_issue(
    store: Store, csrs: Sequence[x509.CertificateSigningRequest], threads: int
) -> float:
    """SQLite only: pages written to the WAL per certificate issued (checkpoints held off
    meanwhile). Unlike a rate, this does not move with the machine's load: it is what an
    index on a random key costs as the store grows (each append dirties a page of its
    own instead of sharing the last one)."""
    engine = store.core.store.engine

    def hold_checkpoints(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.execute("PRAGMA wal_autocheckpoint = 0")

    with engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    engine.dispose()
    event.listen(engine, "connect", hold_checkpoints)
    try:
        run_threads(csrs, threads, store.issue)
        with engine.connect() as conn:
            # PASSIVE answers (busy, frames in the WAL, frames checkpointed).
            row = conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        event.remove(engine, "connect", hold_checkpoints)
        engine.dispose()
    assert row is not None
    return float(row[1]) / len(csrs)


def verify(store: Store, loaded: int) -> Verification:
    began = time.perf_counter()
    with store.core.store.read() as conn:
        stored = store.core.store.count_certificates(conn, store.ca_id)
    audit = store.core.audit.verify()
    return Verification(
        store.name,
        loaded,
        len(store.serials),
        len(set(store.serials)),
        stored,
        audit.events,
        audit.ok,
        round(time.perf_counter() - began, 1),
    )


def open_store(name: str, data_dir: Path, database_url: str | None) -> Store:
    core = Core.open(data_dir, database_url=database_url)
    return Store(name, core, create_hierarchy(core, KEY_TYPE), [], threading.Lock())


@contextmanager
def databases(args: argparse.Namespace, scratch: Path) -> Iterator[tuple[str | None, str | None]]:
    """(empty store URL, loaded store URL): None for SQLite in the data directory."""
    with ExitStack() as stack:
        server = args.database_url
        if args.postgres:
            cluster = PostgresServer()
            stack.callback(cluster.stop)
            cluster.start()
            server = cluster.url
        if not server:
            yield None, None
            return
        urls = (fresh_database(server), fresh_database(server))
        for url in urls:
            stack.callback(drop_database, server, url)
        yield urls


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"CI-sized: R={QUICK_ROWS}")
    parser.add_argument("--rows", type=int, help=f"certificates loaded (default {FULL_ROWS})")
    parser.add_argument("--count", type=int, help=f"CSRs issued per store (default {FULL_COUNT})")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="issuing threads")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="paired rounds")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--postgres", action="store_true", help="a private PostgreSQL cluster")
    where.add_argument(
        "--database-url", help="postgresql://USER@HOST:PORT where two databases may be made"
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures here")
    args = parser.parse_args(argv)
    rows = args.rows if args.rows is not None else (QUICK_ROWS if args.quick else FULL_ROWS)
    count = args.count or (QUICK_COUNT if args.quick else FULL_COUNT)
    if args.threads < 1 or args.rounds < 1 or count < args.threads * args.rounds or rows < 0:
        parser.error("need --threads >= 1, --rounds >= 1, --count >= threads * rounds")

    figures: dict[str, Any] = {
        "rows": rows,
        "count": count,
        "threads": args.threads,
        "rounds": args.rounds,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_average_before": load_average(),
    }
    began = time.perf_counter()
    progress(f"generating {count * 2 + WARM_UP_ISSUES * 2 + min(WAL_SAMPLE, count) * 2} CSRs")
    csrs = make_csrs(count * 2 + WARM_UP_ISSUES * 2)
    wal_sample = min(WAL_SAMPLE, count)
    wal_csrs = make_csrs(wal_sample * 2)
    with (
        tempfile.TemporaryDirectory(prefix="pkigate-bench-scale-") as scratch_name,
        ExitStack() as stack,
    ):
        scratch = Path(scratch_name)
        empty_url, loaded_url = stack.enter_context(databases(args, scratch))
        figures["database"] = describe_database(empty_url)
        empty = open_store("empty", scratch / "empty", empty_url)
        stack.callback(empty.core.close)
        loaded = open_store("loaded", scratch / "loaded", loaded_url)
        stack.callback(loaded.core.close)
        sample = loaded.issue(csrs[0])
        template_der = sample.public_bytes(serialization.Encoding.DER)
        progress(f"bulk-loading {rows} certificates and their audit events")
        load_began = time.perf_counter()
        figures["load_seconds"] = bulk_load(loaded.core, loaded.ca_id, template_der, rows)
        figures["load_seconds"]["total_s"] = round(time.perf_counter() - load_began, 1)

        for store, offset in ((empty, 0), (loaded, WARM_UP_ISSUES)):
            for csr in csrs[1 + offset : 1 + offset + WARM_UP_ISSUES]:
                store.issue(csr)
        work = csrs[WARM_UP_ISSUES * 2 :]
        empty_work, loaded_work = work[:count], work[count : count * 2]
        progress(f"issuing {count} per store, {args.threads} threads, {args.rounds} rounds")
        empty_rates, loaded_rates = [], []
        for index in range(args.rounds):
            empty_rates.append(rate(empty_work[index :: args.rounds], args.threads, empty.issue))
            loaded_rates.append(rate(loaded_work[index :: args.rounds], args.threads, loaded.issue))
        ratios = [lo / em for lo, em in zip(loaded_rates, empty_rates, strict=True)]
        figures.update(
            empty_per_s=round(statistics.median(empty_rates), 1),
            loaded_per_s=round(statistics.median(loaded_rates), 1),
            ratio=round(statistics.median(ratios), 3),
            ratio_min=round(min(ratios), 3),
            ratio_max=round(max(ratios), 3),
            target_ratio=TARGET_RATIO,
        )
        if empty_url is None:
            progress(f"counting WAL pages over {wal_sample} issuances per store")
            figures["wal_sample"] = wal_sample
            figures["wal_pages_per_issue"] = {
                store.name: round(wal_pages_per_issue(store, sample, args.threads), 2)
                for store, sample in (
                    (empty, wal_csrs[:wal_sample]),
                    (loaded, wal_csrs[wal_sample:]),
                )
            }
        progress("verifying both stores and audit chains")
        # Warm-up issues (and the loaded store's sample) count as issued: they are in
        # store.serials.
        checks = [verify(empty, 0), verify(loaded, rows)]
        figures["verification"] = [{**asdict(v), "ok": v.ok} for v in checks]
        progress("the loaded store's first CRL")
        figures["crl"] = check_crl(loaded, figures["load_seconds"]["revoked"])
    figures["load_average_after"] = load_average()
    figures["seconds"] = round(time.perf_counter() - began, 1)
    report(figures, checks)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if all(v.ok for v in checks) and figures["crl"]["ok"] else 1


def report(figures: dict[str, Any], checks: Sequence[Verification]) -> None:
    print(f"core.issue() on an empty store vs one holding {figures['rows']} certificates")
    print(
        f"{figures['database']}; EC P-256 issuing CA; N={figures['count']} CSRs per store in "
        f"{figures['rounds']} paired rounds, {figures['threads']} threads; "
        f"{figures['cpus']} CPUs; Python {figures['python']}"
    )
    print(
        f"load average before {figures['load_average_before']}, after "
        f"{figures['load_average_after']} (a shared machine: rates move, ratios less)"
    )
    load = figures["load_seconds"]
    print(
        f"  bulk load: {figures['rows']} certificates in {load['certificates_s']} s, their "
        f"audit events in {load['audit_s']} s ({load['total_s']} s in all)"
    )
    print(f"  empty store:  {figures['empty_per_s']:8.1f} issued/s (median of rounds)")
    print(f"  loaded store: {figures['loaded_per_s']:8.1f} issued/s")
    verdict = "met" if figures["ratio"] >= TARGET_RATIO else "NOT met"
    print(
        f"  loaded/empty: {figures['ratio']:.3f} (rounds {figures['ratio_min']:.3f}-"
        f"{figures['ratio_max']:.3f}; target >= {TARGET_RATIO}: {verdict})"
    )
    wal = figures.get("wal_pages_per_issue")
    if wal:
        print(
            f"  WAL pages written per certificate issued ({figures['wal_sample']} issuances, "
            f"{figures['threads']} threads): empty {wal['empty']}, loaded {wal['loaded']}"
        )
    for v in checks:
        print(
            f"  {v.store}: stored {v.stored} = loaded {v.loaded} + issued {v.issued}, distinct "
            f"serials {v.distinct_serials}, audit chain of {v.audit_events} events "
            f"{'verifies' if v.audit_chain_ok else 'DOES NOT VERIFY'} ({v.verify_s} s) -> "
            f"{'OK' if v.ok else 'MISMATCH'}"
        )
    crl = figures["crl"]
    print(
        f"  loaded store's CRL: {crl['crl_entries']} entries for {crl['revoked_rows']} REVOKED "
        f"rows, read, built and signed in {crl['crl_s']} s "
        f"-> {'OK' if crl['ok'] else 'MISMATCH'}"
    )
    print(f"({figures['seconds']} s in all)")


if __name__ == "__main__":
    sys.exit(main())
