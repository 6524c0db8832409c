"""pkigate installs under one namespace and coexists with certbot's `acme` package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

CHECK = """
import acme, acme.client, acme.messages
import pkigate.acme, pkigate.core, pkigate.gateways, pkigate.scep, pkigate.adcs, pkigate.devsim
assert "pkigate" not in acme.__file__, acme.__file__
assert acme.messages.Directory is not None
print(acme.__file__)
print(pkigate.acme.__file__)
"""


def test_certbot_acme_and_pkigate_acme_import_side_by_side(tmp_path: Path) -> None:
    pytest.importorskip("acme.client", reason="certbot is installed by the test extras")
    result = subprocess.run(
        [sys.executable, "-c", CHECK], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    certbot_acme, ours = result.stdout.split()
    assert "site-packages/acme/" in certbot_acme
    assert ours.endswith("acme/__init__.py") and "site-packages" not in ours


def test_certbot_itself_still_runs(tmp_path: Path) -> None:
    certbot = Path(sys.executable).parent / "certbot"
    if not certbot.exists():
        pytest.skip("certbot is installed by the test extras")
    result = subprocess.run(
        [str(certbot), "--version"], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0 and result.stdout.startswith("certbot "), result.stderr


def test_pkigate_console_script_is_installed() -> None:
    result = subprocess.run(
        [str(Path(sys.executable).parent / "pkigate"), "--version"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "version" in result.stdout


def test_wheel_carries_every_package_and_the_migrations(tmp_path: Path) -> None:
    import zipfile

    root = Path(__file__).resolve().parents[1]
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(root)],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("pkigate-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in (
        "pkigate/core/issuance.py",
        "pkigate/gateways/cli.py",
        "pkigate/acme/__init__.py",
        "pkigate/devsim/__init__.py",
        "pkigate/core/store/migrations/env.py",
        "pkigate/core/store/migrations/script.py.mako",
        "pkigate/core/store/migrations/versions/0001_initial_schema.py",
        # The console's pages and stylesheet (package data).
        "pkigate/gateways/console_templates/base.html",
        "pkigate/gateways/console_templates/_forms.html",
        "pkigate/gateways/console_static/console.css",
    ):
        assert expected in names
    assert not any(n.startswith(("acme/", "core/", "tests/")) for n in names)
    # PEP 639: the license as an SPDX expression; the TOML table form stops building with
    # setuptools after 2027-02-18 (it warns until then).
    (metadata,) = (n for n in names if n.endswith(".dist-info/METADATA"))
    assert "License-Expression: Apache-2.0" in zipfile.ZipFile(wheel).read(metadata).decode()
    assert "project.license` as a TOML table" not in build.stderr
