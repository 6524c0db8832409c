"""Shared fixtures: a core on SQLite or PostgreSQL, CAs, CSRs, a controllable clock."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import Clock, create_root, create_sub, fresh_postgres_database
from softhsm import softhsm  # noqa: F401 - the SoftHSM2 token fixture, for every test

from pkigate.core import CAView, Core

PG_BIN = Path("/usr/lib/postgresql")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pg_bindir() -> Path | None:
    if not PG_BIN.is_dir():
        return None
    versions = sorted(
        (p for p in PG_BIN.iterdir() if (p / "bin" / "initdb").exists()),
        key=lambda p: int(p.name) if p.name.isdigit() else 0,
    )
    return versions[-1] / "bin" if versions else None


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A private PostgreSQL cluster on loopback for this test session (base URL)."""
    if url := os.environ.get("PKIGATE_TEST_POSTGRES_URL"):
        yield url.rstrip("/")
        return
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (scripts/setup --test installs it)")
    root = Path(tempfile.mkdtemp(prefix="pkigate-pg-"))
    data = root / "data"
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
    port = _free_port()
    subprocess.run(
        [
            *as_user,
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
        ],
        check=True,
        capture_output=True,
    )
    log = root / "log"
    subprocess.run(
        [
            *as_user,
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(log),
            "-w",
            "-o",
            f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        # pg_ctl waits up to 60 s by default; CI's log showed a session's teardown take 61 s.
        # An immediate stop needs no more than a few: past 10, the postmaster is killed.
        stopped = subprocess.run(
            [*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-t", "10",
             "stop"],
            capture_output=True,
        )  # fmt: skip
        if stopped.returncode != 0:
            with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
                os.kill(int((data / "postmaster.pid").read_text().split()[0]), signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str | None:
    if request.param == "sqlite":
        return None
    server = request.getfixturevalue("postgres_server")
    return fresh_postgres_database(server)


@pytest.fixture
def core(tmp_path: Path, clock: Clock, database_url: str | None) -> Iterator[Core]:
    instance = Core.open(tmp_path / "data", database_url, clock=clock)
    yield instance
    instance.close()


@pytest.fixture
def sqlite_core(tmp_path: Path, clock: Clock) -> Iterator[Core]:
    instance = Core.open(tmp_path / "data", None, clock=clock)
    yield instance
    instance.close()


@pytest.fixture
def root(core: Core) -> CAView:
    return create_root(core)


@pytest.fixture
def issuing(core: Core, root: CAView) -> CAView:
    return create_sub(core, root, path_length=0)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Under scripts/test (PKIGATE_TOOLS_INSTALLED=1), which installs every server and
    client the tests drive, a test skipped because one is missing is a failure: a skip
    there would hide an interop test that no longer runs."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if not (os.environ.get("PKIGATE_TOOLS_INSTALLED") and report.skipped):
        return
    reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else ""
    if "install" in reason.lower() and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped although scripts/test installed the tools: {reason}"
