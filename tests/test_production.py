"""Running in production: the systemd unit as shipped, and the KEK as a systemd credential."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import create_root

from pkigate.core import Core
from pkigate.core.errors import KeyBackendError
from pkigate.core.keys import CREDENTIALS_DIRECTORY_ENV, KEK_CREDENTIAL, KEK_ENV, KEK_FILE

UNIT = Path(__file__).resolve().parents[1] / "contrib" / "systemd" / "pkigate.service"
INSTALLED = "/opt/pkigate/.venv/bin/pkigate"


def _unit_settings() -> dict[str, str]:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return dict(parser["Service"])


def test_the_systemd_unit_passes_systemd_analyze_verify_without_a_warning(
    tmp_path: Path,
) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is installed by scripts/setup --test (Debian: systemd)")
    # Verbatim but for where pkigate is installed: verify checks that ExecStart exists.
    unit = tmp_path / "pkigate.service"
    unit.write_text(
        UNIT.read_text().replace(INSTALLED, str(Path(sys.executable).parent / "pkigate"))
    )
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    # verify exits 0 on unknown keys and bad values (it ignores them): any output fails.
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stderr


def test_the_systemd_unit_is_hardened_and_passes_the_kek_as_a_credential() -> None:
    service = _unit_settings()
    assert service["ExecStart"].startswith(f"{INSTALLED} serve")
    assert service["User"] == "pkigate" and service["StateDirectory"] == "pkigate"
    assert service["Environment"] == "PKIGATE_HOME=/var/lib/pkigate"
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "ProtectHome": "yes",
        "CapabilityBoundingSet": "",
    }.items():
        assert service[key] == value, key
    assert service["LoadCredential"].startswith(f"{KEK_CREDENTIAL}:")


def test_the_kek_is_read_from_the_systemd_credential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / KEK_CREDENTIAL).write_text("ab" * 32 + "\n")
    monkeypatch.delenv(KEK_ENV, raising=False)
    monkeypatch.setenv(CREDENTIALS_DIRECTORY_ENV, str(credentials))
    data = tmp_path / "data"
    core = Core.open(data)
    try:
        create_root(core, "Credential Root")
    finally:
        core.close()
    assert not (data / KEK_FILE).exists()
    Core.open(data).close()  # the same credential opens the sealed key again

    monkeypatch.delenv(CREDENTIALS_DIRECTORY_ENV)
    with pytest.raises(KeyBackendError, match="missing but the store holds keys"):
        Core.open(data)
