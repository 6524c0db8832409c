"""The events a fleet caused on the server (`pkigate-sim run --server-events`): the
server's outbox (GET /api/v1/events) read before and after the run, counted by type and
by delivery state. The token must be an admin's or an auditor's."""

from __future__ import annotations

from collections import Counter
from typing import Any

import requests

from pkigate.devsim.config import Target

_PAGE = 1000


def _pages(target: Target, after: int) -> Any:
    session = requests.Session()
    session.trust_env = False
    session.verify = str(target.tls_bundle)
    session.headers["Authorization"] = f"Bearer {target.token}"
    while True:
        response = session.get(
            f"{target.https_url}/api/v1/events",
            params={"after": after, "limit": _PAGE},
            timeout=30,
        )
        response.raise_for_status()
        page = response.json()
        yield page["events"]
        if page["next_after"] is None:
            return
        after = int(page["next_after"])


def outbox_position(target: Target) -> int:
    """The newest event's position now (0 for an empty outbox)."""
    position = 0
    for events in _pages(target, 0):
        if events:
            position = int(events[-1]["position"])
    return position


def events_since(target: Target, position: int) -> dict[str, dict[str, int]]:
    """Events written after ``position``: by type, certificates issued by template (the
    devices' and the server's own OCSP responders'), and deliveries by state."""
    counters: dict[str, Counter[str]] = {
        "by_type": Counter(),
        "issued_by_template": Counter(),
        "deliveries": Counter(),
    }
    for events in _pages(target, position):
        for event in events:
            counters["by_type"][event["type"]] += 1
            if event["type"] == "certificate.issued":
                counters["issued_by_template"][event["template"]] += 1
            counters["deliveries"].update(d["status"] for d in event["deliveries"])
    return {name: dict(sorted(counter.items())) for name, counter in counters.items()}
