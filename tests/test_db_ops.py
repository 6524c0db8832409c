"""`pkigate db backup | restore | current | upgrade`: online backups of a serving store, a
restore that checks the KEK and the audit chain, and schema migrations only when asked."""

from __future__ import annotations

import base64
import json
import shutil
import sqlite3
import subprocess
import threading
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from helpers import downgrade_store, fresh_postgres_database, make_csr
from serving import PKIGATE, RunningServer, issuer_token_and_issuing_ca, start_server

from pkigate.core import Core
from pkigate.core.store import sqlite_url
from pkigate.core.store.engine import MIGRATIONS_DIR, SCHEMA_HEAD

# The revision before the newest: an older pkigate's store, made by alembic itself.
OLDER_REVISION = str(ScriptDirectory(str(MIGRATIONS_DIR)).get_revision(SCHEMA_HEAD).down_revision)
LOAD_THREADS = 3


def pkigate(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PKIGATE, "--data-dir", str(data_dir), *args], capture_output=True, text=True, timeout=300
    )


def _certificates_the_audit_names(database: Path) -> set[tuple[str, str]]:
    """(CA id, serial) of every issuance the store's audit log records."""
    with sqlite3.connect(f"file:{database}?immutable=1", uri=True) as conn:
        rows = conn.execute(
            "SELECT resource, parameters FROM audit_events "
            "WHERE action = 'certificate.issue' AND result = 'success'"
        ).fetchall()
    return {(resource.removeprefix("ca/"), json.loads(p)["serial"]) for resource, p in rows}


def test_backup_while_serving_under_load_restores_every_certificate_its_audit_names(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    backup = tmp_path / "backup.db"
    issued: list[str] = []
    failures: list[str] = []
    stop = threading.Event()
    server = start_server(data)
    try:
        token, ca_id = issuer_token_and_issuing_ca(server, "load")

        def issue_until_stopped(worker: int) -> None:
            session = server.session(token)
            number = 0
            while not stop.is_set():
                number += 1
                response = session.post(
                    f"{server.https_url}/api/v1/cas/{ca_id}/certificates",
                    json={"csr": make_csr(f"w{worker}-{number}.load.test").decode()},
                    timeout=60,
                )
                if response.status_code != 201:
                    failures.append(response.text)
                    return
                issued.append(response.json()["serial"])

        threads = [
            threading.Thread(target=issue_until_stopped, args=(n,)) for n in range(LOAD_THREADS)
        ]
        for thread in threads:
            thread.start()
        try:
            while len(issued) < 10 and not failures:
                stop.wait(0.05)
            result = pkigate(data, "db", "backup", "--out", str(backup))
            after_backup = len(issued)
            while len(issued) < after_backup + 10 and not failures:
                stop.wait(0.05)
        finally:
            stop.set()
            for thread in threads:
                thread.join()
    finally:
        server.stop()
    assert not failures, failures[0]
    assert result.returncode == 0, result.stderr
    assert backup.stat().st_mode & 0o077 == 0
    assert not Path(f"{backup}-wal").exists()

    named = _certificates_the_audit_names(backup)
    ours = {serial for ca, serial in named if ca == ca_id} & set(issued)
    # Taken while issuing: some of the load's certificates are in it, later ones are not.
    assert len(ours) >= 10
    assert set(issued) - ours

    restored = tmp_path / "restored"
    restored.mkdir(mode=0o700)
    # The operator brings the key-encryption key (never in a backup), their token and the
    # HTTPS listener's files (its root's AIA names the first server's port).
    shutil.copy2(data / "kek", restored / "kek")
    shutil.copy2(data / "admin-token", restored / "admin-token")
    shutil.copytree(data / "tls", restored / "tls")
    result = pkigate(restored, "db", "restore", str(backup))
    assert result.returncode == 0, result.stderr
    assert "a new audit anchor starts" in result.stdout
    verified = pkigate(restored, "audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr

    again = start_server(restored)
    try:
        session = again.session(token)  # the issuer token: in the restored store too
        for issuer, serial in sorted(named):
            found = session.get(
                f"{again.https_url}/api/v1/cas/{issuer}/certificates/{serial}", timeout=10
            )
            assert found.status_code == 200, (serial, found.text)
        missing = sorted(set(issued) - ours)[0]
        gone = session.get(f"{again.https_url}/api/v1/cas/{ca_id}/certificates/{missing}")
        assert gone.status_code == 404
    finally:
        again.stop()


def _demo_store(data_dir: Path) -> None:
    result = pkigate(data_dir, "demo")
    assert result.returncode == 0, result.stderr


def _issuing_ca(data_dir: Path) -> str:
    listed = json.loads(pkigate(data_dir, "--json", "ca", "list").stdout)
    return next(ca["id"] for ca in listed if ca["type"] == "SUBORDINATE")


def _issue(data_dir: Path, ca_id: str, tmp_path: Path, name: str) -> str:
    csr = tmp_path / f"{name}.csr"
    csr.write_bytes(make_csr(name))
    result = pkigate(data_dir, "--json", "cert", "issue", "--ca", ca_id, "--csr", str(csr))
    assert result.returncode == 0, result.stderr
    return str(json.loads(result.stdout)["serial"])


def test_restore_refuses_a_live_store_without_force_and_an_anchor_ahead_names_recover(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    backup = tmp_path / "backup.db"
    _demo_store(data)
    ca_id = _issuing_ca(data)
    assert pkigate(data, "db", "backup", "--out", str(backup)).returncode == 0
    after = _issue(data, ca_id, tmp_path, "after-backup.test")

    refused = pkigate(data, "db", "restore", str(backup))
    assert refused.returncode == 1
    assert "--force" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert pkigate(data, "cert", "get", "--ca", ca_id, "--serial", after).returncode == 0

    # Forced: the older store is put back; the anchor still holds what came after it, so
    # the store is not served until the operator decides (recover here).
    forced = pkigate(data, "db", "restore", "--force", str(backup))
    assert forced.returncode == 1
    assert "audit recover" in forced.stderr and "audit reanchor" in forced.stderr
    assert pkigate(data, "audit", "recover").returncode == 0
    assert pkigate(data, "cert", "get", "--ca", ca_id, "--serial", after).returncode == 0
    assert pkigate(data, "audit", "verify").returncode == 0


def test_restore_without_the_kek_changes_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    backup = tmp_path / "backup.db"
    _demo_store(data)
    assert pkigate(data, "db", "backup", "--out", str(backup)).returncode == 0
    elsewhere = tmp_path / "elsewhere"
    result = pkigate(elsewhere, "db", "restore", str(backup))
    assert result.returncode == 1
    assert "kek" in result.stderr and "PKIGATE_KEK" in result.stderr
    assert not (elsewhere / "pkigate.db").exists()


def test_a_tampered_backup_is_refused_before_anything_is_replaced(tmp_path: Path) -> None:
    data = tmp_path / "data"
    backup = tmp_path / "backup.db"
    _demo_store(data)
    assert pkigate(data, "db", "backup", "--out", str(backup)).returncode == 0
    with sqlite3.connect(backup) as conn:
        conn.execute("UPDATE audit_events SET actor = 'mallory' WHERE seq = 2")
    before = (data / "pkigate.db").stat().st_mtime_ns
    result = pkigate(data, "db", "restore", "--force", str(backup))
    assert result.returncode == 1
    assert "fails its audit verification" in result.stderr and "edited" in result.stderr
    assert (data / "pkigate.db").stat().st_mtime_ns == before


def _old_sqlite_store(data_dir: Path) -> None:
    Core.open(data_dir).close()
    downgrade_store(sqlite_url(data_dir / "pkigate.db"), OLDER_REVISION)


class ServerAt(RunningServer):
    """`pkigate serve` on free ports, with extra command-line options."""

    def __init__(self, data_dir: Path, *options: str) -> None:
        super().__init__(data_dir, 60)
        self.options = options
        self.config.write_text(
            f'data_dir = "{data_dir}"\n[listeners]\nhttp = "127.0.0.1:{self.http_port}"\n'
            f'https = "127.0.0.1:{self.https_port}"\n'
        )
        self.log_path.write_bytes(b"")

    @property
    def command(self) -> list[str]:
        return [*super().command, *self.options]


def test_an_older_schema_is_refused_until_db_upgrade(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _old_sqlite_store(data)

    refused = pkigate(data, "ca", "list")
    assert refused.returncode == 1
    (line,) = refused.stderr.strip().splitlines()
    assert f"schema revision {OLDER_REVISION}" in line and "pkigate db upgrade" in line
    assert "[schemaOutdated]" in line
    server = ServerAt(data)
    with pytest.raises(RuntimeError, match="exited early"):
        server.start()  # refused before any listener or CA is made
    assert "pkigate db upgrade" in server.log_tail()

    current = json.loads(pkigate(data, "--json", "db", "current").stdout)
    assert current == {"revisions": [OLDER_REVISION], "head": SCHEMA_HEAD, "up_to_date": False}

    upgraded = pkigate(data, "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    assert f"{OLDER_REVISION} -> {SCHEMA_HEAD}" in upgraded.stdout
    assert pkigate(data, "ca", "list").returncode == 0
    current = json.loads(pkigate(data, "--json", "db", "current").stdout)
    assert current["up_to_date"] is True


def test_serve_migrate_upgrades_an_older_schema(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _old_sqlite_store(data)
    with ServerAt(data, "--migrate"):
        pass  # started: both listeners answered /readyz
    current = json.loads(pkigate(data, "--json", "db", "current").stdout)
    assert current["revisions"] == [SCHEMA_HEAD]


def test_db_upgrade_migrates_an_older_postgresql_store(
    postgres_server: str, tmp_path: Path
) -> None:
    url = fresh_postgres_database(postgres_server)
    data = tmp_path / "data"
    Core.open(data, url).close()
    downgrade_store(url, OLDER_REVISION)
    on_postgres = ("--database-url", url)
    refused = pkigate(data, *on_postgres, "ca", "list")
    assert refused.returncode == 1 and "pkigate db upgrade" in refused.stderr
    upgraded = pkigate(data, *on_postgres, "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    current = json.loads(pkigate(data, *on_postgres, "--json", "db", "current").stdout)
    assert current["revisions"] == [SCHEMA_HEAD]
    assert pkigate(data, *on_postgres, "ca", "list").returncode == 0


def test_a_new_store_is_created_at_the_newest_schema_without_a_step(tmp_path: Path) -> None:
    data = tmp_path / "fresh"
    assert "no store yet" in pkigate(data, "db", "current").stdout
    assert pkigate(data, "ca", "list").returncode == 0
    current = json.loads(pkigate(data, "--json", "db", "current").stdout)
    assert current == {"revisions": [SCHEMA_HEAD], "head": SCHEMA_HEAD, "up_to_date": True}


@pytest.mark.parametrize("verb", ["backup --out x.db", "restore x.db"])
def test_a_postgresql_store_points_to_pg_dump(tmp_path: Path, verb: str) -> None:
    result = subprocess.run(
        [PKIGATE, "--database-url", "postgresql://nobody@127.0.0.1:1/none", "db", *verb.split()],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert "PostgreSQL" in result.stderr and "Running in production" in result.stderr


def _postgres_tool(name: str) -> str:
    """The newest cluster's own pg_dump / pg_restore (Debian's /usr/bin wrappers pick a
    version by a cluster configuration the test cluster does not have)."""
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    if not found:
        pytest.skip("PostgreSQL is not installed (scripts/setup --test installs it)")
    return str(found[-1])


def test_the_documented_pg_dump_holds_no_kek_and_restores_a_verifying_store(
    postgres_server: str, tmp_path: Path
) -> None:
    url = fresh_postgres_database(postgres_server)
    data = tmp_path / "data"
    created = subprocess.run(
        [PKIGATE, "--data-dir", str(data), "--database-url", url, "demo"],
        capture_output=True,
        text=True,
    )
    assert created.returncode == 0, created.stderr
    # README, "Running in production": the procedure as documented.
    dump = tmp_path / "pkigate.dump"
    subprocess.run(
        [_postgres_tool("pg_dump"), "--format=custom", "--file", str(dump), "--dbname", url],
        check=True,
    )
    plain = subprocess.run(
        [_postgres_tool("pg_restore"), "--file", "-", str(dump)], capture_output=True, check=True
    ).stdout
    kek = bytes.fromhex((data / "kek").read_text().strip())
    assert b"ca_keys" in plain and b"PKG1".hex().encode() in plain  # the sealed keys are there
    for form in (kek, kek.hex().encode(), base64.b64encode(kek)):
        assert form not in plain and form.upper() not in plain

    restored = fresh_postgres_database(postgres_server)
    subprocess.run(
        [_postgres_tool("pg_restore"), "--no-owner", "--dbname", restored, str(dump)], check=True
    )
    verified = subprocess.run(
        [PKIGATE, "--data-dir", str(data), "--database-url", restored, "audit", "verify"],
        capture_output=True,
        text=True,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
