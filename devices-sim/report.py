"""The summary of a run: per protocol attempts, successes, errors by type, latency
percentiles and throughput; as a rich table, a JSON document, and a plot.

Latency percentiles are over successful attempts (a refused connection takes no time and
would flatter them); throughput is successes per second of the whole run.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pkigate.devsim.events import Event
from pkigate.devsim.fleet import FleetRun
from pkigate.devsim.postconditions import PostConditions

PROTOCOL_ORDER = ("scep", "acme", "adcs", "api", "ocsp", "crl", "verify")
MAX_LISTED_FAILURES = 50


@dataclass(frozen=True)
class OperationSummary:
    """One operation of a protocol (enroll, renew, order, ...)."""

    attempts: int
    successes: int
    latency_p50: float | None
    latency_p95: float | None


@dataclass(frozen=True)
class ProtocolSummary:
    protocol: str
    attempts: int
    successes: int
    errors: dict[str, int]
    """Failed attempts by error type (expected ones included)."""
    unexpected_errors: int
    latency_p50: float | None
    latency_p95: float | None
    latency_p99: float | None
    """Seconds, over successful attempts."""
    throughput: float
    """Successful attempts per second of the run."""
    operations: dict[str, OperationSummary]


@dataclass(frozen=True)
class Report:
    run_id: str
    started_at: str
    duration: float
    settings: dict[str, Any]
    devices: dict[str, dict[str, int]]
    """Per kind: total, finished (with every certificate it set out to get), failed."""
    certificates: dict[str, int]
    """received, verified, revoked (by the devices), revoked_verified."""
    protocols: list[ProtocolSummary]
    unexpected_errors: int
    failures: list[str]
    """The first failures, device by device, to start a diagnosis."""
    server_kills: list[float] = field(default_factory=list)
    """Seconds into the run at which fault mode killed the server."""
    postconditions: dict[str, Any] | None = None
    server_events: dict[str, dict[str, int]] | None = None
    """With --server-events: the events the run caused, by type and by delivery state."""

    @property
    def ok(self) -> bool:
        post_ok = self.postconditions is None or bool(self.postconditions["ok"])
        return (
            self.unexpected_errors == 0
            and self.devices_failed == 0
            and self.certificates["received"] == self.certificates["verified"]
            and self.certificates["revoked"] == self.certificates["revoked_verified"]
            and post_ok
        )

    @property
    def devices_failed(self) -> int:
        return sum(kind["failed"] for kind in self.devices.values())

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        return data

    def write_json(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n")


def percentile(values: Sequence[float], share: float) -> float | None:
    """The nearest-rank percentile (``share`` in 0..1) of ``values``."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(share * len(ordered)))
    return ordered[rank - 1]


def summarize(events: Sequence[Event], duration: float) -> list[ProtocolSummary]:
    by_protocol: dict[str, list[Event]] = defaultdict(list)
    for event in events:
        by_protocol[event.protocol].append(event)
    order = [p for p in PROTOCOL_ORDER if p in by_protocol]
    order += sorted(p for p in by_protocol if p not in PROTOCOL_ORDER)
    summaries = []
    for protocol in order:
        items = by_protocol[protocol]
        ok = [e for e in items if e.ok]
        latencies = [e.latency for e in ok]
        summaries.append(
            ProtocolSummary(
                protocol=protocol,
                attempts=len(items),
                successes=len(ok),
                errors=dict(Counter(e.error_type or "?" for e in items if not e.ok)),
                unexpected_errors=sum(1 for e in items if not e.ok and not e.expected),
                latency_p50=percentile(latencies, 0.50),
                latency_p95=percentile(latencies, 0.95),
                latency_p99=percentile(latencies, 0.99),
                throughput=len(ok) / duration if duration > 0 else 0.0,
                operations=_operations(items),
            )
        )
    return summaries


def _operations(events: Sequence[Event]) -> dict[str, OperationSummary]:
    by_operation: dict[str, list[Event]] = defaultdict(list)
    for event in events:
        by_operation[event.operation].append(event)
    summaries = {}
    for operation, items in sorted(by_operation.items()):
        latencies = [e.latency for e in items if e.ok]
        summaries[operation] = OperationSummary(
            attempts=len(items),
            successes=len(latencies),
            latency_p50=percentile(latencies, 0.50),
            latency_p95=percentile(latencies, 0.95),
        )
    return summaries


def build_report(run: FleetRun, postconditions: PostConditions | None = None) -> Report:
    devices: dict[str, dict[str, int]] = {}
    for outcome in run.devices:
        counts = devices.setdefault(outcome.kind, {"total": 0, "finished": 0, "failed": 0})
        counts["total"] += 1
        counts["failed" if outcome.failure else "finished"] += 1
    received = list(run.certificates.values())
    revoked_verified = sum(
        1 for e in run.events if e.protocol == "verify" and e.operation == "revoked" and e.ok
    )
    failures = [f"{o.name}: {o.failure}" for o in run.devices if o.failure]
    # Unexpected errors of devices that went on (retried, or a revocation missing from a
    # CRL after the run) fail the run too.
    failed = {o.name for o in run.devices if o.failure}
    failures += [
        f"{e.device}: {e.protocol} {e.operation}: {e.error_type}: {e.detail}"
        for e in run.events
        if not e.ok and not e.expected and e.device not in failed
    ]
    post = None
    if postconditions is not None:
        post = {**asdict(postconditions), "ok": postconditions.ok}
        failures += [f"store: {p}" for p in postconditions.problems()]
    summaries = summarize(run.events, run.duration)
    return Report(
        run_id=run.run_id,
        started_at=run.started_at.isoformat(),
        duration=round(run.duration, 3),
        settings=asdict(run.settings),
        devices=devices,
        certificates={
            "received": len(received),
            "verified": sum(1 for c in received if c.verified),
            "revoked": sum(1 for c in received if c.revoked),
            "revoked_verified": revoked_verified,
            "serials_received_twice": len(run.duplicate_serials),
        },
        protocols=summaries,
        unexpected_errors=sum(s.unexpected_errors for s in summaries),
        failures=failures[:MAX_LISTED_FAILURES],
        server_kills=[round(t, 3) for t in run.disruptions],
        postconditions=post,
    )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def print_summary(report: Report, console: Console) -> None:
    table = Table(title=f"pkigate-sim run {report.run_id}: {report.duration:.1f}s")
    for column, justify in (
        ("protocol", "left"),
        ("attempts", "right"),
        ("ok", "right"),
        ("errors by type", "left"),
        ("p50 ms", "right"),
        ("p95 ms", "right"),
        ("p99 ms", "right"),
        ("ok/s", "right"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for summary in report.protocols:
        errors = ", ".join(f"{k} {v}" for k, v in sorted(summary.errors.items())) or "-"
        table.add_row(
            summary.protocol,
            str(summary.attempts),
            str(summary.successes),
            errors,
            _ms(summary.latency_p50),
            _ms(summary.latency_p95),
            _ms(summary.latency_p99),
            f"{summary.throughput:.1f}",
        )
    console.print(table)
    kinds = ", ".join(
        f"{kind}s {c['finished']}/{c['total']}"
        + (f" ({c['failed']} failed)" if c["failed"] else "")
        for kind, c in report.devices.items()
    )
    certificates = report.certificates
    console.print(
        f"devices: {kinds or 'none'}; certificates received {certificates['received']}, "
        f"verified {certificates['verified']}, revoked {certificates['revoked']} "
        f"(verified revoked {certificates['revoked_verified']})"
    )
    if report.server_kills:
        console.print(f"server killed {len(report.server_kills)} times")
    if report.postconditions is not None:
        post = report.postconditions
        console.print(
            f"store: {post['certificates_checked']} certificates checked, "
            f"{post['audit_events']} audit events, "
            + ("all post-conditions hold" if post["ok"] else "POST-CONDITIONS FAIL")
        )
    if report.server_events is not None:
        caused = report.server_events
        console.print(
            "events: "
            + (", ".join(f"{k} {v}" for k, v in caused["by_type"].items()) or "none")
            + "; deliveries: "
            + (", ".join(f"{k} {v}" for k, v in caused["deliveries"].items()) or "none")
        )
    for failure in report.failures:
        console.print(f"[red]{failure}[/red]", markup=True, highlight=False)
    verdict = "[green]OK[/green]" if report.ok else "[red]FAILED[/red]"
    console.print(f"{verdict}: {report.unexpected_errors} unexpected errors", markup=True)


def plot(run: FleetRun, path: Path) -> None:
    """Latency distribution (ECDF per protocol, log scale) and throughput over time
    (successes per second per protocol), with server kills marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (latency_axis, throughput_axis) = plt.subplots(2, 1, figsize=(10, 8))
    by_protocol: dict[str, list[Event]] = defaultdict(list)
    for event in run.events:
        by_protocol[event.protocol].append(event)
    protocols = [p for p in PROTOCOL_ORDER if p in by_protocol]
    protocols += sorted(p for p in by_protocol if p not in PROTOCOL_ORDER)
    width = max(1.0, run.duration / 60)
    bins = max(1, math.ceil(run.duration / width))
    for protocol in protocols:
        latencies = sorted(e.latency * 1000 for e in by_protocol[protocol] if e.ok)
        if latencies:
            shares = [(i + 1) / len(latencies) for i in range(len(latencies))]
            latency_axis.step(latencies, shares, where="post", label=protocol)
        counts = [0] * bins
        for event in by_protocol[protocol]:
            if event.ok:
                counts[min(bins - 1, int(event.t / width))] += 1
        throughput_axis.plot(
            [(i + 0.5) * width for i in range(bins)],
            [c / width for c in counts],
            label=protocol,
        )
    latency_axis.set_xscale("log")
    latency_axis.set_xlabel("latency (ms)")
    latency_axis.set_ylabel("share of successful attempts")
    latency_axis.set_title("latency distribution")
    latency_axis.grid(True, which="both", alpha=0.3)
    throughput_axis.set_xlabel("seconds since start")
    throughput_axis.set_ylabel("successes per second")
    throughput_axis.set_title("throughput over time")
    throughput_axis.grid(True, alpha=0.3)
    for index, moment in enumerate(run.disruptions):
        throughput_axis.axvline(
            moment,
            color="red",
            linestyle="--",
            alpha=0.6,
            label="server killed" if index == 0 else None,
        )
    if protocols:
        latency_axis.legend(loc="lower right")
        throughput_axis.legend(loc="upper right")
    figure.suptitle(
        f"pkigate-sim {run.run_id}: {len(run.devices)} devices, "
        f"{len(run.certificates)} certificates"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
