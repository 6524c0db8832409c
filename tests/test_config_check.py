"""`pkigate config check` and the checks `pkigate serve` runs before it changes anything:
every problem with its FILE:LINE, a "did you mean" for typos, nothing touched."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from serving import PKIGATE

from pkigate.core import Core
from pkigate.gateways import config as config_module
from pkigate.gateways.cli import main
from pkigate.gateways.config import ConfigError, check_connectors, parse_config
from pkigate.gateways.runtime import Gateway

CAS = """\
[[cas]]
name = "root"
type = "ROOT"
subject = "CN=Check Root"
key_algorithm = "EC_secp384r1"

[[cas]]
name = "issuing"
type = "SUBORDINATE"
parent = "root"
subject = "CN=Check Issuing"
"""

CONNECTORS = """
[[connectors]]
type = "acme"
name = "acme"
mount = "/acme"
ca = "issuing"
[connectors.settings]
dns_resolver = "127.0.0.1:5353"

[[connectors]]
type = "scep"
name = "mdm"
mount = "/scep/mdm"
ca = "issuing"
[connectors.settings]
static_challenge = true
"""

GOOD = CAS + CONNECTORS


def test_the_example_documented_in_the_config_module_parses_and_checks() -> None:
    doc = config_module.__doc__ or ""
    block = doc.split("::\n", 1)[1].split("\nA wrong key", 1)[0]
    text = "\n".join(line.removeprefix("    ") for line in block.splitlines())
    config = parse_config(text, "documented.toml")
    check_connectors(config)
    assert [ca.name for ca in config.cas] == ["root", "issuing"]
    assert config.connectors is not None and config.connectors[0].settings == {
        "static_challenge": True,
        "dynamic_challenges": False,
    }


def _line(text: str, fragment: str) -> int:
    return text.splitlines().index(fragment) + 1


MISTAKES = [
    # (what is changed, the line that ends up wrong, the expected message)
    (
        ('[[cas]]\nname = "root"', '[[cas]]\nnmae = "root"'),
        'nmae = "root"',
        "cas[0].nmae: unknown key; did you mean 'name'?",
    ),
    (
        ("dns_resolver = ", "dns_resolvr = "),
        'dns_resolvr = "127.0.0.1:5353"',
        "connectors[0].settings.dns_resolvr: unknown setting; did you mean 'dns_resolver'?",
    ),
    (
        ("127.0.0.1:5353", "nowhere"),
        'dns_resolver = "nowhere"',
        "connectors[0].settings.dns_resolver: expected HOST:PORT, not 'nowhere'",
    ),
    # The mistake the module's documentation used to make: `challenge` is the password.
    (
        ("static_challenge = true", 'challenge = "static"'),
        'challenge = "static"',
        "connectors[1].settings.challenge: must be a string of at least 8 characters",
    ),
    (
        ("static_challenge = true", "ca_decrypts = true"),
        "ca_decrypts = true",
        "connectors[1].settings.ca_decrypts: the CA's key is EC_prime256v1; SCEP needs RSA",
    ),
    (
        ('type = "scep"', 'type = "secp"'),
        'type = "secp"',
        "connectors[1].type: unknown connector type 'secp'; did you mean 'scep'?",
    ),
    (
        (
            'ca = "issuing"\n[connectors.settings]\nstatic',
            'ca = "issuing"\ntemplate = "Nope/V1"\n[connectors.settings]\nstatic',
        ),
        'template = "Nope/V1"',
        "connectors[1].template: unknown template 'Nope/V1'",
    ),
    (
        ('subject = "CN=Check Issuing"', 'subject = "CN=Check Issuing"\nkey_algoritm = "RSA_2048"'),
        'key_algoritm = "RSA_2048"',
        "cas[1].key_algoritm: unknown key; did you mean 'key_algorithm'?",
    ),
]


@pytest.mark.parametrize(("change", "line", "expected"), MISTAKES)
def test_config_check_reports_each_mistake_with_its_line_and_touches_nothing(
    tmp_path: Path, change: tuple[str, str], line: str, expected: str
) -> None:
    text = GOOD.replace(*change)
    assert text != GOOD
    path = tmp_path / "site.toml"
    path.write_text(text)
    os.chdir(tmp_path)  # where a default data directory would be made
    result = CliRunner().invoke(main, ["config", "check", str(path)], env={"PKIGATE_HOME": ""})
    assert result.exit_code == 1
    assert result.output.startswith(f"error: {path}:{_line(text, line)}: {expected}"), result.output
    assert len(result.output.splitlines()) == 1
    assert os.listdir(tmp_path) == ["site.toml"]


def test_config_check_accepts_a_good_file_and_lines_are_found_in_inline_tables(
    tmp_path: Path,
) -> None:
    path = tmp_path / "site.toml"
    path.write_text(GOOD)
    result = CliRunner().invoke(main, ["--json", "config", "check", str(path)])
    assert result.exit_code == 0, result.output
    assert '"connectors": [\n    "acme",\n    "mdm"\n  ]' in result.output
    inline = CAS + (
        '\n[[connectors]]\ntype = "acme"\nname = "a"\nmount = "/a"\n'
        "settings = { order_lifetime_seconds = 0 }\n"
    )
    with pytest.raises(ConfigError) as caught:
        check_connectors(parse_config(inline, "inline.toml"))
    assert str(caught.value).startswith(
        f"inline.toml:{_line(inline, 'settings = { order_lifetime_seconds = 0 }')}: "
        "connectors[0].settings.order_lifetime_seconds: expected an integer"
    )


def _bootstrap(data_dir: Path, text: str) -> None:
    gateway = Gateway.open(parse_config(f'data_dir = "{data_dir}"\n' + text), bootstrap=True)
    gateway.close()


def _store_state(data_dir: Path) -> tuple[list[str], int]:
    core = Core.open(data_dir)
    try:
        cas = sorted(view.record.id for view in core.authorities.list_cas())
        return cas, len(list(core.audit.events()))
    finally:
        core.close()


def test_serve_checks_the_whole_file_before_it_creates_or_changes_anything(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    _bootstrap(data, CAS + "[[connectors]]\ntype='acme'\nname='acme'\nmount='/acme'\n")
    before = _store_state(data)
    # A new CA, and a connector setting that is wrong: reported, the CA not created.
    text = (
        f'data_dir = "{data}"\n'
        + CAS
        + '\n[[cas]]\nname = "extra"\ntype = "SUBORDINATE"\nparent = "root"\n'
        'subject = "CN=Extra"\n' + CONNECTORS.replace("dns_resolver = ", "dns_resolvr = ")
    )
    path = tmp_path / "site.toml"
    path.write_text(text)
    result = subprocess.run(
        [PKIGATE, "serve", "--config", str(path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    wrong = _line(text, 'dns_resolvr = "127.0.0.1:5353"')
    # Not on a terminal: the refusal is the server's one JSON log line.
    (line,) = result.stderr.splitlines()
    record = json.loads(line)
    assert (record["level"], record["code"]) == ("ERROR", "configError")
    assert record["msg"].startswith(
        f"{path}:{wrong}: connectors[0].settings.dns_resolvr: unknown setting"
    ), record
    assert _store_state(data) == before


@pytest.mark.parametrize(
    ("change", "key", "stored"),
    [
        (
            ('subject = "CN=Check Issuing"', 'subject = "CN=Check Issuing v2"'),
            "subject",
            "'CN=Check Issuing'",
        ),
        (
            ('key_algorithm = "EC_secp384r1"', 'key_algorithm = "RSA_3072"'),
            "key_algorithm",
            "'EC_secp384r1'",
        ),
        (('parent = "root"', 'parent = "other"'), "parent", "'root'"),
    ],
)
def test_a_configured_ca_that_differs_from_the_stored_one_is_refused_at_its_line(
    tmp_path: Path, change: tuple[str, str], key: str, stored: str
) -> None:
    data = tmp_path / "data"
    other = '[[cas]]\nname = "other"\ntype = "ROOT"\nsubject = "CN=Other Root"\n\n'
    _bootstrap(data, other + CAS)
    before = _store_state(data)
    text = f'data_dir = "{data}"\n' + other + CAS.replace(*change)
    with pytest.raises(ConfigError) as caught:
        Gateway.open(parse_config(text, "site.toml"), bootstrap=True)
    changed_line = change[1].splitlines()[-1]
    message = str(caught.value)
    assert message.startswith(f"site.toml:{_line(text, changed_line)}: cas["), message
    assert re.search(rf"exists with {key} {re.escape(stored)}; a CA's {key} cannot change", message)
    assert "give the changed CA a new name" in message
    assert _store_state(data) == before
