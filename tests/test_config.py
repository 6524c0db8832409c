"""The TOML configuration: typed settings, and errors that say where they are."""

from __future__ import annotations

from pathlib import Path

import pytest

from pkigate.core import CAType, KeyAlgorithm
from pkigate.gateways.config import ConfigError, load_config, parse_config

GOOD = """\
data_dir = "/srv/pkigate"
database_url = "postgresql://pkigate@db/pkigate"
workers = 4
max_body_bytes = 65536

[listeners]
http = "0.0.0.0:80"
https = "0.0.0.0:443"
public_http_url = "http://pki.example.com"

[[cas]]
name = "root"
type = "ROOT"
subject = "CN=Example Root,O=Example"
key_algorithm = "EC_secp384r1"
validity = "20y"

[[cas]]
name = "devices"
type = "SUBORDINATE"
parent = "root"
subject = "CN=Example Devices CA"
path_length = 0

[[connectors]]
type = "scep"
name = "intune"
mount = "/scep/intune"
ca = "devices"
template = "EndEntityClientAuthCertificate/V1"
validity = "1y"

[connectors.settings]
challenge = "webhook"

[[connectors]]
type = "scep"
name = "jamf"
mount = "/scep/jamf"
ca = "devices"
"""


def test_a_full_configuration_parses_into_typed_settings() -> None:
    config = parse_config(GOOD, "site.toml")
    assert (config.data_dir, config.workers, config.max_body_bytes) == (
        Path("/srv/pkigate"),
        4,
        65536,
    )
    assert config.listeners.http_url == "http://pki.example.com"
    assert config.listeners.https_url == "https://0.0.0.0:443"
    assert [(c.name, c.type, c.parent) for c in config.cas] == [
        ("root", CAType.ROOT, None),
        ("devices", CAType.SUBORDINATE, "root"),
    ]
    assert config.cas[0].key_algorithm == KeyAlgorithm.EC_secp384r1
    assert config.listeners.tls_from_ca == "devices"
    assert config.connectors is not None
    intune, jamf = config.connectors
    assert (intune.type, intune.mount, intune.ca, dict(intune.settings)) == (
        "scep",
        "/scep/intune",
        "devices",
        {"challenge": "webhook"},
    )
    assert jamf.name == "jamf"  # two instances of one type side by side


def test_empty_configuration_is_the_embedded_default() -> None:
    config = parse_config("")
    assert [c.name for c in config.cas] == ["root", "issuing"]
    assert config.connectors is None  # every installed connector type
    assert (config.listeners.http, config.listeners.https) == ("127.0.0.1:8080", "127.0.0.1:8443")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("workers = 4", "workers = 0"), "site.toml:3: workers: must be an integer from 1 to 64"),
        (("workers = 4", "wokrers = 4"), "site.toml:3: wokrers: unknown key"),
        (
            ('http = "0.0.0.0:80"', 'http = "port eighty"'),
            "site.toml:7: listeners.http: must be HOST:PORT",
        ),
        (
            ('key_algorithm = "EC_secp384r1"', 'key_algorithm = "DSA"'),
            "site.toml:15: cas[0].key_algorithm: must be one of",
        ),
        (
            ('parent = "root"', 'parent = "nowhere"'),
            "site.toml:21: cas[1].parent: 'nowhere' is not a CA defined before this one",
        ),
        (
            ('subject = "CN=Example Devices CA"', 'subject = "this is no DN"'),
            "site.toml:22: cas[1].subject: cannot parse distinguished name",
        ),
        (
            ('mount = "/scep/jamf"', 'mount = "/api/jamf"'),
            "site.toml:39: connectors[1].mount: must be a path",
        ),
        (
            ('ca = "devices"\ntemplate', 'ca = "other"\ntemplate'),
            "site.toml:29: connectors[0].ca: no CA named 'other'",
        ),
        (
            ('name = "jamf"', 'name = "intune"'),
            "site.toml:38: connectors[1].name: duplicate connector name 'intune'",
        ),
        (
            ('validity = "1y"', 'validity = "forever"'),
            "site.toml:31: connectors[0].validity: cannot parse validity",
        ),
        (
            ("[connectors.settings]", "[connectors.settingz]"),
            "site.toml:33: connectors[0].settingz: unknown key",
        ),
    ],
)
def test_a_wrong_key_type_or_value_is_reported_with_its_line(
    change: tuple[str, str], expected: str
) -> None:
    text = GOOD.replace(*change)
    assert text != GOOD
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "site.toml")
    assert str(caught.value).startswith(expected), str(caught.value)


def test_invalid_toml_is_reported_with_its_line() -> None:
    with pytest.raises(ConfigError, match=r"^site.toml:2: not valid TOML"):
        parse_config("workers = 1\nlisteners = {http = \n", "site.toml")


def test_unreadable_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
