"""Server CPU per certificate issued through the management API.

Starts ``pkigate serve --workers W`` in a fresh data directory (embedded default: SQLite,
the demo issuing CA), makes N EC P-256 CSRs, then issues them with
``POST /api/v1/cas/<issuing CA>/certificates`` over HTTPS from C client threads (one
keep-alive session each), after a warm-up of a few requests per thread. It prints
certificates/s, and the server's CPU seconds per certificate (utime + stime of every
process of the server's tree, from /proc/<pid>/stat, read before and after the timed
requests), with the load average beside it (other processes share the machine).

Then, on the same sessions and server, the same number of requests that issue nothing:
``GET /healthz`` (the serving layer alone: TLS record, HTTP parse, WSGI, logging) and
``GET /api/v1/cas/<id>`` with the token (plus authentication and one store read). Their
server CPU per request is the floor under the issuance figure: what a certificate costs
beyond it is building, signing, storing and auditing it.

    .venv/bin/python bench/api_issue.py [--certificates N] [--clients C] [--workers W]
        [--warmup K] [--pause S]

``--pause S`` waits S seconds once the warm-up is done (time to attach ``py-spy``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from _peers import cpu_seconds, process_tree, server_cpu_per_get  # noqa: E402
from serving import start_server  # noqa: E402


def csr_pem(name: str) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--certificates", type=int, default=400)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--pause", type=float, default=0.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pkigate-api-bench-") as scratch:
        server = start_server(Path(scratch) / "data", workers=args.workers)
        try:
            session = server.session(server.admin_token)
            token = session.post(
                f"{server.https_url}/api/v1/tokens",
                json={"name": "api-bench", "role": "issuer"},
                timeout=30,
            ).json()["secret"]
            cas = session.get(f"{server.https_url}/api/v1/cas", timeout=30).json()["cas"]
            issuing = next(c["id"] for c in cas if c["type"] == "SUBORDINATE")
            url = f"{server.https_url}/api/v1/cas/{issuing}/certificates"
            total = args.certificates + args.warmup * args.clients
            csrs = [csr_pem(f"api-bench-{n}.example.test") for n in range(total)]
            failures: list[str] = []
            lock = threading.Lock()
            queue = iter(csrs)

            def client(count: int | None) -> None:
                own = server.session(token)
                done = 0
                while count is None or done < count:
                    with lock:
                        csr = next(queue, None)
                    if csr is None:
                        return
                    response = own.post(url, json={"csr": csr}, timeout=60)
                    if response.status_code != 201:
                        failures.append(f"{response.status_code} {response.text[:200]}")
                    done += 1

            def run(count: int | None) -> None:
                threads = [
                    threading.Thread(target=client, args=(count,)) for _ in range(args.clients)
                ]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()

            run(args.warmup)
            if args.pause:
                print(f"server pid {server.process.pid}: pausing {args.pause}s", flush=True)  # type: ignore[union-attr]
                time.sleep(args.pause)
            assert server.process is not None
            pids = process_tree(server.process.pid)
            load_before = Path("/proc/loadavg").read_text().split()[:3]
            cpu_before = cpu_seconds(pids)
            began = time.perf_counter()
            run(None)
            elapsed = time.perf_counter() - began
            cpu = cpu_seconds(pids) - cpu_before
            load_after = Path("/proc/loadavg").read_text().split()[:3]
            print(
                f"{args.certificates} certificates, {args.clients} clients, "
                f"{args.workers} workers: {args.certificates / elapsed:.1f}/s, "
                f"server CPU {cpu * 1000 / args.certificates:.2f} ms/certificate; "
                f"failures {len(failures)}; loadavg {' '.join(load_before)} -> "
                f"{' '.join(load_after)}"
            )
            for failure in failures[:5]:
                print("  ", failure)
            for label, path, auth in (
                ("GET /healthz", "/healthz", token),
                ("GET /api/v1/cas/<id> (token)", f"/api/v1/cas/{issuing}", token),
            ):
                per_request = server_cpu_per_get(
                    f"{server.https_url}{path}",
                    partial(server.session, auth),
                    args.certificates,
                    args.clients,
                    pids,
                )
                print(f"floor: {label}: server CPU {per_request * 1000:.2f} ms/request")
            return 1 if failures else 0
        finally:
            server.stop()


if __name__ == "__main__":
    requests.packages.urllib3.disable_warnings()  # type: ignore[attr-defined]
    sys.exit(main())
