"""The store's schema comes from its migrations, on SQLite and PostgreSQL alike."""

from __future__ import annotations

import subprocess
import sys

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from pkigate.core import Core
from pkigate.core.store.engine import MIGRATIONS_DIR, SCHEMA_HEAD, schema_revisions
from pkigate.core.store.schema import metadata


def test_migrations_build_exactly_the_declared_schema(core: Core) -> None:
    with core.store.engine.connect() as conn:
        context = MigrationContext.configure(conn)
        assert context.get_current_revision() is not None
        differences = compare_metadata(context, metadata)
    assert differences == []


def test_schema_head_names_the_newest_migration(core: Core) -> None:
    assert ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head() == SCHEMA_HEAD
    with core.store.engine.connect() as conn:
        assert schema_revisions(conn) == [SCHEMA_HEAD]


def test_a_store_at_the_newest_revision_opens_without_alembic(sqlite_core: Core) -> None:
    # Every worker process and CLI command opens the store; alembic is only for migrating.
    probe = (
        "import sys; from pathlib import Path; from pkigate.core import Core; "
        f"core = Core.open(Path({str(sqlite_core.data_dir)!r})); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('alembic', 'mako')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_sqlite_runs_in_wal_mode_with_durable_commits(sqlite_core: Core) -> None:
    with sqlite_core.store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_serial_numbers_are_unique_per_ca_by_constraint(core: Core) -> None:
    constraints = inspect(core.store.engine).get_unique_constraints("certificates")
    assert {"name": "uq_certificates_ca_serial", "column_names": ["ca_id", "serial"]} in [
        {"name": c["name"], "column_names": c["column_names"]} for c in constraints
    ]


def test_a_duplicate_serial_is_refused_by_the_database(core: Core, issuing) -> None:
    import pytest
    from helpers import make_csr
    from sqlalchemy.exc import IntegrityError

    from pkigate.core import IssuanceRequest, Requester, Validity

    issued = core.issue(
        IssuanceRequest(issuing.record.id, make_csr(), Validity.parse("1d"), Requester("t"))
    )
    record = issued.record
    with pytest.raises(IntegrityError), core.store.write() as conn:
        core.store.insert_certificate(
            conn,
            ca_id=record.ca_id,
            serial=record.serial,
            subject="CN=dup",
            sans=[],
            not_before=record.not_before,
            not_after=record.not_after,
            issued_at=record.issued_at,
            template=record.template,
            requester="x",
            connector="x",
            correlation_id=None,
            status="ISSUED",
            fingerprint_sha256="0" * 64,
            der=b"dup",
        )


def test_opening_twice_does_not_migrate_again(core: Core, tmp_path) -> None:
    again = Core.open(
        core.data_dir, str(core.store.engine.url.render_as_string(hide_password=False))
    )
    with again.store.read() as conn:
        assert again.store.list_cas(conn) == []
    again.close()


def test_fast_select_reads_exactly_what_sqlalchemy_reads(core: Core) -> None:
    """FastSelect (driver cursor, compiled once per dialect) against SQLAlchemy's own
    execution of the same statement: datetimes, NULLs, JSON text and ordering."""
    from datetime import timedelta

    from sqlalchemy import bindparam, select

    from pkigate.core.store import acme as acme_store
    from pkigate.core.store import schema
    from pkigate.core.store.fastpath import FastSelect

    now = core.clock()
    account = acme_store.AccountRecord(
        "acct-1", "acme", "thumb", {"kty": "EC"}, "valid", (), None, now
    )
    order = acme_store.OrderRecord(
        id="order-1",
        connector="acme",
        account_id="acct-1",
        status="pending",
        identifiers=(("dns", "a.example.test"), ("dns", "b.example.test")),
        profile=None,
        replaces=None,
        expires_at=now + timedelta(days=1),
        error=None,
        ca_id=None,
        serial=None,
        created_at=now,
        updated_at=now,
    )
    authorizations = [
        acme_store.AuthorizationRecord(
            f"authz-{n}", "acme", "acct-1", "dns", f"{n}.example.test", False, "pending", now, now
        )
        for n in range(3)
    ]
    with core.store.write() as conn:
        acme_store.insert_account(conn, account)
        for authorization in authorizations:
            acme_store.insert_authorization(conn, authorization)
        acme_store.insert_order(conn, order, ["authz-2", "authz-0", "authz-1"])
    orders = schema.acme_orders
    statement = select(orders).where(orders.c.id == bindparam("id"))
    fast = FastSelect(statement)
    with core.store.read() as conn:
        expected = [tuple(row) for row in conn.execute(statement, {"id": "order-1"})]
        assert [tuple(row) for row in fast.rows(conn, id="order-1")] == expected
        assert fast.first(conn, id="no-such-order") is None
        assert acme_store.order_by_id(conn, "acme", "order-1") == order
        assert acme_store.order_by_id(conn, "other-connector", "order-1") is None
        assert acme_store.account_by_id(conn, "acme", "acct-1") == account
        assert acme_store.order_authorization_ids(conn, "order-1") == [
            "authz-2",
            "authz-0",
            "authz-1",
        ]
        assert acme_store.authorization_by_id(conn, "acme", "authz-1") == authorizations[1]
    # The polls' one-statement reads (no transaction) read the same records.
    engine = core.store.engine
    assert acme_store.order_with_authorization_ids_alone(engine, "acme", "order-1") == (
        order,
        ["authz-2", "authz-0", "authz-1"],
    )
    assert acme_store.order_with_authorization_ids_alone(engine, "other", "order-1") is None
    challenges = [
        acme_store.ChallengeRecord(
            f"ch-{kind}", "authz-0", kind, "t" * 43, "pending", None, None, None
        )
        for kind in ("http-01", "dns-01")
    ]
    with core.store.write() as conn:
        acme_store.insert_challenges(conn, challenges, now)
    with core.store.read() as conn:
        assert acme_store.challenges_of(conn, ["authz-0"]) == challenges[::-1]
    assert acme_store.authorization_with_challenges_alone(engine, "acme", "authz-0") == (
        authorizations[0],
        challenges[::-1],
    )
    assert acme_store.authorization_with_challenges_alone(engine, "acme", "authz-1") == (
        authorizations[1],
        [],
    )
    assert acme_store.authorization_with_challenges_alone(engine, "other", "authz-1") is None
    # An order is authorized once every one of its authorizations is valid.
    for n in range(3):
        with core.store.write() as conn:
            assert acme_store.orders_authorized_with(conn, "authz-0") == []
            acme_store.update_authorization(conn, f"authz-{n}", now, status="valid")
    with core.store.read() as conn:
        assert acme_store.orders_authorized_with(conn, "authz-0") == ["order-1"]


def test_console_queries_search_certificates_count_days_and_find_events(
    core: Core, issuing, clock
) -> None:
    """The console's and the audit API's queries, on SQLite and PostgreSQL alike."""
    from datetime import timedelta

    from helpers import make_csr

    from pkigate.core import IssuanceRequest, Requester, Validity

    def issue(cn: str, requester: str) -> str:
        request = IssuanceRequest(
            issuing.record.id, make_csr(cn), Validity.parse("30d"), Requester(requester)
        )
        return core.issue(request).serial

    with core.store.read() as conn:
        before = core.store.issued_per_day(conn, clock() - timedelta(days=7))  # the CAs'
    first = issue("Printer-7.example.test", "mdm-fleet")
    clock.advance(timedelta(days=1))
    second = issue("laptop_%.example.test", "helpdesk")
    with core.store.read() as conn:

        def serials(**filters: str) -> list[str]:
            return [r.serial for r in core.store.list_certificates(conn, **filters)]

        assert serials(text="printer-7") == [first]  # subject and SANs, any case
        assert serials(text="_%") == [second]  # LIKE wildcards are literal
        assert serials(requester="FLEET") == [first]
        assert serials(serial=second) == [second]
        days = core.store.issued_per_day(conn, clock() - timedelta(days=7))
        today, yesterday = clock().date(), (clock() - timedelta(days=1)).date()
        assert days == {yesterday.isoformat(): sum(before.values()) + 1, today.isoformat(): 1}
        newest = core.store.find_audit_events(conn, action="certificate.", limit=2)
        assert [e.action for e in newest] == ["certificate.issue", "certificate.issue"]
        assert newest[0].seq > newest[1].seq
        assert core.store.find_audit_events(conn, actor="helpdesk", limit=10)[0].seq == (
            newest[0].seq
        )
        assert core.store.find_audit_events(conn, since=clock() + timedelta(hours=1)) == []


def test_scep_transactions_recorded_on_the_driver_cursor_read_back_as_written(
    core: Core,
) -> None:
    """record_transaction (driver cursor) inserts, then updates a renewal in place: what
    SQLAlchemy reads back is what was recorded, created_at kept from the first."""
    from datetime import timedelta

    from sqlalchemy import select

    from pkigate.core.store import scep as scep_store
    from pkigate.core.store import schema

    first, later = core.clock(), core.clock() + timedelta(hours=1)
    recorded = {
        "connector": "scep",
        "transaction_id": "tx-1",
        "csr_sha256": "a" * 64,
        "csr_der": b"\x30\x00",
        "evidence": '{"challenge": "static"}',
        "subject": "CN=device",
        "status": "ISSUED",
        "ca_id": "ca-1",
        "serial": "1f",
    }
    with core.store.write() as conn:
        scep_store.record_transaction(conn, **recorded, now=first)
    with core.store.read() as conn:
        found = scep_store.get_transaction(conn, "scep", "tx-1")
    assert found == scep_store.TransactionRecord(**recorded, created_at=first, updated_at=first)
    renewal = {**recorded, "csr_sha256": "b" * 64, "csr_der": b"\x30\x01", "serial": None}
    with core.store.write() as conn:
        scep_store.record_transaction(conn, **renewal, now=later)
    with core.store.read() as conn:
        rows = conn.execute(select(schema.scep_transactions)).all()
        found = scep_store.get_transaction(conn, "scep", "tx-1")
    assert len(rows) == 1
    assert (bytes(rows[0].csr_der), rows[0].serial) == (b"\x30\x01", None)
    assert found == scep_store.TransactionRecord(**renewal, created_at=first, updated_at=later)


def test_scep_challenge_found_by_its_secret_digest_only_on_its_connector(core: Core) -> None:
    from datetime import timedelta

    from pkigate.core.store import scep as scep_store

    now = core.clock()
    with core.store.write() as conn:
        scep_store.insert_challenge(
            conn,
            challenge_id="ch-1",
            connector="scep",
            secret_sha256="c" * 64,
            subject="CN=device",
            device_id="dev-1",
            created_at=now,
            created_by="admin",
            expires_at=now + timedelta(hours=1),
            sans=("dns:device.example.test",),
        )
    with core.store.read() as conn:
        found = scep_store.challenge_by_secret(conn, "scep", "c" * 64)
        assert scep_store.challenge_by_secret(conn, "other", "c" * 64) is None
        assert scep_store.challenge_by_secret(conn, "scep", "d" * 64) is None
    assert found == scep_store.ChallengeRecord(
        "ch-1",
        "scep",
        "CN=device",
        "dev-1",
        now,
        "admin",
        now + timedelta(hours=1),
        None,
        ("dns:device.example.test",),
    )


def test_a_scep_transaction_recorded_twice_concurrently_fails_the_second_on_postgres(
    tmp_path, postgres_server: str
) -> None:
    """Two requests with one new transactionID on PostgreSQL: neither sees the other's
    row, the second INSERT waits on the key and then fails with SQLAlchemy's
    IntegrityError (what the connector answers with the first's result), never an
    overwrite of the first's record."""
    import threading

    from helpers import fresh_postgres_database, wait_for
    from sqlalchemy import text

    from pkigate.core.store import IntegrityError
    from pkigate.core.store import scep as scep_store

    core = Core.open(tmp_path / "data", fresh_postgres_database(postgres_server))
    try:
        now = core.clock()

        def values(serial: str) -> dict[str, object]:
            return {
                "connector": "scep",
                "transaction_id": "tx-race",
                "csr_sha256": "a" * 64,
                "csr_der": b"\x30\x00",
                "evidence": "{}",
                "subject": "CN=device",
                "status": "ISSUED",
                "ca_id": "ca-1",
                "serial": serial,
                "now": now,
            }

        outcome: list[BaseException | None] = []

        def second() -> None:
            try:
                with core.store.write() as conn:
                    scep_store.record_transaction(conn, **values("2"))  # type: ignore[arg-type]
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)

        with core.store.write() as conn:
            scep_store.record_transaction(conn, **values("1"))  # type: ignore[arg-type]
            racer = threading.Thread(target=second)
            racer.start()

            def second_waits_on_the_key() -> bool:
                with core.store.read() as other:
                    return bool(
                        other.execute(
                            text(
                                "SELECT count(*) FROM pg_stat_activity"
                                " WHERE wait_event_type = 'Lock' AND query LIKE 'INSERT%'"
                            )
                        ).scalar_one()
                    )

            wait_for(second_waits_on_the_key)
        racer.join(10)
        assert len(outcome) == 1 and isinstance(outcome[0], IntegrityError)
        with core.store.read() as conn:
            kept = scep_store.get_transaction(conn, "scep", "tx-race")
        assert kept is not None and kept.serial == "1"
    finally:
        core.close()


def test_an_acme_account_read_alone_is_what_the_transactional_read_finds(core: Core) -> None:
    """FastSelect.first_alone (a pooled driver connection, no transaction) reads exactly
    what first() reads inside a transaction; a missing account is None."""
    from pkigate.core.store import acme as acme_store

    account = acme_store.AccountRecord(
        "acct-alone", "acme", "thumb-alone", {"kty": "EC"}, "valid", (), None, core.clock()
    )
    with core.store.write() as conn:
        acme_store.insert_account(conn, account)
    with core.store.read() as conn:
        assert acme_store.account_by_id(conn, "acme", "acct-alone") == account
    assert acme_store.account_by_id_alone(core.store.engine, "acme", "acct-alone") == account
    assert acme_store.account_by_id_alone(core.store.engine, "other", "acct-alone") is None
    assert acme_store.account_by_id_alone(core.store.engine, "acme", "no-such") is None
