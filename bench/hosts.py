"""Management-API issuance with one host, then two hosts sharing one PostgreSQL, in one run.

One run starts a private PostgreSQL cluster (``fsync`` on; or uses ``--database-url``, a
server on which it creates, then drops, one database) and ``pkigate serve`` processes on
free loopback ports, each with ``workers = 1``, its own data directory and the same
key-encryption key (``PKIGATE_KEK``, generated for the run), all on that one database: an EC
P-256 root named ``api`` that signs leaves itself (as the "API sign CSR" row of
``bench/protocols.py``), the HTTPS listener's certificate from it.

* one host: N issuances (``POST /api/v1/cas/<id>/certificates``, an issuer token, TLS, one
  keep-alive session per client thread) from C client threads;
* two hosts: the second ``pkigate serve`` started beside the first, then N more issuances
  with the C threads spread over both (thread k talks to host k mod 2).

The load generator, the operation and its checks are ``bench/protocols.py``'s (``drive``,
``pkigate_api_load``: each certificate's SAN, key and signature checked). For each it
prints operations/s, p50/p95 latency, the CPU time per operation of the pkigate process
trees and of PostgreSQL's (when the run started it), and the ratio two hosts/one host.
Afterwards it checks, through the store, that every certificate issued has a serial of its
own and that the audit chain verifies (``pkigate audit verify`` against the database).

    .venv/bin/python bench/hosts.py [--quick] [--operations N] [--clients C]
        [--database-url postgresql://USER@HOST:PORT] [--json FILE]

Full run: N=400, C=8; ``--quick``: N=40, C=4. On one machine the two hosts share its CPUs
(and PostgreSQL's), so the ratio says what a second process adds there, not what a second
machine would. These are figures, not a test: the script exits non-zero only when an
operation failed, a serial was issued twice or the audit chain does not verify.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "tests"))
from _peers import (  # noqa: E402
    API_CA_NAME,
    ApiServer,
    PostgresServer,
    cpu_seconds,
    drop_database,
    fresh_database,
    trees,
)
from protocols import Run, acme_orders, drive, pkigate_api_load  # noqa: E402

from pkigate.devsim.spawn import pkigate_command  # noqa: E402

FULL_OPERATIONS, QUICK_OPERATIONS = 400, 40
FULL_CLIENTS, QUICK_CLIENTS = 8, 4
WARMUP_PER_CLIENT = 2


def progress(message: str) -> None:
    print(f"... {message}", file=sys.stderr, flush=True)


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def host_config(data_dir: Path, http_port: int, https_port: int, database_url: str) -> str:
    return f"""\
data_dir = "{data_dir}"
database_url = "{database_url}"
workers = 1
# The management API only: the operation measured needs no protocol connector.
connectors = []

[listeners]
http = "127.0.0.1:{http_port}"
https = "127.0.0.1:{https_port}"

[[cas]]
name = "{API_CA_NAME}"
type = "ROOT"
subject = "CN=pkigate bench hosts Root,O=pkigate bench"
key_algorithm = "EC_prime256v1"
"""


class Host(ApiServer):
    """One ``pkigate serve`` (workers = 1) on the shared database."""

    def __init__(self, base_dir: Path, database_url: str, kek: str) -> None:
        super().__init__(base_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.environment = {"PKIGATE_KEK": kek}
        self.database_url = database_url
        # Only the host that made the store writes the first admin token; the others are
        # driven with that one (the tokens are in the shared database).
        self.admin_token: str | None = None
        self.config.write_text(
            host_config(self.data_dir, self.http_port, self.https_port, database_url)
        )

    @property
    def token(self) -> str:
        return self.admin_token or super().token


def audit_verify(host: Host) -> tuple[bool, str]:
    """``pkigate audit verify`` against the shared database, with the run's KEK."""
    verified = subprocess.run(
        [
            *pkigate_command(),
            "--data-dir",
            str(host.data_dir),
            "--database-url",
            host.database_url,
            "audit",
            "verify",
        ],
        env={**os.environ, **host.environment},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    return verified.returncode == 0, (verified.stdout + verified.stderr).strip()[-400:]


def distinct_serials(database_url: str) -> tuple[int, int]:
    """(certificates stored, distinct (CA, serial) pairs) in the shared database."""
    import psycopg

    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*), count(DISTINCT (ca_id, serial)) FROM certificates"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def measure(
    hosts: Sequence[Host],
    ca_id: str,
    operations: int,
    clients: int,
    run_id: str,
    postgres_pid: int | None,
) -> tuple[Run, float | None]:
    """N issuances spread over ``hosts``; the run and PostgreSQL's CPU seconds in it."""
    orders = acme_orders(operations + clients * WARMUP_PER_CLIENT, run_id)
    warmup, items = orders[: clients * WARMUP_PER_CLIENT], orders[clients * WARMUP_PER_CLIENT :]
    load = pkigate_api_load(hosts[0], ca_id, items, warmup, hosts=hosts)
    pids = [h.process.pid for h in hosts if h.process is not None]
    progress(f"{len(hosts)} host(s): {operations} issuances from {clients} client threads")
    # Backends are forked per connection: counting the tree at the end catches them all
    # (a backend that exited during the run is lost; the pools keep theirs open).
    before = cpu_seconds(trees([postgres_pid])) if postgres_pid else 0.0
    run = drive(load, clients, pids)
    postgres_cpu = cpu_seconds(trees([postgres_pid])) - before if postgres_pid else None
    return run, postgres_cpu


def row(label: str, run: Run, postgres_cpu: float | None) -> dict[str, Any]:
    summary = run.summary()
    done = max(run.succeeded, 1)
    summary["label"] = label
    summary["postgres_cpu_ms_per_op"] = (
        round(postgres_cpu / done * 1000, 1) if postgres_cpu is not None else None
    )
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized: N=40, C=4")
    parser.add_argument("--operations", type=int, help=f"N per row (default {FULL_OPERATIONS})")
    parser.add_argument("--clients", type=int, help=f"client threads (default {FULL_CLIENTS})")
    parser.add_argument(
        "--database-url", help="postgresql://USER@HOST:PORT where a database may be made"
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures here")
    args = parser.parse_args(argv)
    operations = args.operations or (QUICK_OPERATIONS if args.quick else FULL_OPERATIONS)
    clients = args.clients or (QUICK_CLIENTS if args.quick else FULL_CLIENTS)
    if operations < 1 or clients < 1:
        parser.error("need --operations >= 1 and --clients >= 1")
    figures: dict[str, Any] = {
        "operations": operations,
        "clients": clients,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_average_before": load_average(),
        "commands": {},
    }
    run_id = secrets.token_hex(3)
    kek = secrets.token_bytes(32).hex()
    began = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory(prefix="pkigate-bench-hosts-") as scratch_name,
        ExitStack() as stack,
    ):
        scratch = Path(scratch_name)
        server = args.database_url
        postgres_pid = None
        if not server:
            cluster = PostgresServer()
            stack.callback(cluster.stop)
            progress("starting a private PostgreSQL cluster")
            cluster.start()
            server = cluster.url
            postgres_pid = cluster.pid
            figures["commands"]["postgresql"] = cluster.command
        database_url = fresh_database(server)
        stack.callback(drop_database, server, database_url)
        figures["database"] = database_url.rpartition("@")[2]

        first = Host(scratch / "host1", database_url, kek)
        stack.callback(first.stop)
        progress(f"starting {' '.join(first.command)}")
        first.start()
        figures["commands"]["host"] = (
            f"PKIGATE_KEK=<run's> {' '.join(first.command)} (workers = 1; config: "
            "bench/hosts.py host_config)"
        )
        ca_id = first.ca_id(API_CA_NAME)
        one_run, one_pg = measure([first], ca_id, operations, clients, f"{run_id}a", postgres_pid)
        rows.append(row("one host", one_run, one_pg))

        second = Host(scratch / "host2", database_url, kek)
        second.admin_token = first.token
        stack.callback(second.stop)
        progress("starting the second host on the same database")
        second.start()
        if second.ca_id(API_CA_NAME) != ca_id:
            raise SystemExit("the second host made a CA of its own instead of sharing the first's")
        two_run, two_pg = measure(
            [first, second], ca_id, operations, clients, f"{run_id}b", postgres_pid
        )
        rows.append(row("two hosts", two_run, two_pg))
        second.stop()
        first.stop()

        progress("checking serials and the audit chain")
        stored, distinct = distinct_serials(database_url)
        chain_ok, verify_output = audit_verify(first)
        figures.update(
            stored=stored,
            distinct_serials=distinct,
            audit_chain_ok=chain_ok,
            audit_verify_output=verify_output,
        )
    figures["rows"] = rows
    figures["ratio_two_to_one"] = round(two_run.per_s / one_run.per_s, 3) if one_run.per_s else None
    figures["load_average_after"] = load_average()
    figures["seconds"] = round(time.perf_counter() - began, 1)
    report(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    failed = any(r["failed"] or r["duplicate_serials"] for r in rows)
    return 1 if failed or stored != distinct or not chain_ok else 0


def report(figures: dict[str, Any]) -> None:
    print(
        f"Management-API issuance, one host vs two hosts on one PostgreSQL "
        f"({figures['database']}): N={figures['operations']} per row from "
        f"C={figures['clients']} client threads; each host `pkigate serve`, workers = 1; "
        f"{figures['cpus']} CPUs (both hosts and PostgreSQL on this machine); "
        f"Python {figures['python']}"
    )
    print(
        f"load average before {figures['load_average_before']}, after "
        f"{figures['load_average_after']} (a shared machine)"
    )
    print(
        f"  {'':10} {'ok/N':>9} {'ops/s':>7} {'p50 ms':>7} {'p95 ms':>7} {'srv ms/op':>9} "
        f"{'pg ms/op':>8} {'srv CPU%':>8} {'cli ms/op':>9}"
    )
    for r in figures["rows"]:
        pg = r["postgres_cpu_ms_per_op"]
        print(
            f"  {r['label']:10} {r['succeeded']:>4}/{r['attempted']:<4} {r['per_s']:>7.1f} "
            f"{r['p50_ms']:>7.0f} {r['p95_ms']:>7.0f} {r['server_cpu_ms_per_op']:>9.1f} "
            f"{'-' if pg is None else f'{pg:.1f}':>8} {r['server_cpu_percent']:>8.0f} "
            f"{r['client_cpu_ms_per_op']:>9.1f}"
        )
        for name, count in r["failures"].items():
            print(f"    FAILED: {count} x {name}")
    print(f"  two hosts / one host: {figures['ratio_two_to_one']}x ops/s")
    print(
        f"  store: {figures['stored']} certificates, {figures['distinct_serials']} distinct "
        f"(CA, serial); audit chain "
        f"{'verifies' if figures['audit_chain_ok'] else 'DOES NOT VERIFY'}"
    )
    print("  srv ms/op: CPU of the pkigate process trees per issuance; pg: PostgreSQL's;")
    print("  cli: this process (TLS clients, checks), on the same CPUs")
    print("Commands:")
    for name, command in figures["commands"].items():
        print(f"  {name}: {command}")
    print(f"({figures['seconds']} s in all)")


if __name__ == "__main__":
    sys.exit(main())
