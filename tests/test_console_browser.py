"""The web console in a real browser: Debian's Chromium, headless, driven by Selenium through
Debian's chromedriver, against a real `pkigate serve`.

One server and one browser for the module. Chromium trusts the server's TLS certificate
through --ignore-certificate-errors: the loopback test server's root is made per run, and
Chromium reads trust anchors from an NSS database, not from a file it could be given.
Each test asserts on what the page shows and on the store or the audit log afterwards.
Screenshots of each page at 1280x800 go to $PKIGATE_CONSOLE_SCREENSHOTS, by default
.cache/console-screenshots/ (the README names it).
"""

from __future__ import annotations

import json
import os
import plistlib
import re
import sqlite3
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from helpers import make_csr
from serving import RunningServer, console_signin, start_server
from test_ocsp import openssl_ocsp
from test_scep import Device, load_certs_only

from pkigate.scep.messages import (
    CertRep,
    MessageType,
    PkiStatus,
    encode_issuer_and_subject,
    parse_cert_rep,
)

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = Path(
    os.environ.get("PKIGATE_CONSOLE_SCREENSHOTS", ROOT / ".cache" / "console-screenshots")
)
STATIC_CHALLENGE = "console-static-challenge"
HELD_CHALLENGE = "console-held-challenge"

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists())
    and not os.environ.get("PKIGATE_TOOLS_INSTALLED"),
    reason="Chromium is not installed (Debian packages chromium, chromium-driver)",
)

CONNECTORS = f"""
[[connectors]]
type = "scep"
name = "scep"
mount = "/scep"
[connectors.settings]
challenge = "{STATIC_CHALLENGE}"

[[connectors]]
type = "scep"
name = "mdm"
mount = "/mdm"
[connectors.settings]
pending = true
challenge = "{HELD_CHALLENGE}"

[[connectors]]
type = "acme"
name = "acme"
mount = "/acme"
"""


class Console:
    """The browser, the server, and the tokens of the three roles."""

    def __init__(self, server: RunningServer, driver: Any, downloads: Path) -> None:
        self.server = server
        self.driver = driver
        self.downloads = downloads
        admin = server.session()
        self.tokens: dict[str, str] = {"admin": server.admin_token}
        for role in ("issuer", "auditor"):
            created = admin.post(
                f"{server.https_url}/api/v1/tokens",
                json={"name": f"console-{role}", "role": role},
                timeout=10,
            )
            assert created.status_code == 201, created.text
            self.tokens[role] = created.json()["secret"]
        cas = admin.get(f"{server.https_url}/api/v1/cas", timeout=10).json()["cas"]
        self.issuing = next(ca["id"] for ca in cas if ca["type"] == "SUBORDINATE")

    def url(self, path: str) -> str:
        return f"{self.server.https_url}/console{path}"

    def open(self, path: str) -> None:
        self.driver.get(self.url(path))

    def sign_in(self, role: str) -> None:
        self.driver.delete_all_cookies()
        self.open("/signin")
        self.driver.find_element(By.ID, "token").send_keys(self.tokens[role])
        self.press("signin")
        assert f"({role}" in self.text("#who"), self.driver.page_source

    def click(self, element: Any) -> None:
        """Click what submits a form or follows a link, and wait for the next page."""
        # A mark on the old page's window: a new document has none. (Waiting for the old
        # <html> element to go stale raced Chromium 156, which answered "Node with given id
        # does not belong to the document" instead of a stale-element error.)
        self.driver.execute_script("window.pkigateOldPage = true;")
        element.click()
        # A script run while the page changes may fail; the next poll asks the new one.
        wait = WebDriverWait(self.driver, 30, ignored_exceptions=(WebDriverException,))
        wait.until(
            lambda d: d.execute_script(
                "return window.pkigateOldPage !== true && document.readyState === 'complete';"
            )
        )

    def press(self, element_id: str) -> None:
        self.click(self.driver.find_element(By.ID, element_id))

    def text(self, selector: str) -> str:
        return str(self.driver.find_element(By.CSS_SELECTOR, selector).text)

    def texts(self, selector: str) -> list[str]:
        return [e.text for e in self.driver.find_elements(By.CSS_SELECTOR, selector)]

    def screenshot(self, name: str) -> None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        self.driver.set_window_size(1280, 800)
        assert self.driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))

    def cookie(self) -> dict[str, Any]:
        found = self.driver.get_cookie("pkigate_console")
        assert found is not None
        return dict(found)

    def store_audit(self, action: str) -> list[dict[str, Any]]:
        with self.database() as db:
            rows = db.execute(
                "SELECT actor, resource, parameters, result FROM audit_events "
                "WHERE action = ? ORDER BY seq",
                (action,),
            ).fetchall()
        return [
            {"actor": a, "resource": r, "parameters": json.loads(p), "result": res}
            for a, r, p, res in rows
        ]

    def database(self) -> sqlite3.Connection:
        return sqlite3.connect(self.server.data_dir / "pkigate.db")

    def certificate(self, serial: str) -> tuple[str, str | None]:
        with self.database() as db:
            row = db.execute(
                "SELECT status, revocation_reason FROM certificates WHERE serial = ?", (serial,)
            ).fetchone()
        assert row is not None
        return str(row[0]), row[1]


class Scep:
    """A device talking SCEP to the server's plain-HTTP listener."""

    def __init__(self, server: RunningServer, mount: str) -> None:
        self.url = f"{server.http_url}{mount}"

    def ca_certs(self) -> list[x509.Certificate]:
        return load_certs_only(requests.get(f"{self.url}?operation=GetCACert", timeout=10).content)

    def send(self, device: Device, payload: bytes, kind: MessageType, tid: str) -> CertRep:
        certs = self.ca_certs()
        body = device.message(certs[0], payload, kind=kind, transaction_id=tid)
        answer = requests.post(
            f"{self.url}?operation=PKIOperation",
            data=body,
            headers={"Content-Type": "application/x-pki-message"},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        return parse_cert_rep(answer.content, device.key, certs[:1])

    def enroll(self, device: Device, challenge: str, cn: str, tid: str) -> CertRep:
        return self.send(device, device.csr(challenge, cn=cn), MessageType.PKCS_REQ, tid)

    def poll(self, device: Device, cn: str, tid: str) -> CertRep:
        issuing = self.ca_certs()[1]
        subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, cn)])
        payload = encode_issuer_and_subject(issuing.subject, subject)
        return self.send(device, payload, MessageType.CERT_POLL, tid)


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    base = tmp_path_factory.mktemp("console")
    server = start_server(base / "data", extra_config=CONNECTORS)
    downloads = base / "downloads"
    downloads.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        # Without these Chromium reaches for Google's services, which the closed network
        # refuses (and which a test has no business calling).
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={base / 'chromium-profile'}",
        # The loopback server's TLS root is made per run (see the module docstring).
        "--ignore-certificate-errors",
        "--window-size=1280,800",
    ):
        options.add_argument(flag)
    options.add_experimental_option(
        "prefs",
        {"download.default_directory": str(downloads), "download.prompt_for_download": False},
    )
    service = webdriver.ChromeService(executable_path=str(CHROMEDRIVER))
    try:
        driver = webdriver.Chrome(options=options, service=service)
    except WebDriverException:
        server.stop()
        raise
    try:
        driver.set_page_load_timeout(60)
        yield Console(server, driver, downloads)
    finally:
        driver.quit()
        server.stop()


def test_each_role_sees_only_what_it_may(console: Console) -> None:
    allowed = {
        "admin": [
            "Dashboard",
            "CAs",
            "Teams",
            "Certificates",
            "Enrollment",
            "ACME",
            "Audit",
            "Notifications",
            "Tokens",
        ],
        "issuer": ["Dashboard", "CAs", "Teams", "Certificates", "Enrollment"],
        "auditor": ["Dashboard", "CAs", "Teams", "Certificates", "ACME", "Audit"],
    }
    refused = {"admin": "/audit/report?ca=x", "issuer": "/acme", "auditor": "/enrollment"}
    for role, pages in allowed.items():
        console.sign_in(role)
        assert console.texts("header nav a") == pages
        console.open("/cas")
        tree = console.texts("#cas tbody td:first-child")
        assert any("Root" in t for t in tree) and len(tree) == 2, tree
        console.open(refused[role])
        assert f"roles {role}" in console.text("#message")
        assert "may not do this" in console.text("#message")
    # Each refusal is audited by the API's own check, naming the roles (an issuer token
    # made with the legacy role field is an issuer and an approver).
    denied = [e for e in console.store_audit("api.denied") if "/console/" in e["resource"]]
    assert {tuple(e["parameters"]["roles"]) for e in denied} == {
        ("admin",),
        ("issuer", "approver"),
        ("auditor",),
    }
    assert len(console.store_audit("console.signin")) >= 3


def test_admin_pages_tokens_and_a_ca_confirmation_that_names_it(console: Console) -> None:
    console.sign_in("admin")
    console.open("/cas")
    console.screenshot("cas")
    console.click(console.driver.find_elements(By.CSS_SELECTOR, "#cas tbody a")[1])
    ca_id = console.text("#ca-id")
    assert re.fullmatch(r"[0-9A-F]{2}(:[0-9A-F]{2}){31}", console.text("#fingerprint"))
    console.screenshot("ca")
    pem = requests.get(f"{console.server.http_url}/ca/{ca_id}.pem", timeout=10).text
    assert (
        console.text("#subject")
        == x509.load_pem_x509_certificate(pem.encode()).subject.rfc4514_string()
    )
    # Disable asks for the CA's id, and a wrong one changes nothing.
    console.click(console.driver.find_element(By.LINK_TEXT, "Disable"))
    assert console.text("#confirm-subject") == "CN=pkigate Issuing CA,O=pkigate"
    console.driver.find_element(By.ID, "confirm").send_keys("not-the-id")
    console.press("do")
    assert "to confirm" in console.text("#message")
    console.open(f"/cas/{ca_id}")
    assert console.text("#ca-status") == "ACTIVE"
    console.click(console.driver.find_element(By.LINK_TEXT, "Disable"))
    console.driver.find_element(By.ID, "confirm").send_keys(ca_id)
    console.press("do")
    assert console.text("#ca-status") == "DISABLED"
    console.click(console.driver.find_element(By.LINK_TEXT, "Enable"))
    console.driver.find_element(By.ID, "confirm").send_keys(ca_id)
    console.press("do")
    assert console.text("#ca-status") == "ACTIVE"
    changes = [
        e["parameters"] for e in console.store_audit("ca.update") if e["resource"] == f"ca/{ca_id}"
    ]
    assert [(c["from"], c["status"]) for c in changes[-2:]] == [
        ("ACTIVE", "DISABLED"),
        ("DISABLED", "ACTIVE"),
    ], changes

    # A token, its secret shown once; it works on the API, then is revoked.
    console.open("/tokens")
    console.driver.find_element(By.ID, "token-name").send_keys("made-in-console")
    console.driver.find_element(By.CSS_SELECTOR, "input[name=roles][value=auditor]").click()
    console.driver.find_element(By.ID, "token-expires-in").send_keys("30d")
    console.press("create")
    secret = console.text("#new-secret")
    console.screenshot("tokens")
    api = console.server.session(secret)
    assert api.get(f"{console.server.https_url}/api/v1/audit/verify", timeout=10).ok
    console.open("/tokens")
    assert secret not in console.driver.page_source
    row = next(
        r
        for r in console.driver.find_elements(By.CSS_SELECTOR, "#tokens tbody tr")
        if r.text.startswith("made-in-console")
    )
    # Its roles, its expiry, and its use through the API just now.
    assert row.find_element(By.CSS_SELECTOR, ".roles").text == "auditor"
    assert row.find_element(By.CSS_SELECTOR, ".expires").text != "never"
    assert row.find_element(By.CSS_SELECTOR, ".last-used").text != "never"
    console.click(row.find_element(By.CSS_SELECTOR, "button.revoke-token"))
    assert api.get(f"{console.server.https_url}/api/v1/audit/verify", timeout=10).status_code == 401


def test_acme_eab_key_created_once_shown_and_revoked_by_an_admin(console: Console) -> None:
    console.sign_in("admin")
    console.open("/acme")
    assert console.texts(".accounts tbody td") == ["No account yet."]
    console.driver.find_element(By.CSS_SELECTOR, ".eab-label").send_keys("for <b>lab</b>")
    console.click(console.driver.find_element(By.CSS_SELECTOR, "button.create-eab"))
    kid, hmac_key = console.text("#new-kid"), console.text("#new-hmac")
    assert kid.startswith("kid-") and len(hmac_key) >= 40
    console.screenshot("acme")
    with console.database() as db:
        label, revoked = db.execute(
            "SELECT label, revoked_at FROM acme_eab_keys WHERE id = ?", (kid,)
        ).fetchone()
    assert (label, revoked) == ("for <b>lab</b>", None)
    console.open("/acme")
    assert hmac_key not in console.driver.page_source
    row = next(
        r
        for r in console.driver.find_elements(By.CSS_SELECTOR, ".eab-keys tbody tr")
        if kid in r.text
    )
    assert "for <b>lab</b>" in row.text
    console.click(row.find_element(By.CSS_SELECTOR, "button.revoke-eab"))
    with console.database() as db:
        (revoked,) = db.execute(
            "SELECT revoked_at FROM acme_eab_keys WHERE id = ?", (kid,)
        ).fetchone()
    assert revoked is not None
    assert [e["resource"] for e in console.store_audit("acme.eab_key.revoke")] == [
        f"connector/acme/eab-key/{kid}"
    ]


def test_scep_issued_certificate_found_by_subject_and_revoked(
    console: Console, tmp_path: Path
) -> None:
    cn = f"console-device-{uuid.uuid4().hex[:8]}"
    scep = Scep(console.server, "/scep")
    device = Device.new(cn)
    answer = scep.enroll(device, STATIC_CHALLENGE, cn, uuid.uuid4().hex)
    assert answer.status is PkiStatus.SUCCESS, answer.fail_info_text
    leaf = answer.certificates[0]
    serial = format(leaf.serial_number, "x")

    console.sign_in("issuer")
    console.open("/certificates")
    console.driver.find_element(By.ID, "q").send_keys(cn)
    console.press("search")
    assert console.texts("#certificates tbody td:first-child") == [f"CN={cn}"]
    console.screenshot("certificates")
    console.click(console.driver.find_element(By.LINK_TEXT, f"CN={cn}"))
    assert console.text("#serial") == serial
    assert console.text("#connector") == "scep"
    assert "certificate.issue" in console.texts("#events td")
    console.screenshot("certificate")
    Select(console.driver.find_element(By.ID, "revoke-reason")).select_by_visible_text(
        "keyCompromise"
    )
    console.press("revoke")
    assert console.text("#status") == "REVOKED"
    assert console.text("#reason") == "keyCompromise"
    assert console.certificate(serial) == ("REVOKED", "keyCompromise")

    issuing, root = scep.ca_certs()[1], scep.ca_certs()[-1]
    (tmp_path / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    output = openssl_ocsp(
        tmp_path,
        f"{console.server.http_url}/ocsp/{console.issuing}",
        issuing,
        root,
        "-cert",
        "leaf.pem",
    )
    assert "Response verify OK" in output and "leaf.pem: revoked" in output, output
    assert "Reason: keyCompromise" in output, output

    # The auditor finds the revocation by its actor.
    console.sign_in("auditor")
    console.open("/audit")
    console.driver.find_element(By.ID, "actor").send_keys("console-issuer")
    console.driver.find_element(By.ID, "action").send_keys("certificate.revoke")
    console.press("filter")
    rows = console.texts("#events tbody tr")
    assert len(rows) == 1 and serial in rows[0] and "keyCompromise" in rows[0], rows
    console.screenshot("audit")
    console.press("verify")
    assert "is intact" in console.text("#verification")


def test_an_admin_revokes_and_an_auditor_may_not(console: Console) -> None:
    """Revocation is the issuers' and the admins' (the issue's words); an auditor reads the
    same page without the form (the server's refusal of the POST is the role matrix's, in
    test_token_roles.py: the console's routes take the API's permissions)."""
    cn = f"console-admin-revokes-{uuid.uuid4().hex[:8]}"
    scep = Scep(console.server, "/scep")
    answer = scep.enroll(Device.new(cn), STATIC_CHALLENGE, cn, uuid.uuid4().hex)
    assert answer.status is PkiStatus.SUCCESS, answer.fail_info_text
    serial = format(answer.certificates[0].serial_number, "x")

    console.sign_in("auditor")
    console.open("/certificates")
    console.driver.find_element(By.ID, "q").send_keys(cn)
    console.press("search")
    console.click(console.driver.find_element(By.LINK_TEXT, f"CN={cn}"))
    assert console.text("#status") == "ISSUED"
    assert not console.driver.find_elements(By.ID, "revoke-reason")

    console.sign_in("admin")
    console.open("/certificates")
    console.driver.find_element(By.ID, "q").send_keys(cn)
    console.press("search")
    console.click(console.driver.find_element(By.LINK_TEXT, f"CN={cn}"))
    Select(console.driver.find_element(By.ID, "revoke-reason")).select_by_visible_text("superseded")
    console.press("revoke")
    assert console.text("#status") == "REVOKED"
    assert console.text("#reason") == "superseded"
    assert console.certificate(serial) == ("REVOKED", "superseded")


def test_pending_requests_approved_and_rejected_in_the_console(console: Console) -> None:
    scep = Scep(console.server, "/mdm")
    waiting = {}
    for name in ("approve", "reject"):
        cn = f"held-{name}-{uuid.uuid4().hex[:6]}"
        device, tid = Device.new(cn), uuid.uuid4().hex
        assert scep.enroll(device, HELD_CHALLENGE, cn, tid).status is PkiStatus.PENDING
        waiting[name] = (cn, device, tid)

    console.sign_in("issuer")
    console.open("/enrollment")
    console.screenshot("enrollment")

    def row(cn: str) -> Any:
        return next(
            r
            for r in console.driver.find_elements(By.CSS_SELECTOR, "#pending tbody tr")
            if f"CN={cn}" in r.text
        )

    cn, device, tid = waiting["approve"]
    console.click(row(cn).find_element(By.CSS_SELECTOR, "button.approve"))
    assert not [r for r in console.texts("#pending tbody tr") if cn in r]
    collected = scep.poll(device, cn, tid)
    assert collected.status is PkiStatus.SUCCESS, collected.fail_info_text
    assert collected.certificates[0].public_key() == device.key.public_key()
    issued = [
        e["parameters"]
        for e in console.store_audit("certificate.issue")
        if e["parameters"].get("correlation_id") == tid
    ]
    assert issued and issued[0]["approved_by"].startswith("token:console-issuer(")

    cn, device, tid = waiting["reject"]
    form = row(cn)
    form.find_element(By.CSS_SELECTOR, "input.reason").send_keys("not one of ours")
    console.click(form.find_element(By.CSS_SELECTOR, "button.reject"))
    assert not [r for r in console.texts("#pending tbody tr") if cn in r]
    refused = scep.poll(device, cn, tid)
    assert refused.status is PkiStatus.FAILURE
    assert "not one of ours" in (refused.fail_info_text or "")
    with console.database() as db:
        status, evidence = db.execute(
            "SELECT status, evidence FROM scep_transactions WHERE transaction_id = ?", (tid,)
        ).fetchone()
    assert status == "REJECTED" and json.loads(evidence)["rejection_reason"] == "not one of ours"


def test_one_time_challenge_and_apple_profile(console: Console) -> None:
    console.sign_in("issuer")
    console.open("/enrollment")
    console.click(console.driver.find_elements(By.CSS_SELECTOR, "button.create-challenge")[0])
    challenge = console.text("#challenge")
    assert len(challenge) >= 20
    # The challenge enrolls a device at once on the non-pending connector.
    cn = f"one-time-{uuid.uuid4().hex[:6]}"
    answer = Scep(console.server, "/scep").enroll(Device.new(cn), challenge, cn, uuid.uuid4().hex)
    assert answer.status is PkiStatus.SUCCESS, answer.fail_info_text

    console.open("/enrollment")
    before = set(console.downloads.iterdir())
    console.driver.find_elements(By.CSS_SELECTOR, "button.profile")[0].click()
    deadline = time.monotonic() + 30  # the download finishes in the browser's own time
    found: list[Path] = []
    while not found and time.monotonic() < deadline:
        found = [
            p for p in set(console.downloads.iterdir()) - before if p.suffix == ".mobileconfig"
        ]
        time.sleep(0.2)
    assert found, list(console.downloads.iterdir())
    profile = plistlib.loads(found[0].read_bytes())
    payload = profile["PayloadContent"][0]
    assert payload["PayloadType"] == "com.apple.security.scep"
    content = payload["PayloadContent"]
    assert content["URL"] == f"{console.server.http_url}/scep"
    assert content["Challenge"] != STATIC_CHALLENGE  # a fresh one-time challenge
    created = console.store_audit("scep.challenge.create")
    assert len(created) == 2 and all(
        e["actor"].startswith("token:console-issuer(") for e in created
    )


def test_forged_post_and_expired_session_are_refused(console: Console) -> None:
    console.sign_in("admin")
    cookie = console.cookie()
    assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict"
    # A cross-site form carries the session cookie (were SameSite to let it) but no token.
    forged = requests.post(
        console.url("/tokens"),
        data={"name": "forged", "roles": "admin"},
        cookies={"pkigate_console": cookie["value"]},
        headers={"Origin": "https://evil.example"},
        verify=str(console.server.tls_bundle),
        timeout=10,
    )
    assert forged.status_code == 400 and "CSRF token is missing" in forged.text
    with console.database() as db:
        assert not db.execute("SELECT 1 FROM api_tokens WHERE name = 'forged'").fetchall()

    # The session's last use moved back past the idle timeout, as if the operator left.
    with console.database() as db:
        (sessions,) = db.execute("SELECT count(*) FROM console_sessions").fetchone()
        db.execute(
            "UPDATE console_sessions SET last_seen_at = ?",
            ((datetime.now(UTC) - timedelta(hours=1)).strftime("%Y-%m-%d %H:%M:%S.%f"),),
        )
    console.open("/tokens")
    assert console.driver.current_url.startswith(console.url("/signin"))
    assert "expired" in console.text("#message")
    with console.database() as db:
        # That one is forgotten; the others (earlier tests' sign-ins) go at the next sign-in.
        assert db.execute("SELECT count(*) FROM console_sessions").fetchone() == (sessions - 1,)
    console.sign_in("auditor")
    with console.database() as db:
        assert db.execute("SELECT count(*) FROM console_sessions").fetchone() == (1,)


def test_a_session_ends_after_its_absolute_lifetime_however_busy(console: Console) -> None:
    session, _csrf = console_signin(console.server, console.tokens["auditor"])
    assert session.get(console.url("/audit"), timeout=10).status_code == 200
    # Signed in nine hours ago and used a moment ago: past the 8-hour absolute limit.
    long_ago = (datetime.now(UTC) - timedelta(hours=9)).strftime("%Y-%m-%d %H:%M:%S.%f")
    with console.database() as db:
        # This session only, the newest: the others belong to the other tests.
        db.execute(
            "UPDATE console_sessions SET created_at = ? "
            "WHERE created_at = (SELECT max(created_at) FROM console_sessions)",
            (long_ago,),
        )
    refused = session.get(console.url("/audit"), timeout=10, allow_redirects=False)
    assert refused.status_code == 302 and "/console/signin" in refused.headers["Location"]


def test_revoking_the_token_ends_its_console_sessions(console: Console) -> None:
    admin = console.server.session()
    created = admin.post(
        f"{console.server.https_url}/api/v1/tokens",
        json={"name": "short-lived", "role": "auditor"},
        timeout=10,
    ).json()
    session, _csrf = console_signin(console.server, created["secret"])
    assert session.get(console.url("/audit"), timeout=10).status_code == 200
    revoked = admin.delete(f"{console.server.https_url}/api/v1/tokens/{created['id']}", timeout=10)
    assert revoked.status_code == 200
    refused = session.get(console.url("/audit"), timeout=10, allow_redirects=False)
    assert refused.status_code == 302
    assert "revoked" in refused.headers["Location"]


def test_a_subject_with_markup_is_shown_as_text(console: Console) -> None:
    cn = "<script>document.title='owned'</script>"
    answer = Scep(console.server, "/scep").enroll(
        Device.new("markup"), STATIC_CHALLENGE, cn, uuid.uuid4().hex
    )
    assert answer.status is PkiStatus.SUCCESS, answer.fail_info_text
    serial = format(answer.certificates[0].serial_number, "x")
    console.sign_in("auditor")
    console.open(f"/certificates/{console.issuing}/{serial}")
    with console.database() as db:
        (stored,) = db.execute(
            "SELECT subject FROM certificates WHERE serial = ?", (serial,)
        ).fetchone()
    assert "<script>" in stored.replace("\\", "")
    assert console.text("#subject") == console.text("h1").removeprefix("Certificate ") == stored
    assert console.driver.title != "owned"
    assert console.driver.find_elements(By.TAG_NAME, "script") == []
    assert "&lt;script" in console.driver.page_source


def test_dashboard_counts_match_the_store(console: Console) -> None:
    # Something to count: one certificate now, one request held for approval.
    cn = f"dashboard-{uuid.uuid4().hex[:6]}"
    issued = Scep(console.server, "/scep").enroll(Device.new(cn), STATIC_CHALLENGE, cn, cn)
    assert issued.status is PkiStatus.SUCCESS, issued.fail_info_text
    held = Scep(console.server, "/mdm").enroll(Device.new(cn), HELD_CHALLENGE, cn, cn)
    assert held.status is PkiStatus.PENDING
    console.sign_in("auditor")
    console.open("/")
    console.screenshot("dashboard")
    today = datetime.now(UTC).date().isoformat()
    with console.database() as db:
        (issued_today,) = db.execute(
            "SELECT count(*) FROM certificates WHERE substr(issued_at, 1, 10) = ?", (today,)
        ).fetchone()
        (pending,) = db.execute(
            "SELECT count(*) FROM scep_transactions WHERE status = 'PENDING'"
        ).fetchone()
        (within_90,) = db.execute(
            "SELECT count(*) FROM certificates WHERE status = 'ISSUED' AND not_after > ? "
            "AND not_after <= ?",
            (
                datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S"),
                (datetime.now(UTC) + timedelta(days=90)).strftime("%Y-%m-%d %H:%M:%S"),
            ),
        ).fetchone()
    chart = dict((row.split()[0], int(row.split()[-1])) for row in console.texts("#chart tbody tr"))
    assert len(chart) == 14 and chart[today] == issued_today >= 1, chart
    assert int(console.text("#pending-count")) == pending >= 1
    assert int(console.text(".expiring-90")) == within_90
    assert console.text("#failed-jobs") == "0"
    # Background jobs (CRLs after the revocation) may have committed an event whose anchor
    # line is still being written: "anchor-behind" is that moment, not a fault.
    assert console.text("#audit-state") in ("ok", "anchor-behind")
    assert len(console.texts("#cas tbody tr")) == 2


def test_pages_fit_a_phone_and_come_with_a_strict_policy(console: Console) -> None:
    console.sign_in("auditor")
    console.driver.set_window_size(390, 844)
    try:
        for path in (
            "/",
            "/cas",
            "/teams",
            f"/cas/{console.issuing}/policy",
            "/certificates",
            "/audit",
        ):
            console.open(path)
            overflow = console.driver.execute_script(
                "return document.documentElement.scrollWidth - window.innerWidth"
            )
            assert overflow <= 0, (path, overflow)
    finally:
        console.driver.set_window_size(1280, 800)
    answer = requests.get(console.url("/signin"), verify=str(console.server.tls_bundle), timeout=10)
    policy = answer.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "style-src 'self'" in policy
    assert "unsafe-inline" not in policy and "script-src" not in policy


def test_console_makes_a_token_of_several_roles_and_rotates_it_with_an_overlap(
    console: Console,
) -> None:
    session, csrf = console_signin(console.server, console.tokens["admin"])
    made = session.post(
        console.url("/tokens"),
        data={
            "csrf_token": csrf,
            "name": "two-roles",
            "roles": ["revoker", "auditor"],
            "allow_from": "127.0.0.0/8, ::1",
        },
        timeout=10,
    )
    assert made.status_code == 200, made.text
    secret = re.search(r'id="new-secret" class="wrap">([^<]+)<', made.text)
    assert secret is not None and "(revoker, auditor)" in made.text
    token_id = secret.group(1).split("_")[1]
    api = f"{console.server.https_url}/api/v1/cas"
    assert console.server.session(secret.group(1)).get(api, timeout=10).ok
    rotated = session.post(
        console.url(f"/tokens/{token_id}/rotate"),
        data={"csrf_token": csrf, "overlap": "1h"},
        timeout=10,
    )
    assert rotated.status_code == 200, rotated.text
    new_secret = re.search(r'id="new-secret" class="wrap">([^<]+)<', rotated.text)
    assert new_secret is not None and new_secret.group(1) != secret.group(1)
    for usable in (secret.group(1), new_secret.group(1)):  # the old one within the hour
        assert console.server.session(usable).get(api, timeout=10).ok
    refused = session.post(
        console.url(f"/tokens/{token_id}/rotate"),
        data={"csrf_token": csrf, "overlap": "30d"},
        timeout=10,
    )
    assert refused.status_code == 400 and "max_rotation_overlap" in refused.text


SHARED_TEMPLATE = "EndEntityServerAuthCertificate/V1"


def policy_version(console: Console, ca_id: str) -> int:
    with console.database() as db:
        (version,) = db.execute(
            "SELECT policy_version FROM authorities WHERE id = ?", (ca_id,)
        ).fetchone()
    return int(version)


def statement_rows(console: Console) -> dict[str, dict[str, str]]:
    """The access page's statements by id, each cell by its class."""
    cells = ("principal", "may", "templates", "names", "max-validity", "connectors")
    return {
        row.find_element(By.CSS_SELECTOR, ".statement-id").text: {
            cell: row.find_element(By.CSS_SELECTOR, f".{cell}").text for cell in cells
        }
        for row in console.driver.find_elements(By.CSS_SELECTOR, "#statements tbody tr")
        if row.find_elements(By.CSS_SELECTOR, ".statement-id")
    }


def test_admin_makes_a_team_and_shares_the_issuing_ca_with_it_for_a_template_and_a_suffix(
    console: Console,
) -> None:
    server, ca_id = console.server, console.issuing
    admin_api = server.session()
    console.sign_in("admin")
    console.open("/teams")
    console.driver.find_element(By.ID, "team-name").send_keys("console-b")
    console.press("create")
    teams = {
        row.find_element(By.CSS_SELECTOR, ".team").text: row
        for row in console.driver.find_elements(By.CSS_SELECTOR, "#teams tbody tr")
    }
    assert teams["console-b"].find_element(By.CSS_SELECTOR, ".tokens").text == "0"
    assert "Issuing CA" in teams["default"].find_element(By.CSS_SELECTOR, ".owned").text
    assert [e["resource"] for e in console.store_audit("team.create")] == ["team/console-b"]
    console.screenshot("teams")

    # Shared from the CA's page: team, actions, one template, one DNS suffix, 30 days.
    before = policy_version(console, ca_id)
    console.open(f"/cas/{ca_id}")
    console.press("access-link")
    assert console.text("#policy-version") == str(before)
    console.driver.find_element(By.ID, "share-team").send_keys("console-b")
    for action in ("issue", "read"):
        console.driver.find_element(
            By.CSS_SELECTOR, f"#share-actions input[value={action}]"
        ).click()
    Select(console.driver.find_element(By.ID, "share-templates")).select_by_value(SHARED_TEMPLATE)
    console.driver.find_element(By.ID, "share-dns").send_keys(".b.example")
    console.driver.find_element(By.ID, "share-days").send_keys("30")
    console.press("share-button")
    assert console.text("#saved") == f"Saved as version {before + 1}."
    assert policy_version(console, ca_id) == before + 1
    assert statement_rows(console)["share-console-b"] == {
        "principal": "team console-b",
        "may": "issue, read",
        "templates": SHARED_TEMPLATE,
        "names": "DNS: .b.example",
        "max-validity": "30 days",
        "connectors": "any",
    }
    console.screenshot("ca-policy")
    change = console.store_audit("ca.policy.set")[-1]
    assert change["resource"] == f"ca/{ca_id}" and change["result"] == "success"
    assert change["actor"].startswith("token:")
    assert change["parameters"]["version"] == before + 1
    assert change["parameters"]["replaces"] == before

    # It works: team B's token sees that CA and no other, and not its policy.
    made = admin_api.post(
        f"{server.https_url}/api/v1/tokens",
        json={"name": "console-b-issuer", "role": "issuer", "team": "console-b"},
        timeout=10,
    )
    assert made.status_code == 201, made.text
    team_b = server.session(made.json()["secret"])
    listed = team_b.get(f"{server.https_url}/api/v1/cas", timeout=10).json()["cas"]
    assert [ca["id"] for ca in listed] == [ca_id]
    b_console, _ = console_signin(server, made.json()["secret"])
    refused = b_console.get(console.url(f"/cas/{ca_id}/policy"), timeout=10)
    assert refused.status_code == 403 and "is its owner&#39;s" in refused.text

    # A document the core refuses comes back with its failing path; nothing is written.
    editor = console.driver.find_element(By.ID, "document")
    sent = {
        "statements": [
            {
                "id": "bad",
                "principal": {"team": "console-b"},
                "actions": ["read"],
                "conditions": {"dns_suffixes": ["not a suffix"]},
            }
        ]
    }
    editor.clear()
    editor.send_keys(json.dumps(sent))
    console.press("save-policy")
    assert console.text("#problem").startswith("policy statements[0].conditions.dns_suffixes[0]:")
    assert json.loads(console.driver.find_element(By.ID, "document").get_attribute("value")) == sent
    assert policy_version(console, ca_id) == before + 1

    # A form showing an old version is refused with the conflict, not applied.
    admin_console, csrf = console_signin(server, console.tokens["admin"])
    stale = admin_console.post(
        console.url(f"/cas/{ca_id}/policy"),
        data={"csrf_token": csrf, "document": '{"statements": []}', "replaces": str(before)},
        timeout=10,
    )
    assert stale.status_code == 409 and f"is at version {before + 1}" in stale.text

    # The editor saves a whole document; what a policy holds is shown as text.
    console.open(f"/cas/{ca_id}/policy")
    current = json.loads(console.driver.find_element(By.ID, "document").get_attribute("value"))
    current["statements"].append(
        {
            "id": "markup",
            "principal": {"team": "console-b"},
            "actions": ["read"],
            "conditions": {"templates": ["<script>document.title='owned'</script>"]},
        }
    )
    # Set as a paste would (typing it key by key takes seconds).
    console.driver.execute_script(
        "arguments[0].value = arguments[1];",
        console.driver.find_element(By.ID, "document"),
        json.dumps(current),
    )
    console.press("save-policy")
    assert policy_version(console, ca_id) == before + 2
    rows = statement_rows(console)
    assert rows["markup"]["templates"] == "<script>document.title='owned'</script>"
    assert console.driver.find_elements(By.TAG_NAME, "script") == []
    assert console.driver.title != "owned"

    # Each statement's Remove writes a version without it; with none, team B sees nothing.
    for statement in ("markup", "share-console-b"):
        row = next(
            r
            for r in console.driver.find_elements(By.CSS_SELECTOR, "#statements tbody tr")
            if r.find_element(By.CSS_SELECTOR, "td").text == statement
        )
        console.click(row.find_element(By.CSS_SELECTOR, "button.remove-statement"))
        assert statement not in statement_rows(console)
    assert policy_version(console, ca_id) == before + 4
    assert console.texts("#history tbody .version")[:2] == [str(before + 4), str(before + 3)]
    assert team_b.get(f"{server.https_url}/api/v1/cas", timeout=10).json()["cas"] == []
    # Every change is audited, and so is every refusal, with its reason.
    events = console.store_audit("ca.policy.set")[-6:]
    assert [(e["result"], e["parameters"].get("version")) for e in events] == [
        ("success", before + 1),
        ("failure", None),
        ("failure", None),
        ("success", before + 2),
        ("success", before + 3),
        ("success", before + 4),
    ]
    assert [e["parameters"]["error"] for e in events[1:3]] == ["badPolicy", "conflict"]


def test_an_auditor_reads_a_cas_policy_without_the_forms_and_may_not_set_it(
    console: Console,
) -> None:
    ca_id = console.issuing
    version = policy_version(console, ca_id)
    console.sign_in("auditor")
    console.open(f"/cas/{ca_id}")
    console.press("access-link")
    assert console.text("#policy-version") == str(version)
    assert console.driver.find_elements(By.ID, "history")
    for form in ("#policy-editor", "#share", "button.remove-statement"):
        assert console.driver.find_elements(By.CSS_SELECTOR, form) == [], form
    session, csrf = console_signin(console.server, console.tokens["auditor"])
    refused = session.post(
        console.url(f"/cas/{ca_id}/policy"),
        data={"csrf_token": csrf, "document": '{"statements": []}', "replaces": str(version)},
        timeout=10,
    )
    assert refused.status_code == 403 and "may not do this" in refused.text
    assert policy_version(console, ca_id) == version


def test_an_admin_deletes_a_team_after_typing_its_name_and_an_auditor_is_offered_none(
    console: Console,
) -> None:
    server = console.server
    admin_api = server.session()
    for name in ("console-gone", "console-kept"):
        made = admin_api.post(f"{server.https_url}/api/v1/teams", json={"name": name}, timeout=10)
        assert made.status_code == 201, made.text
    kept = admin_api.post(
        f"{server.https_url}/api/v1/tokens",
        json={"name": "console-kept-auditor", "role": "auditor", "team": "console-kept"},
        timeout=10,
    ).json()
    console.sign_in("admin")
    console.open("/teams")
    assert console.driver.find_elements(By.ID, "delete-team-default") == []
    # A team with a live token: the API's 409 reason, and the team stays.
    console.press("delete-team-console-kept")
    console.driver.find_element(By.ID, "confirm").send_keys("console-kept")
    console.press("do")
    assert f"its tokens {kept['id']} are live" in console.text("#message")
    console.open("/teams")
    console.press("delete-team-console-gone")
    assert console.text("#confirm-team") == "console-gone"
    console.screenshot("confirm-team")
    console.driver.find_element(By.ID, "confirm").send_keys("console-gone")
    console.press("do")
    shown = console.texts("#teams .team")
    assert "console-gone" not in shown and "console-kept" in shown
    deletions = [(e["resource"], e["result"]) for e in console.store_audit("team.delete")]
    assert deletions[-2:] == [("team/console-kept", "failure"), ("team/console-gone", "success")]
    console.sign_in("auditor")
    console.open("/teams")
    assert "console-kept" in console.texts("#teams .team")
    assert console.driver.find_elements(By.CSS_SELECTOR, ".delete-team") == []


def test_certificate_search_paging_report_ca_deletion_and_sign_out_over_http(
    console: Console,
) -> None:
    """The console's pages that a browser adds nothing to, fetched as it would (the
    session cookie, the CSRF token): search filters and paging, a certificate's events and
    chain, the CA's CRLs, the audit report downloads, delete and restore, sign out."""
    from lxml import html

    server = console.server
    issuer = server.session(console.tokens["issuer"])
    prefix = f"pages-{uuid.uuid4().hex[:6]}"
    issue_url = f"{server.https_url}/api/v1/cas/{console.issuing}/certificates"
    serials = []
    for n in range(52):  # more than a page (50)
        validity = "2d" if n == 0 else "200d"
        made = issuer.post(
            issue_url,
            json={"csr": make_csr(f"{prefix}-{n}.example.test").decode(), "validity": validity},
            timeout=30,
        )
        assert made.status_code == 201, made.text
        serials.append(made.json()["serial"])
    session, csrf = console_signin(server, console.tokens["admin"])

    def fetch(path: str, **params: str) -> Any:
        answer = session.get(console.url(path), params=params, timeout=30)
        assert answer.status_code == 200, (path, answer.status_code, answer.text[:300])
        return html.fromstring(answer.text)

    def listed(tree: Any) -> list[str]:
        return [
            str(c) for c in tree.xpath("//table[@id='certificates']/tbody/tr/td[2]/code/text()")
        ]

    # Paging: 50, then the rest through the "Next page" link, each certificate once.
    first = fetch("/certificates", q=prefix, ca=console.issuing)
    (link,) = first.xpath("//a[@id='next']")
    rest = html.fromstring(session.get(server.https_url + link.get("href"), timeout=30).text)
    assert len(listed(first)) == 50 and not rest.xpath("//a[@id='next']")
    assert sorted(listed(first) + listed(rest)) == sorted(serials)
    # Filters: expiring within a week finds the 2-day certificate only; a serial, one.
    assert listed(fetch("/certificates", q=prefix, expiring_within="7d")) == [serials[0]]
    assert listed(fetch("/certificates", serial=serials[5])) == [serials[5]]
    assert listed(fetch("/certificates", q=prefix, status="REVOKED")) == []
    # A certificate's page: its issuance in the audit events, and the chain above it.
    page = fetch(f"/certificates/{console.issuing}/{serials[1]}")
    assert "certificate.issue" in page.xpath("//table[@id='events']/tbody/tr/td[2]/text()")
    issuing_pem = requests.get(f"{server.http_url}/ca/{console.issuing}.pem", timeout=10).text
    assert issuing_pem.strip() in page.xpath("//pre[@class='pem']/text()")[0]
    # The CA's page lists its CRLs with their next update (one is made when first fetched).
    assert requests.get(f"{server.http_url}/crl/{console.issuing}.crl", timeout=30).ok
    crl_rows = fetch(f"/cas/{console.issuing}").xpath("//table[@id='crls']/tbody/tr")
    assert crl_rows and len(crl_rows[0].xpath("td")) == 4, "no CRL listed"
    assert datetime.fromisoformat(crl_rows[0].xpath("td")[3].text) > datetime.now(UTC)
    # The audit report (an auditor's), as JSON and as CSV, names the certificates issued.
    auditor, _ = console_signin(server, console.tokens["auditor"])
    for kind in ("json", "csv"):
        report = auditor.get(
            console.url("/audit/report"), params={"ca": console.issuing, "format": kind}, timeout=30
        )
        assert report.status_code == 200
        assert report.headers["Content-Type"].startswith(
            "application/json" if kind == "json" else "text/csv"
        )
        assert "attachment" in report.headers["Content-Disposition"]
        assert all(serial in report.text for serial in serials)
    # Delete and restore a CA, each after typing its id.
    admin = server.session()
    made_ca = admin.post(
        f"{server.https_url}/api/v1/cas",
        json={"type": "ROOT", "subject": f"CN={prefix} Root"},
        timeout=60,
    )
    assert made_ca.status_code == 201, made_ca.text
    ca_id = made_ca.json()["id"]

    def act(action: str) -> str:
        done = session.post(
            console.url(f"/cas/{ca_id}/{action}"),
            data={"csrf_token": csrf, "confirm": ca_id},
            timeout=30,
        )
        assert done.status_code == 200, (action, done.text[:300])
        return str(html.fromstring(done.text).xpath("//*[@id='ca-status']/text()")[0])

    assert [act(a) for a in ("disable", "delete", "restore")] == ["DISABLED", "DELETED", "DISABLED"]
    for action in ("ca.delete", "ca.restore"):
        assert [e["resource"] for e in console.store_audit(action)].count(f"ca/{ca_id}") == 1
    # Sign out: the session is gone, and the next page asks to sign in again.
    out = session.post(console.url("/signout"), data={"csrf_token": csrf}, timeout=30)
    assert out.status_code == 200 and "/console/signin" in out.url
    again = session.get(console.url("/"), timeout=30)
    assert again.url.endswith("/console/signin") or "/console/signin?" in again.url
    assert console.store_audit("console.signout")
