"""A PostgreSQL store's audit journals: each host keeps the events its processes committed,
so a store that lost its tail (a failover to a replica that lagged, an older backup put
back) is refused on the hosts that wrote what was lost, named by `audit verify`, and put
back by `audit recover` on each of them."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner, Result
from helpers import ACTOR, fresh_postgres_database, make_csr

from pkigate.core import Core, IssuanceRequest, Requester, Validity
from pkigate.core.errors import PkigateError
from pkigate.gateways.app import create_app
from pkigate.gateways.cli import main
from pkigate.gateways.config import GatewayConfig, parse_config
from pkigate.gateways.runtime import Gateway

JOURNAL = "pkigate-audit-journal.jsonl"  # in each host's data directory


@dataclass
class Hosts:
    url: str
    a: Core
    b: Core
    ca_id: str


def _config(data_dir: Path, url: str) -> GatewayConfig:
    return parse_config(f"data_dir = '{data_dir}'\ndatabase_url = '{url}'")


@pytest.fixture
def hosts(postgres_server: str, tmp_path: Path) -> Iterator[Hosts]:
    """Two hosts (data directories) on one database, sharing the key-encryption key."""
    url = fresh_postgres_database(postgres_server)
    config = _config(tmp_path / "a", url)
    first = Gateway.open(config, bootstrap=True)  # what `pkigate serve` does on host A
    (tmp_path / "b").mkdir(mode=0o700)
    shutil.copy2(tmp_path / "a" / "kek", tmp_path / "b" / "kek")
    b = Core.open(tmp_path / "b", url)
    yield Hosts(url, first.core, b, first.ca_ids[config.cas[-1].name])
    first.close()
    b.close()


def _issue(core: Core, ca_id: str, count: int) -> list[str]:
    return [
        core.issue(
            IssuanceRequest(ca_id, make_csr(), Validity.parse("1d"), Requester("tester"))
        ).serial
        for _ in range(count)
    ]


def _head(url: str) -> tuple[int, str, str]:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT seq, mac, head_mac FROM audit_head").fetchone()
    assert row is not None
    return int(row[0]), str(row[1]), str(row[2])


def _lose_tail(url: str, head: tuple[int, str, str], serials: list[str]) -> None:
    """What a replica that lagged at ``head`` lacks: the later events, their certificates."""
    with psycopg.connect(url) as conn:
        conn.execute("DELETE FROM certificates WHERE serial = ANY(%s)", (serials,))
        conn.execute("DELETE FROM audit_events WHERE seq > %s", (head[0],))
        conn.execute("UPDATE audit_head SET seq = %s, mac = %s, head_mac = %s", head)


def _cli(core: Core, url: str, *args: str) -> Result:
    runner = CliRunner(env={"PKIGATE_DATABASE_URL": None, "PKIGATE_HOME": None})
    return runner.invoke(main, ["--data-dir", str(core.data_dir), "--database-url", url, *args])


def _stored(core: Core, ca_id: str, serials: list[str]) -> bool:
    with core.store.read() as conn:
        return all(core.store.get_certificate(conn, ca_id, s) is not None for s in serials)


def _journaled_seqs(core: Core) -> set[int]:
    lines = (core.data_dir / JOURNAL).read_bytes().splitlines()
    return {json.loads(line.rpartition(b"\t")[0])["event"]["seq"] for line in lines}


def test_the_host_whose_events_a_lagging_replica_lacks_is_refused_named_and_recovered(
    hosts: Hosts,
) -> None:
    a, b, ca_id = hosts.a, hosts.b, hosts.ca_id
    _issue(a, ca_id, 2)
    _issue(b, ca_id, 2)
    replica = _head(hosts.url)
    lost = _issue(b, ca_id, 3)
    last = _head(hosts.url)[0]
    assert set(range(replica[0] + 1, last + 1)) <= _journaled_seqs(b)
    _lose_tail(hosts.url, replica, lost)
    span = f"audit events {replica[0] + 1}..{last}"
    # Worker processes of one host append without a common lock: lines out of sequence
    # order, and a last line a crash cut short, are read as they come.
    journal = b.data_dir / JOURNAL
    lines = journal.read_bytes().splitlines(keepends=True)
    shuffled = journal.with_name("shuffled")
    shuffled.write_bytes(b"".join(reversed(lines)) + b'{"event":{"seq":')
    shuffled.replace(journal)

    # Host A wrote none of the lost events: nothing to say, and it keeps serving.
    a.check_store()
    assert a.audit.anchor_status().trusted and a.audit.verify().ok

    with pytest.raises(PkigateError, match="behind this host's audit journal") as refused:
        b.check_store()
    assert span in refused.value.message
    assert "(3 issued certificates among them)" in refused.value.message
    assert "pkigate audit recover" in refused.value.message
    worker = Gateway.open(_config(b.data_dir, hosts.url))  # a worker of `pkigate serve`
    try:
        ready = create_app(worker, "http").test_client().get("/readyz")
        assert ready.status_code == 503
        assert span in ready.json["error"]["message"]
    finally:
        worker.close()
    with pytest.raises(PkigateError, match="behind this host's audit journal"):
        _issue(b, ca_id, 1)  # not written over the lost events' numbers from this host

    verify = _cli(b, hosts.url, "audit", "verify")
    assert verify.exit_code == 1
    assert f"event {replica[0] + 1}: truncated: {span}" in verify.stdout, verify.stdout

    recover = _cli(b, hosts.url, "audit", "recover")
    assert recover.exit_code == 0, recover.stderr
    assert f"recovered {span}" in recover.stdout and "3 certificates" in recover.stdout
    again = _cli(b, hosts.url, "audit", "recover")
    assert again.exit_code == 0 and "nothing to recover" in again.stdout, again.stdout
    assert _cli(b, hosts.url, "audit", "verify").exit_code == 0

    b.check_store()
    a.check_store()
    worker = Gateway.open(_config(b.data_dir, hosts.url))
    try:
        assert create_app(worker, "http").test_client().get("/readyz").status_code == 200
    finally:
        worker.close()
    assert _stored(b, ca_id, lost)
    assert journal.read_bytes().endswith(b"\n")  # the torn line was cut off, not continued
    recovery = [e for e in b.audit.events() if e.action == "audit.recover"]
    assert len(recovery) == 1 and json.loads(recovery[0].parameters)["certificates"] == 3
    assert _issue(b, ca_id, 1) and _issue(a, ca_id, 1)
    assert a.audit.verify().ok and b.audit.verify().ok


def test_lost_events_of_two_hosts_are_recovered_on_each_and_the_certificates_all_come_back(
    hosts: Hosts,
) -> None:
    a, b, ca_id = hosts.a, hosts.b, hosts.ca_id
    _issue(a, ca_id, 1)
    replica = _head(hosts.url)
    first_b = _issue(b, ca_id, 1)
    lost_a = _issue(a, ca_id, 1)
    second_b = _issue(b, ca_id, 1)
    _lose_tail(hosts.url, replica, first_b + lost_a + second_b)

    for host in (a, b):
        with pytest.raises(PkigateError, match="behind this host's audit journal"):
            host.check_store()

    # B's first event follows the store's head: back in the chain. Its second comes after
    # A's: only its certificate goes back, and the recovery says so.
    on_b = b.audit.recover(ACTOR, b.clock())
    assert on_b.events >= 1 and on_b.first_seq == replica[0] + 1
    assert on_b.certificates == 2 and on_b.outside_chain
    b.check_store()

    # B's recovery took the numbers of A's lost events: A puts back its certificate.
    with pytest.raises(PkigateError, match="not the store's"):
        a.check_store()
    with pytest.raises(PkigateError, match="not the store's"):
        _issue(a, ca_id, 1)  # a new event would bury the lost ones: the alarm would be gone
    on_a = a.audit.recover(ACTOR, a.clock())
    assert (on_a.events, on_a.certificates) == (0, 1) and on_a.outside_chain
    a.check_store()
    b.check_store()

    assert _stored(a, ca_id, first_b + lost_a + second_b)
    assert a.audit.verify().ok and b.audit.verify().ok
    recoveries = [json.loads(e.parameters) for e in a.audit.events() if e.action == "audit.recover"]
    assert all(r["outside_chain"] and r["superseded"] for r in recoveries)
    for host in (a, b):  # kept, not deleted: what went back only as certificates
        assert list(host.data_dir.glob(f"{JOURNAL}.superseded-*"))
    assert _issue(a, ca_id, 1) and _issue(b, ca_id, 1)


def test_a_journal_line_damaged_after_it_was_read_is_named_by_verify(hosts: Hosts) -> None:
    a = hosts.a
    _issue(a, hosts.ca_id, 2)
    assert a.audit.anchor_status().trusted  # read once: readiness reads only what is new
    journal = a.data_dir / JOURNAL
    content = journal.read_bytes()
    with open(journal, "r+b") as handle:  # in place, as a failing disk would
        handle.write(content.replace(b'"result":"success"', b'"result":"failure"', 1))
    problems = a.audit.verify().problems
    assert any("damaged" in p.detail for p in problems), problems

    refused = _cli(a, hosts.url, "audit", "verify")  # what a host starting again reads
    assert refused.exit_code != 0 and "is damaged" in refused.output, refused.output
    assert _cli(a, hosts.url, "audit", "reanchor", "--yes").exit_code == 0
    assert list(a.data_dir.glob(f"{JOURNAL}.superseded-*"))  # kept, not deleted
    assert _cli(a, hosts.url, "audit", "verify").exit_code == 0
    a.check_store()
