"""The store's schema comes from its migrations, on SQLite and PostgreSQL alike."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from pkigate.core import Core
from pkigate.core.store.schema import metadata


def test_migrations_build_exactly_the_declared_schema(core: Core) -> None:
    with core.store.engine.connect() as conn:
        context = MigrationContext.configure(conn)
        assert context.get_current_revision() is not None
        differences = compare_metadata(context, metadata)
    assert differences == []


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
