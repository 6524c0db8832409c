"""A SoftHSM2 token of the tests' own, in a temporary SOFTHSM2_CONF directory (never the
system's), and what the tests read back from it with OpenSC's pkcs11-tool.

SoftHSM reads its configuration when the library is initialised, once per process: the
token is therefore made once per test session (tests tell their keys apart by label),
and a server started by a test inherits SOFTHSM2_CONF and the PIN's variable."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pkigate.core.pkcs11_settings import Pkcs11Settings

MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")
PIN_ENV = "PKIGATE_TEST_PKCS11_PIN"


@dataclass(frozen=True)
class SoftHsm:
    conf: Path
    tokens: Path
    token_label: str
    pin: str
    so_pin: str

    def settings(self, **changes: object) -> Pkcs11Settings:
        values: dict[str, object] = {
            "module": MODULE,
            "token_label": self.token_label,
            "pin_env": PIN_ENV,
        }
        values.update(changes)
        return Pkcs11Settings(**values)  # type: ignore[arg-type]

    def config(self, module: Path = MODULE, pin_env: str = PIN_ENV) -> str:
        """The gateway configuration's [pkcs11] table for this token."""
        return (
            f'[pkcs11]\nmodule = "{module}"\ntoken_label = "{self.token_label}"\n'
            f'pin_env = "{pin_env}"\n'
        )

    def objects(self) -> str:
        """pkcs11-tool's listing of the token's objects, logged in (private ones too)."""
        return self.tool("--list-objects").stdout

    def tool(self, *arguments: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                "pkcs11-tool",
                "--module",
                str(MODULE),
                "--token-label",
                self.token_label,
                "--login",
                "--pin",
                self.pin,
                *arguments,
            ],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, "SOFTHSM2_CONF": str(self.conf)},
        )


def private_key_objects(listing: str) -> dict[str, str]:
    """pkcs11-tool's private key objects: label -> the object's lines (each object starts
    with an unindented line, its attributes indented below)."""
    blocks: list[list[str]] = []
    for line in listing.splitlines():
        if line and not line[0].isspace():
            blocks.append([])
        if blocks:
            blocks[-1].append(line)
    found: dict[str, str] = {}
    for block in blocks:
        if block[0].startswith("Private Key Object"):
            for line in block:
                if line.strip().startswith("label:"):
                    found[line.split(":", 1)[1].strip()] = "\n".join(block)
    return found


@pytest.fixture(scope="session")
def softhsm() -> Iterator[SoftHsm]:
    if not MODULE.exists() or shutil.which("softhsm2-util") is None:
        pytest.skip("SoftHSM2 is not installed (scripts/setup --test installs it)")
    root = Path(tempfile.mkdtemp(prefix="pkigate-softhsm-"))
    tokens = root / "tokens"
    tokens.mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\n")
    token = SoftHsm(conf, tokens, "pkigate-test", "246810", "13579-so")
    subprocess.run(
        [
            "softhsm2-util",
            "--init-token",
            "--free",
            "--label",
            token.token_label,
            "--pin",
            token.pin,
            "--so-pin",
            token.so_pin,
        ],
        check=True,
        capture_output=True,
        env={**os.environ, "SOFTHSM2_CONF": str(conf)},
    )
    saved = {name: os.environ.get(name) for name in ("SOFTHSM2_CONF", PIN_ENV)}
    os.environ["SOFTHSM2_CONF"] = str(conf)
    os.environ[PIN_ENV] = token.pin
    try:
        yield token
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(root, ignore_errors=True)
