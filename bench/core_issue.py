"""How close ``core.issue()`` comes to the raw signing limit of ``cryptography``.

For each issuing-CA key type (a root and an issuing CA of that type, in a fresh data
directory) this pre-generates N CSRs (P-256 keys, CN + DNS SAN; not timed), then measures:

* issued/s: ``core.issue()`` in-process with each thread count (default 1, 8 and 32);
  every certificate is stored, audited and committed durably (SQLite WAL,
  ``synchronous=FULL``, by default); threads issuing at once share fsyncs (group commit);
* raw/s: building and signing the same certificate with ``cryptography`` alone (same
  issuer, subject, SAN and extension set as pkigate produces: BC, KU, EKU, SAN, SKI, AKI;
  same CA private key and hash), with the same thread counts;

and prints both and the ratio issued/raw for every thread count, then the best thread
count. A key type ``ALGORITHM@pkcs11`` (by default ``EC_prime256v1@pkcs11``) puts the
root and issuing CA keys on a SoftHSM2 token made for the run in the scratch directory;
raw/s is then ``cryptography`` building the certificate and the token signing it, and the
summary gives the token row's best issued/s as a ratio of the same algorithm in software
(the row is left out, saying so, where SoftHSM2 is not installed).

Because ``cryptography`` holds the GIL while it builds a certificate, raw/s does not grow
with threads (it falls); so the summary also divides the best issued/s by the best raw/s
at any thread count, the stricter comparison. Each thread count issues the N
CSRs in R paired rounds (issue a slice, then raw-sign the same slice), and the ratio is the
median of the per-round ratios, which is much steadier on a shared VM than either rate. At
the end it checks that the store holds exactly the certificates issued, with distinct
serials, and that the audit chain verifies.

    .venv/bin/python bench/core_issue.py [--count N] [--threads T[,T...]] [--database-url URL]
        [--rounds R] [--data-dir DIR] [--key-types EC_prime256v1,RSA_2048,EC_prime256v1@pkcs11]
        [--json]

These are figures, not a test: the script exits non-zero only when the store or the audit
chain disagrees with what was issued.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cryptography
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID, NameOID

from pkigate.core import (
    Actor,
    CASpec,
    CAType,
    Core,
    IssuanceRequest,
    KeyAlgorithm,
    Requester,
    Validity,
)
from pkigate.core.keys import KeyStorage
from pkigate.core.names import parse_dn
from pkigate.core.pkcs11 import Pkcs11Settings
from pkigate.core.signing import sign_certificate

DEFAULT_COUNT = 2000
DEFAULT_THREADS = (1, 8, 32)
DEFAULT_ROUNDS = 5
DEFAULT_KEY_TYPES = ("EC_prime256v1", "RSA_2048", "EC_prime256v1@pkcs11")
TOKEN_SUFFIX = "@pkcs11"  # noqa: S105 - a key type's suffix, not a password
SOFTHSM_MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")
TOKEN_PIN_ENV = "PKIGATE_BENCH_PKCS11_PIN"  # noqa: S105 - the variable's name
RAW_MIN_SECONDS = 0.2  # per round; raw signing is fast, so repeat the slice until this long
TARGET_RATIO = 0.25  # issue 2: issued/raw for EC_prime256v1 on SQLite
WARM_UP_ISSUES = 5  # load the CA's signing material and the store's connections first
VALIDITY = "30d"
ISSUE_ACTION = "certificate.issue"


@dataclass(frozen=True)
class Measurement:
    """One thread count for one CA key type: medians over paired rounds.

    Each round issues one slice of the CSRs and then raw-signs the same slice, so the
    ratio is taken between two measurements seconds apart: on a noisy virtual machine the
    per-round ratio is much steadier than either rate on its own.
    """

    key_type: str
    threads: int
    certificates: int
    rounds: int
    issued_per_s: float  # median over rounds
    raw_per_s: float  # build + sign + DER, median over rounds
    ratio: float  # median of the per-round issued/raw ratios
    ratio_min: float
    ratio_max: float
    # For context: the core must also verify each CSR's signature, which raw/s leaves out.
    raw_with_csr_check_per_s: float
    ratio_with_csr_check: float


@dataclass(frozen=True)
class Verification:
    key_type: str
    issued: int
    distinct_serials: int
    stored: int
    audit_issue_events: int
    audit_events_total: int
    audit_chain_ok: bool

    @property
    def ok(self) -> bool:
        return (
            self.audit_chain_ok
            and self.issued == self.distinct_serials == self.stored == self.audit_issue_events
        )


@dataclass(frozen=True)
class Best:
    """For one CA key type: the thread count that did best, and the stricter comparison."""

    key_type: str
    threads: int  # the thread count with the highest median issued/raw
    ratio: float  # its issued/raw (both at that thread count)
    issued_per_s: float  # the highest issued/s at any thread count
    issued_threads: int
    raw_per_s: float  # the highest raw/s at any thread count (usually 1 thread)
    raw_threads: int
    ratio_to_best_raw: float  # issued_per_s / raw_per_s


def best_of(measurements: Sequence[Measurement]) -> list[Best]:
    summary = []
    for key_type in dict.fromkeys(m.key_type for m in measurements):
        rows = [m for m in measurements if m.key_type == key_type]
        by_ratio = max(rows, key=lambda m: m.ratio)
        by_issued = max(rows, key=lambda m: m.issued_per_s)
        by_raw = max(rows, key=lambda m: m.raw_per_s)
        summary.append(
            Best(
                key_type,
                by_ratio.threads,
                by_ratio.ratio,
                by_issued.issued_per_s,
                by_issued.threads,
                by_raw.raw_per_s,
                by_raw.threads,
                by_issued.issued_per_s / by_raw.raw_per_s,
            )
        )
    return summary


def parse_thread_counts(text: str) -> list[int]:
    """``"8"`` means 1 and 8 threads (as before); ``"1,8,32"`` means exactly those."""
    counts = [int(part) for part in text.split(",") if part.strip()]
    if len(counts) == 1 and counts[0] != 1:
        counts = [1, *counts]
    return sorted(set(counts))


def make_csrs(count: int) -> list[x509.CertificateSigningRequest]:
    """N requests for distinct P-256 keys, each with a CN and the same name as DNS SAN."""
    csrs = []
    for index in range(count):
        key = ec.generate_private_key(ec.SECP256R1())
        name = f"host{index}.bench.example"
        csrs.append(
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256())
        )
    return csrs


def run_threads(work: Sequence[Any], threads: int, one: Callable[[Any], object]) -> float:
    """Split ``work`` over ``threads`` threads calling ``one`` per item; wall seconds."""
    chunks = [work[i::threads] for i in range(threads)]
    start = threading.Barrier(threads + 1)
    errors: list[BaseException] = []

    def worker(chunk: Sequence[Any]) -> None:
        start.wait()
        try:
            for item in chunk:
                one(item)
        except BaseException as exc:  # reported after the join, not lost in the thread
            errors.append(exc)

    pool = [threading.Thread(target=worker, args=(chunk,)) for chunk in chunks]
    for thread in pool:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in pool:
        thread.join()
    elapsed = time.perf_counter() - began
    if errors:
        raise errors[0]
    return elapsed


def rate(
    work: Sequence[Any], threads: int, one: Callable[[Any], object], min_seconds: float = 0.0
) -> float:
    """Items per second, repeating the whole of ``work`` until ``min_seconds`` have passed."""
    done, elapsed = 0, 0.0
    while True:
        elapsed += run_threads(work, threads, one)
        done += len(work)
        if elapsed >= min_seconds:
            return done / elapsed


class RawSigner:
    """The same certificate as pkigate issues, built and signed with ``cryptography`` alone.

    The template's extensions (BC, KU, EKU) and the CA's AKI are copied from a certificate
    pkigate issued, so both paths sign identical extension sets; SAN, SKI, serial and the
    public key are computed per request, as the core does.
    """

    def __init__(self, core: Core, ca_id: str, sample: x509.Certificate) -> None:
        material = core.authorities.signing_material(ca_id, datetime.now(UTC))
        self._private_key = material.private_key
        self._hash = material.signing_algorithm.hash_algorithm()
        self._issuer = material.certificate.subject
        self._lifetime = sample.not_valid_after_utc - sample.not_valid_before_utc
        # Extension order and criticality as pkigate emits them; values for the
        # per-request ones (SAN, SKI) are filled in by sign().
        self._layout = [(e.oid, e.critical) for e in sample.extensions]
        self._fixed = {e.oid: e.value for e in sample.extensions}

    def sign(self, csr: x509.CertificateSigningRequest) -> x509.Certificate:
        now = datetime.now(UTC)
        public_key = csr.public_key()
        per_request: dict[x509.ObjectIdentifier, x509.ExtensionType] = {
            ExtensionOID.SUBJECT_ALTERNATIVE_NAME: csr.extensions.get_extension_for_class(
                x509.SubjectAlternativeName
            ).value,
            ExtensionOID.SUBJECT_KEY_IDENTIFIER: x509.SubjectKeyIdentifier.from_public_key(
                public_key
            ),
        }
        builder = x509.CertificateBuilder(
            issuer_name=self._issuer,
            subject_name=csr.subject,
            public_key=public_key,
            serial_number=x509.random_serial_number(),
            not_valid_before=now,
            not_valid_after=now + self._lifetime,
        )
        for oid, critical in self._layout:
            builder = builder.add_extension(per_request.get(oid) or self._fixed[oid], critical)
        certificate = sign_certificate(builder, self._private_key, self._hash)
        certificate.public_bytes(serialization.Encoding.DER)
        return certificate

    def sign_checked(self, csr: x509.CertificateSigningRequest) -> x509.Certificate:
        """As :meth:`sign`, after verifying the CSR's self-signature as the core must."""
        if not csr.is_signature_valid:
            raise ValueError("CSR signature does not verify")
        return self.sign(csr)

    def check_same_shape(self, csr: x509.CertificateSigningRequest) -> None:
        raw = [(e.oid, e.critical) for e in self.sign(csr).extensions]
        if raw != self._layout:
            raise SystemExit(
                f"raw certificate extensions {raw} differ from pkigate's {self._layout}"
            )


def create_hierarchy(core: Core, key_type: str) -> str:
    algorithm = KeyAlgorithm(key_type.removesuffix(TOKEN_SUFFIX))
    storage = KeyStorage.PKCS11 if key_type.endswith(TOKEN_SUFFIX) else KeyStorage.SOFTWARE
    actor = Actor("bench")
    root = core.authorities.create(
        CASpec(
            CAType.ROOT,
            parse_dn(f"CN=bench root {key_type}"),
            key_algorithm=algorithm,
            key_storage=storage,
        ),
        actor,
    )
    issuing = core.authorities.create(
        CASpec(
            CAType.SUBORDINATE,
            parse_dn(f"CN=bench issuing {key_type}"),
            key_algorithm=algorithm,
            parent_ca_id=root.record.id,
            key_storage=storage,
        ),
        actor,
    )
    return issuing.record.id


def softhsm_token(scratch: Path) -> Pkcs11Settings | None:
    """A SoftHSM2 token of the run's own (its configuration in ``scratch``, set in this
    process's environment before the library is first loaded); None without SoftHSM2."""
    if not SOFTHSM_MODULE.exists() or shutil.which("softhsm2-util") is None:
        return None
    tokens = scratch / "softhsm-tokens"
    tokens.mkdir()
    conf = scratch / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    os.environ[TOKEN_PIN_ENV] = pin = secrets.token_hex(4)
    subprocess.run(
        [
            *("softhsm2-util", "--init-token", "--free", "--label", "pkigate-bench"),
            *("--pin", pin, "--so-pin", secrets.token_hex(4)),
        ],
        check=True,
        capture_output=True,
    )
    return Pkcs11Settings(SOFTHSM_MODULE, "pkigate-bench", pin_env=TOKEN_PIN_ENV)


def bench_key_type(
    key_type: str,
    csrs: list[x509.CertificateSigningRequest],
    thread_counts: Sequence[int],
    rounds: int,
    data_dir: Path,
    database_url: str | None,
    progress: Callable[[str], None],
    pkcs11: Pkcs11Settings | None = None,
) -> tuple[list[Measurement], Verification]:
    core = Core.open(data_dir, database_url=database_url, pkcs11=pkcs11)
    try:
        ca_id = create_hierarchy(core, key_type)
        validity = Validity.parse(VALIDITY)
        requester = Requester("bench", connector="bench")
        serials: list[str] = []
        serials_lock = threading.Lock()

        def issue(csr: x509.CertificateSigningRequest) -> x509.Certificate:
            issued = core.issue(IssuanceRequest(ca_id, csr, validity, requester))
            with serials_lock:
                serials.append(issued.serial)
            return issued.certificate

        sample = None
        for csr in csrs[:WARM_UP_ISSUES]:
            sample = issue(csr)
        assert sample is not None
        raw = RawSigner(core, ca_id, sample)
        raw.check_same_shape(csrs[0])
        for csr in csrs[:WARM_UP_ISSUES]:
            raw.sign(csr)

        results = []
        for threads in thread_counts:
            progress(
                f"{key_type}: {len(csrs)} issues and raw signatures with {threads} "
                f"thread(s), {rounds} rounds"
            )
            issued_rates, raw_rates, checked_rates = [], [], []
            for index in range(rounds):
                chunk = csrs[index::rounds]
                issued_rates.append(rate(chunk, threads, issue))
                raw_rates.append(rate(chunk, threads, raw.sign, RAW_MIN_SECONDS))
                checked_rates.append(rate(chunk, threads, raw.sign_checked, RAW_MIN_SECONDS))
            ratios = [i / r for i, r in zip(issued_rates, raw_rates, strict=True)]
            checked_ratios = [i / r for i, r in zip(issued_rates, checked_rates, strict=True)]
            results.append(
                Measurement(
                    key_type,
                    threads,
                    len(csrs),
                    rounds,
                    statistics.median(issued_rates),
                    statistics.median(raw_rates),
                    statistics.median(ratios),
                    min(ratios),
                    max(ratios),
                    statistics.median(checked_rates),
                    statistics.median(checked_ratios),
                )
            )

        progress(f"{key_type}: verifying store and audit chain")
        with core.store.read() as conn:
            stored = core.store.count_certificates(conn, ca_id)
        audit = core.audit.verify()
        issue_events = sum(
            1
            for event in core.audit.events()
            if event.action == ISSUE_ACTION
            and event.result == "success"
            and event.resource == f"ca/{ca_id}"
        )
        verification = Verification(
            key_type, len(serials), len(set(serials)), stored, issue_events, audit.events, audit.ok
        )
        return results, verification
    finally:
        core.close()


def describe_database(database_url: str | None) -> str:
    if not database_url:
        return f"SQLite {sqlite3.sqlite_version} (WAL, synchronous=FULL), temp file"
    scheme, _, rest = database_url.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}"  # no credentials in the output


def print_table(
    measurements: list[Measurement], verifications: list[Verification], header: dict[str, Any]
) -> None:
    print(f"pkigate core.issue() vs raw cryptography build+sign - {header['database']}")
    print(
        f"N={header['count']} CSRs (P-256, CN + DNS SAN) issued per row, in "
        f"{header['rounds']} paired rounds; {header['cpus']} CPUs; Python {header['python']}; "
        f"cryptography {header['cryptography']}"
    )
    print("issued/s   core.issue(): stored + audited + committed durably")
    print("raw/s      cryptography alone: CertificateBuilder + sign + DER, same extensions")
    print("raw+csr/s  the same after verifying the CSR signature, as the core must")
    print("Rates are medians of the rounds; ratios are medians of per-round ratios (min-max).")
    print()
    print(
        f"{'CA key':<20} {'threads':>7} {'issued/s':>9} {'raw/s':>8} {'issued/raw':>11} "
        f"{'(min-max)':>13} {'raw+csr/s':>10} {'issued/raw+csr':>15}"
    )
    print("-" * 99)
    for m in measurements:
        spread = f"({m.ratio_min:.3f}-{m.ratio_max:.3f})"
        print(
            f"{m.key_type:<20} {m.threads:>7} {m.issued_per_s:>9.0f} {m.raw_per_s:>8.0f} "
            f"{m.ratio:>11.3f} {spread:>13} {m.raw_with_csr_check_per_s:>10.0f} "
            f"{m.ratio_with_csr_check:>15.3f}"
        )
    print()
    for m in measurements:
        if m.key_type == "EC_prime256v1":
            verdict = "meets" if m.ratio >= TARGET_RATIO else "BELOW"
            print(
                f"target issued/raw >= {TARGET_RATIO} for EC_prime256v1, {m.threads} "
                f"thread(s): {m.ratio:.3f} {verdict}"
            )
    print()
    best = best_of(measurements)
    for b in best:
        print(
            f"{b.key_type}: best thread count {b.threads} (issued/raw {b.ratio:.3f}); best "
            f"issued/s {b.issued_per_s:.0f} ({b.issued_threads} threads) / best raw/s "
            f"{b.raw_per_s:.0f} ({b.raw_threads} threads) = {b.ratio_to_best_raw:.3f}"
        )
    software = {b.key_type: b for b in best}
    for b in best:
        beside = software.get(b.key_type.removesuffix(TOKEN_SUFFIX))
        if b.key_type.endswith(TOKEN_SUFFIX) and beside is not None:
            print(
                f"{b.key_type} on the token: best issued/s {b.issued_per_s:.0f} = "
                f"{b.issued_per_s / beside.issued_per_s:.3f} x the software key's "
                f"{beside.issued_per_s:.0f}"
            )
    print()
    for v in verifications:
        print(
            f"{v.key_type}: issued {v.issued}, distinct serials {v.distinct_serials}, stored "
            f"{v.stored}, audit certificate.issue events {v.audit_issue_events}, audit "
            f"chain of {v.audit_events_total} events "
            f"{'verifies' if v.audit_chain_ok else 'DOES NOT VERIFY'} -> "
            f"{'OK' if v.ok else 'MISMATCH'}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--count",
        type=int,
        default=DEFAULT_COUNT,
        help=f"CSRs per measurement (default {DEFAULT_COUNT})",
    )
    parser.add_argument(
        "--threads",
        type=parse_thread_counts,
        default=list(DEFAULT_THREADS),
        help="thread counts to measure, comma-separated; one count T means 1 and T "
        f"(default {','.join(map(str, DEFAULT_THREADS))})",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=DEFAULT_ROUNDS,
        help=f"paired issue/raw rounds per row (default {DEFAULT_ROUNDS})",
    )
    parser.add_argument(
        "--database-url",
        default=None,
        help="store URL (default: SQLite in a fresh temp data directory); "
        "an external database is shared by all key types, so it must "
        "be empty or hold only audit events made with --data-dir's key",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="data directory (key-encryption key) to use instead of a fresh temp one",
    )
    parser.add_argument(
        "--key-types",
        default=",".join(DEFAULT_KEY_TYPES),
        help="comma-separated issuing-CA key algorithms",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    thread_counts: list[int] = args.threads
    if (
        not thread_counts
        or min(thread_counts) < 1
        or args.rounds < 1
        or args.count < max(thread_counts) * args.rounds
    ):
        parser.error("need --threads >= 1, --rounds >= 1, --count >= threads * rounds")
    key_types = [k.strip() for k in args.key_types.split(",") if k.strip()]

    def progress(message: str) -> None:
        print(f"... {message}", file=sys.stderr, flush=True)

    began = time.perf_counter()
    progress(f"generating {args.count} CSRs")
    csrs = make_csrs(args.count)
    measurements: list[Measurement] = []
    verifications: list[Verification] = []
    with tempfile.TemporaryDirectory(prefix="pkigate-bench-") as scratch:
        token = None
        if any(k.endswith(TOKEN_SUFFIX) for k in key_types):
            token = softhsm_token(Path(scratch))
            if token is None:
                progress("SoftHSM2 is not installed: the @pkcs11 rows are left out")
                key_types = [k for k in key_types if not k.endswith(TOKEN_SUFFIX)]
        for key_type in key_types:
            # SQLite: a fresh data directory (and database) per key type. An external
            # database is shared, so every key type must use the same key-encryption key
            # for the audit chain to verify.
            if args.data_dir is not None:
                data_dir = args.data_dir
            elif args.database_url:
                data_dir = Path(scratch) / "shared"
            else:
                data_dir = Path(scratch) / key_type
            results, verification = bench_key_type(
                key_type,
                csrs,
                thread_counts,
                args.rounds,
                data_dir,
                args.database_url,
                progress,
                token if key_type.endswith(TOKEN_SUFFIX) else None,
            )
            measurements += results
            verifications.append(verification)

    header = {
        "database": describe_database(args.database_url),
        "count": args.count,
        "rounds": args.rounds,
        "threads": thread_counts,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "cryptography": cryptography.__version__,
        "elapsed_s": round(time.perf_counter() - began, 1),
    }
    if args.json:
        print(
            json.dumps(
                {
                    **header,
                    "target_ratio": TARGET_RATIO,
                    "measurements": [asdict(m) for m in measurements],
                    "best": [asdict(b) for b in best_of(measurements)],
                    "verification": [{**asdict(v), "ok": v.ok} for v in verifications],
                },
                indent=2,
            )
        )
    else:
        print_table(measurements, verifications, header)
        print(f"\nwall time {header['elapsed_s']} s")
    return 0 if all(v.ok for v in verifications) else 1


if __name__ == "__main__":
    sys.exit(main())
