"""CA keys are sealed at rest under the operator's key-encryption key."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from helpers import create_root

from pkigate.core import Core, KeyAlgorithm
from pkigate.core.errors import KeyBackendError
from pkigate.core.keys import KEK_ENV, KeyEncryptionKey, SoftwareKeyBackend


def _private_forms(core: Core, ca_id: str) -> list[bytes]:
    material = core.authorities.signing_material(ca_id, core.issuer._clock())
    key = material.private_key
    der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    traditional = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    secret = key.private_numbers()
    scalar = secret.private_value if hasattr(secret, "private_value") else secret.d  # type: ignore[union-attr]
    return [der, traditional, scalar.to_bytes((scalar.bit_length() + 7) // 8, "big")]


@pytest.mark.parametrize("algorithm", [KeyAlgorithm.EC_prime256v1, KeyAlgorithm.RSA_2048])
def test_no_ca_private_key_is_written_in_clear(tmp_path: Path, algorithm: KeyAlgorithm) -> None:
    core = Core.open(tmp_path / "data")
    root = create_root(core, key_algorithm=algorithm)
    secrets_in_clear = _private_forms(core, root.record.id)
    core.close()
    for path in (tmp_path / "data").rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            for secret in secrets_in_clear:
                assert secret not in content, f"{path.name} holds the CA key in clear"
            assert b"PRIVATE KEY" not in content


def test_key_encryption_key_file_is_created_0600(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(KEK_ENV, raising=False)
    Core.open(tmp_path / "data").close()
    mode = stat.S_IMODE((tmp_path / "data" / "kek").stat().st_mode)
    assert mode == 0o600


def test_a_lost_kek_file_is_not_silently_replaced_and_the_database_is_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review: with the kek file deleted, a new key-encryption key was written
    before the sealed keys were found not to open; and pkigate.db was 0644."""
    monkeypatch.delenv(KEK_ENV, raising=False)
    data = tmp_path / "data"
    core = Core.open(data)
    create_root(core)
    core.close()
    assert stat.S_IMODE((data / "pkigate.db").stat().st_mode) == 0o600
    (data / "kek").rename(tmp_path / "kek.saved")
    with pytest.raises(KeyBackendError, match="missing but the store holds keys"):
        Core.open(data)
    assert not (data / "kek").exists()
    (tmp_path / "kek.saved").rename(data / "kek")
    Core.open(data).close()
    (data / "kek").write_text("not a key")
    with pytest.raises(KeyBackendError, match=r"data/kek must hold 32 bytes"):
        Core.open(data)


def test_key_encryption_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    tmp_path.joinpath("kek").write_text(os.urandom(32).hex())
    tmp_path.joinpath("kek").chmod(0o644)
    with pytest.raises(KeyBackendError, match="chmod 600"):
        KeyEncryptionKey.load_or_create(tmp_path)


def test_a_different_key_encryption_key_cannot_use_the_ca_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEK_ENV, os.urandom(32).hex())
    core = Core.open(tmp_path / "data")
    root = create_root(core)
    core.close()
    monkeypatch.setenv(KEK_ENV, os.urandom(32).hex())
    with pytest.raises(KeyBackendError, match="another key-encryption key"):
        Core.open(tmp_path / "data")
    # The blob itself also refuses to open under the wrong key.
    with core.store.read() as conn:
        blob = core.store.key_blob(conn, root.record.key_id)
    assert blob is not None
    with pytest.raises(KeyBackendError, match="another key-encryption key"):
        SoftwareKeyBackend(KeyEncryptionKey(os.urandom(32))).load(root.record.key_id, blob)


def test_sealed_key_blob_is_bound_to_its_key_id_and_integrity_checked() -> None:
    kek = KeyEncryptionKey(os.urandom(32))
    backend = SoftwareKeyBackend(kek)
    blob = backend.generate("key-a", KeyAlgorithm.EC_prime256v1)
    fresh = SoftwareKeyBackend(kek)  # no cache
    assert fresh.load("key-a", blob).public_key() == backend.load("key-a", blob).public_key()
    with pytest.raises(KeyBackendError, match="integrity"):
        SoftwareKeyBackend(kek).load("key-b", blob)
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(KeyBackendError, match="integrity"):
        SoftwareKeyBackend(kek).load("key-a", tampered)


def test_kek_from_environment_accepts_hex_and_base64() -> None:
    import base64

    raw = os.urandom(32)
    assert KeyEncryptionKey.from_text(raw.hex()).key_id == KeyEncryptionKey(raw).key_id
    assert (
        KeyEncryptionKey.from_text(base64.b64encode(raw).decode()).key_id
        == KeyEncryptionKey(raw).key_id
    )
    with pytest.raises(KeyBackendError, match="32 bytes"):
        KeyEncryptionKey.from_text("abcd")


def test_processes_opening_a_fresh_data_directory_at_once_agree_on_one_kek(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess
    import sys

    monkeypatch.delenv(KEK_ENV, raising=False)
    script = (
        "import sys; from pathlib import Path; from pkigate.core.keys import KeyEncryptionKey;"
        "print(KeyEncryptionKey.load_or_create(Path(sys.argv[1])).key_id.hex())"
    )
    for attempt in range(8):
        directory = tmp_path / f"fresh-{attempt}"
        directory.mkdir()
        runs = [
            subprocess.Popen(
                [sys.executable, "-c", script, str(directory)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(3)
        ]
        outputs = [run.communicate(timeout=30) for run in runs]
        assert all(run.returncode == 0 for run in runs), outputs
        assert len({out for out, _ in outputs}) == 1
        assert sorted(p.name for p in directory.iterdir()) == ["kek"]
