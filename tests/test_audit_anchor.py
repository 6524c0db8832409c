"""The audit chain's anchor outside the database: a store that lost its tail, or whose
pages are damaged, is detected at start, named by `audit verify`, and not served from;
`audit recover` puts back every certificate a client was given."""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from helpers import make_csr
from serving import start_server

from pkigate.core import Core, IssuanceRequest, Requester, Validity
from pkigate.core.errors import PkigateError
from pkigate.gateways.app import create_app
from pkigate.gateways.cli import main
from pkigate.gateways.config import load_config, parse_config
from pkigate.gateways.runtime import Gateway

ISSUING = "CN=pkigate Issuing CA,O=pkigate"
ANCHOR = "pkigate-audit-anchor.jsonl"  # beside pkigate.db


def _cli(data_dir: Path, *args: str) -> Result:
    """The command line, in this process (what `pkigate` runs, without its start-up cost)."""
    runner = CliRunner(env={"PKIGATE_DATABASE_URL": None, "PKIGATE_HOME": None})
    return runner.invoke(main, ["--data-dir", str(data_dir), *args])


def _anchor(data_dir: Path) -> Path:
    return data_dir / ANCHOR


def _anchored_seqs(data_dir: Path) -> list[int]:
    lines = _anchor(data_dir).read_bytes().splitlines()
    return [json.loads(line.rpartition(b"\t")[0])["event"]["seq"] for line in lines]


def _one_line_error(result: Result) -> str:
    assert result.exit_code != 0, result.stdout
    # Only the CLI's own exit: any other exception would have been a traceback.
    assert isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def _start_refused(data_dir: Path) -> str:
    """`pkigate serve` on this data directory must exit without serving: its log."""
    try:
        server = start_server(data_dir, timeout=30)
    except RuntimeError as exc:
        assert "exited early" in str(exc)
        log = str(exc)
        assert "Traceback" not in log, log
        return log
    server.stop()
    raise AssertionError("pkigate serve started on a store it must not trust")


# -- a lost tail, through a real `pkigate serve` -------------------------------------------


def test_a_cut_off_wal_after_delivered_certificates_is_refused_named_and_recovered(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    server = start_server(data_dir, workers=2)
    try:
        admin = server.session()
        cas = admin.get(f"{server.https_url}/api/v1/cas").json()
        issuing_id = next(ca["id"] for ca in cas["cas"] if ca["subject"] == ISSUING)
        token = admin.post(
            f"{server.https_url}/api/v1/tokens", json={"name": "i", "role": "issuer"}
        )
        session = server.session(token.json()["secret"])

        def issue(number: int) -> str:
            response = session.post(
                f"{server.https_url}/api/v1/cas/{issuing_id}/certificates",
                json={"csr": make_csr(f"host-{number}.anchor.test").decode(), "validity": "1d"},
                timeout=30,
            )
            assert response.status_code == 201, response.text
            return str(response.json()["serial"])

        with ThreadPoolExecutor(4) as pool:
            delivered = set(pool.map(issue, range(24)))
    finally:
        server.kill()  # a power cut: no checkpoint, the WAL holds the latest commits
    # The two workers' lines are in chain order, none torn.
    seqs = _anchored_seqs(data_dir)
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))

    # The disk kept the first part of the WAL only (the shared-memory index is rebuilt
    # from what is there, as after a reboot).
    wal = data_dir / "pkigate.db-wal"
    wal.write_bytes(wal.read_bytes()[: wal.stat().st_size // 3])
    (data_dir / "pkigate.db-shm").unlink()
    core = Core.open(data_dir)
    with core.store.read() as conn:
        kept = {r.serial for r in core.store.list_certificates(conn, ca_id=issuing_id)}
        head = core.store.audit_head(conn)
    core.close()
    assert head is not None
    lost = delivered - kept
    assert lost, "the cut-off WAL lost no certificate"
    span = f"audit events {head[0] + 1}..{seqs[-1]}"

    log = _start_refused(data_dir)
    assert "behind its audit anchor" in log and span in log, log
    assert f"({len(lost)} issued certificates among them)" in log, log
    assert "pkigate audit recover" in log

    verify = _cli(data_dir, "audit", "verify")
    assert verify.exit_code == 1
    assert f"event {head[0] + 1}: truncated: {span}" in verify.stdout, verify.stdout

    recover = _cli(data_dir, "audit", "recover")
    assert recover.exit_code == 0, recover.stderr
    assert f"recovered {span}" in recover.stdout
    assert f"{len(lost)} certificates" in recover.stdout
    again = _cli(data_dir, "audit", "recover")
    assert again.exit_code == 0 and "nothing to recover" in again.stdout
    assert _cli(data_dir, "audit", "verify").exit_code == 0

    # Ready again: what `pkigate serve` checks at start, and what its workers answer.
    gateway = Gateway.open(load_config(data_dir.parent / "data.toml"), bootstrap=True)
    try:
        assert create_app(gateway, "http").test_client().get("/readyz").status_code == 200
    finally:
        gateway.close()
    core = Core.open(data_dir)
    try:
        with core.store.read() as conn:
            stored = {r.serial for r in core.store.list_certificates(conn, ca_id=issuing_id)}
        assert delivered <= stored
        recovery = [e for e in core.audit.events() if e.action == "audit.recover"]
        assert len(recovery) == 1 and json.loads(recovery[0].parameters)["certificates"] == len(
            lost
        )
        assert core.audit.verify().ok
    finally:
        core.close()


# -- in-process: readiness, an older backup put back, a lost anchor, torn lines ------------


@pytest.fixture
def gateway_config(tmp_path: Path) -> Iterator[str]:
    yield f"data_dir = '{tmp_path / 'data'}'"


def _issue(core: Core, ca_id: str, count: int) -> list[str]:
    return [
        core.issue(
            IssuanceRequest(ca_id, make_csr(), Validity.parse("1d"), Requester("tester"))
        ).serial
        for _ in range(count)
    ]


def _backup(database: Path, to: Path) -> None:
    source, target = sqlite3.connect(database), sqlite3.connect(to)
    source.backup(target)
    source.close()
    target.close()


def _put_back(backup: Path, database: Path) -> None:
    for suffix in ("-wal", "-shm"):
        Path(f"{database}{suffix}").unlink(missing_ok=True)
    shutil.copyfile(backup, database)


def test_an_older_backup_put_back_is_not_ready_until_recovered_or_reanchored(
    gateway_config: str, tmp_path: Path
) -> None:
    config = parse_config(gateway_config)
    gateway = Gateway.open(config, bootstrap=True)
    ca_id = gateway.ca_ids[config.cas[-1].name]
    data_dir = gateway.core.data_dir
    _issue(gateway.core, ca_id, 2)
    _backup(data_dir / "pkigate.db", tmp_path / "backup.db")
    later = _issue(gateway.core, ca_id, 3)
    gateway.close()
    _put_back(tmp_path / "backup.db", data_dir / "pkigate.db")

    with pytest.raises(PkigateError, match="behind its audit anchor") as refused:
        Gateway.open(config, bootstrap=True)
    assert "(3 issued certificates among them)" in refused.value.message
    assert "pkigate audit reanchor" in refused.value.message  # the backup was on purpose
    worker = Gateway.open(config)  # a worker opens without the start-up check
    try:
        ready = create_app(worker, "http").test_client().get("/readyz")
        assert ready.status_code == 503
        assert "behind its audit anchor" in ready.json["error"]["message"]
        # Nothing is written over the lost events meanwhile.
        with pytest.raises(PkigateError, match="behind its audit anchor"):
            _issue(worker.core, ca_id, 1)
    finally:
        worker.close()

    assert "--yes" in _one_line_error(_cli(data_dir, "audit", "reanchor"))
    result = _cli(data_dir, "audit", "reanchor", "--yes")
    assert result.exit_code == 0, result.stderr
    assert "gave up events" in result.stdout
    assert list(data_dir.glob(f"{ANCHOR}.superseded-*"))  # kept, not deleted
    gateway = Gateway.open(config, bootstrap=True)
    try:
        assert create_app(gateway, "http").test_client().get("/readyz").status_code == 200
        assert gateway.core.audit.verify().ok
        with gateway.core.store.read() as conn:
            assert all(gateway.core.store.get_certificate(conn, ca_id, s) is None for s in later)
        reanchored = [e for e in gateway.core.audit.events() if e.action == "audit.reanchor"]
        assert json.loads(reanchored[0].parameters)["certificates"] == 3
    finally:
        gateway.close()


def test_an_older_backup_recovered_from_the_anchor_has_its_certificates_and_revocations(
    sqlite_core: Core, tmp_path: Path
) -> None:
    from helpers import ACTOR, create_root, create_sub

    from pkigate.core.model import RevocationReason

    core = sqlite_core
    issuing = create_sub(core, create_root(core))
    ca_id = issuing.record.id
    first = _issue(core, ca_id, 1)
    _backup(core.data_dir / "pkigate.db", tmp_path / "backup.db")
    later = _issue(core, ca_id, 2)
    core.revocation.revoke(ca_id, first[0], RevocationReason.keyCompromise, ACTOR)
    core.close()
    _put_back(tmp_path / "backup.db", core.data_dir / "pkigate.db")

    restored = Core.open(core.data_dir)
    try:
        with pytest.raises(PkigateError, match="behind its audit anchor"):
            restored.check_store()
        result = restored.audit.recover(ACTOR, restored.clock())
        assert (result.certificates, result.revocations) == (2, 1)
        restored.check_store()
        with restored.store.read() as conn:
            assert all(restored.store.get_certificate(conn, ca_id, s) for s in later)
            revoked = restored.store.get_certificate(conn, ca_id, first[0])
        assert revoked is not None and revoked.status == "REVOKED"
        assert restored.audit.verify().ok
        assert restored.audit.recover(ACTOR, restored.clock()).events == 0  # idempotent
    finally:
        restored.close()


def test_a_store_from_before_anchors_starts_one_and_a_deleted_anchor_is_flagged(
    sqlite_core: Core, monkeypatch: pytest.MonkeyPatch
) -> None:
    from helpers import create_root

    from pkigate.core import audit

    data_dir = sqlite_core.data_dir
    sqlite_core.close()
    # A version without the anchor wrote this store.
    monkeypatch.setattr(audit, "anchor_path", lambda _database: None)
    old = Core.open(data_dir)
    create_root(old)
    head = len(old.audit.events())
    old.close()
    monkeypatch.undo()

    upgraded = Core.open(data_dir)
    try:
        upgraded.check_store()  # not an error: the anchor starts at the current head
        started = upgraded.audit.events()[-1]
        assert started.action == "audit.anchor_started" and started.seq == head + 1
        assert _anchored_seqs(data_dir) == [head + 1]
        assert upgraded.audit.verify().ok
    finally:
        upgraded.close()

    _anchor(data_dir).unlink()
    deleted = Core.open(data_dir)
    try:
        with pytest.raises(PkigateError, match=r"audit anchor .* is missing"):
            deleted.check_store()
        assert not deleted.audit.verify().ok
    finally:
        deleted.close()
    assert _cli(data_dir, "audit", "reanchor", "--yes").exit_code == 0
    assert _cli(data_dir, "audit", "verify").exit_code == 0


def test_a_torn_last_anchor_line_is_ignored_and_a_damaged_middle_line_is_not(
    sqlite_core: Core,
) -> None:
    from helpers import create_root, create_sub

    core = sqlite_core
    ca_id = create_sub(core, create_root(core)).record.id
    _issue(core, ca_id, 2)
    anchor = _anchor(core.data_dir)
    whole = anchor.read_bytes()
    anchor.write_bytes(whole + b'{"event":{"seq":')  # the crash cut this write short
    core.check_store()
    _issue(core, ca_id, 1)
    seqs = _anchored_seqs(core.data_dir)  # every line whole again
    assert seqs == list(range(1, len(seqs) + 1))
    assert core.audit.verify().ok

    lines = anchor.read_bytes().splitlines(keepends=True)
    middle = len(lines) // 2
    lines[middle] = lines[middle].replace(b'"result":"success"', b'"result":"failure"')
    anchor.write_bytes(b"".join(lines))
    problems = core.audit.verify().problems
    assert any(f"line {middle + 1}" in p.detail for p in problems), problems


# -- a damaged page ------------------------------------------------------------------------


def test_a_damaged_page_is_named_in_one_line_by_serve_verify_and_cert_list(
    sqlite_core: Core,
) -> None:
    from helpers import create_root, create_sub

    core = sqlite_core
    ca_id = create_sub(core, create_root(core)).record.id
    serials = _issue(core, ca_id, 40)
    with core.store.read() as conn:
        der = core.store.get_certificate(conn, ca_id, serials[20]).der  # type: ignore[union-attr]
    data_dir = core.data_dir
    core.close()  # checkpointed: the pages are in the database file
    database = data_dir / "pkigate.db"
    content = bytearray(database.read_bytes())
    page_size = int.from_bytes(content[16:18], "big")
    page = content.index(der) // page_size
    content[page * page_size : (page + 1) * page_size] = b"\xa5" * page_size
    database.write_bytes(bytes(content))

    # Found by the integrity check at start and in verify, which name the file.
    assert f"the database {database} is damaged" in _start_refused(data_dir)
    assert f"the database {database} is damaged" in _one_line_error(
        _cli(data_dir, "audit", "verify")
    )
    assert "is damaged" in _one_line_error(_cli(data_dir, "cert", "list", "--ca", ca_id))


def test_readiness_polled_while_certificates_are_issued_never_sees_a_store_behind(
    sqlite_core: Core,
) -> None:
    """Found while writing the check: reading the head before the anchor, a commit and
    its anchor line landing in between looked like a store behind its anchor."""
    import threading

    from helpers import create_root, create_sub

    core = sqlite_core
    ca_id = create_sub(core, create_root(core)).record.id
    done = threading.Event()

    def issue() -> None:
        while not done.is_set():
            _issue(core, ca_id, 1)

    writers = [threading.Thread(target=issue) for _ in range(2)]
    for writer in writers:
        writer.start()
    try:
        states = {core.audit.anchor_status().state for _ in range(150)}
    finally:
        done.set()
        for writer in writers:
            writer.join()
    assert states <= {"ok", "anchor-behind"}, states


def test_a_crash_between_a_commit_and_its_anchor_line_is_caught_up_from_the_store(
    sqlite_core: Core,
) -> None:
    from helpers import create_root, create_sub

    core = sqlite_core
    ca_id = create_sub(core, create_root(core)).record.id
    serials = _issue(core, ca_id, 2)
    anchor = _anchor(core.data_dir)
    lines = anchor.read_bytes().splitlines(keepends=True)
    anchor.write_bytes(b"".join(lines[:-2]))  # committed, never anchored, never answered
    assert core.audit.anchor_status().state == "anchor-behind"
    core.check_store()  # what `pkigate serve` does at start
    caught_up = [json.loads(line.rpartition(b"\t")[0]) for line in anchor.read_bytes().splitlines()]
    assert [c["certificate"]["serial"] for c in caught_up[-2:]] == serials
    assert core.audit.anchor_status().state == "ok" and core.audit.verify().ok


def test_a_store_that_went_another_way_than_its_anchor_is_named_as_a_different_history(
    sqlite_core: Core, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from helpers import ACTOR, create_root, create_sub

    from pkigate.core import audit

    core = sqlite_core
    ca_id = create_sub(core, create_root(core)).record.id
    _backup(core.data_dir / "pkigate.db", tmp_path / "backup.db")
    _issue(core, ca_id, 1)
    core.close()
    _put_back(tmp_path / "backup.db", core.data_dir / "pkigate.db")
    # Written on by something that does not know the anchor (an older pkigate).
    monkeypatch.setattr(audit, "anchor_path", lambda _database: None)
    elsewhere = Core.open(core.data_dir)
    _issue(elsewhere, ca_id, 2)
    elsewhere.close()
    monkeypatch.undo()

    reopened = Core.open(core.data_dir)
    try:
        with pytest.raises(PkigateError, match="different histories") as refused:
            reopened.check_store()
        assert "pkigate audit reanchor" in refused.value.message
        assert [p.kind for p in reopened.audit.verify().problems] == ["edited"]
        with pytest.raises(PkigateError, match="different histories"):
            reopened.audit.recover(ACTOR, reopened.clock())
    finally:
        reopened.close()
