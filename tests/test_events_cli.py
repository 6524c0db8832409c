"""`pkigate events list` and `pkigate notifications test|status`, run as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import create_root, make_csr
from webhook_receiver import SECRET, Receiver

from pkigate.core import Core, IssuanceRequest, Requester, Validity

PKIGATE = str(Path(sys.executable).parent / "pkigate")


def _run(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PKIGATE, "--data-dir", str(home), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "HOOK_SECRET": SECRET},
    )


def _config(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "pkigate.toml"
    path.write_text(
        f'[[notifications]]\nname = "hook"\ntype = "webhook"\nurl = "{url}"\n'
        'secret_env = "HOOK_SECRET"\n'
    )
    return path


def test_events_list_shows_the_outbox(tmp_path: Path) -> None:
    home = tmp_path / "home"
    core = Core.open(home)
    try:
        root = create_root(core)
        issued = core.issue(
            IssuanceRequest(root.record.id, make_csr(), Validity.parse("30d"), Requester("eve"))
        )
    finally:
        core.close()
    result = _run(home, "--json", "events", "list", "--type", "certificate.issued")
    assert result.returncode == 0, result.stderr
    (event,) = json.loads(result.stdout)
    assert (event["serial"], event["data"]["requester"]) == (issued.serial, "eve")
    assert event["deliveries"] == []
    human = _run(home, "events", "list").stdout
    assert "certificate.issued" in human and issued.serial in human


def test_notifications_test_sends_a_signed_test_event(tmp_path: Path) -> None:
    receiver = Receiver()
    try:
        config = _config(tmp_path, receiver.url)
        result = _run(tmp_path / "home", "notifications", "--config", str(config), "test", "hook")
        assert result.returncode == 0, result.stderr
        (event,) = receiver.events()  # the signature is checked there
        assert event["type"] == "notification.test" and event["data"]["destination"] == "hook"
        assert event["id"] in result.stdout
    finally:
        receiver.close()


def test_notifications_test_says_why_a_receiver_failed(tmp_path: Path) -> None:
    receiver = Receiver(answer=lambda _n: 503)
    try:
        config = _config(tmp_path, receiver.url)
        result = _run(tmp_path / "home", "notifications", "--config", str(config), "test", "hook")
    finally:
        receiver.close()
    assert result.returncode != 0
    assert "notification hook failed: HTTP 503" in result.stderr
    assert "x" * 300 not in result.stderr  # a bounded snippet of the body, not the page
    missing = _run(tmp_path / "home", "notifications", "--config", str(config), "test", "nope")
    assert missing.returncode != 0 and "no notification 'nope'" in missing.stderr
