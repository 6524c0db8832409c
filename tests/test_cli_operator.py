"""The command line as an operator meets it: help and an example everywhere, one-line
errors (a JSON object with --json), tables with headers, CAs named by their configured name."""

from __future__ import annotations

import inspect
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from serving import PKIGATE

from pkigate.gateways.cli import main
from pkigate.gateways.config import parse_config
from pkigate.gateways.runtime import Gateway


def _commands(
    command: click.Command, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    yield path, command
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from _commands(sub, (*path, name))


def test_every_option_has_help_and_every_command_an_example_that_parses() -> None:
    missing_help, missing_example = [], []
    for path, command in _commands(main):
        name = " ".join(("pkigate", *path))
        missing_help += [
            f"{name} {param.opts[0]}"
            for param in command.params
            if isinstance(param, click.Option) and not param.help
        ]
        text = inspect.cleandoc(command.help or "")
        if "\nExample:\n" not in text:
            missing_example.append(name)
            continue
        example = text.split("\nExample:\n", 1)[1].replace("\\\n", " ").strip()
        usages = []
        for line in example.splitlines():
            words = shlex.split(line)
            assert words[0] == "pkigate", (name, line)
            # The example's words name real options and subcommands: parsed by click up
            # to --help (which stops before values are converted).
            shell = [i for i, word in enumerate(words) if word in (">", "&&", "|")]
            args = words[1 : shell[0]] if shell else words[1:]
            runner = CliRunner()
            with runner.isolated_filesystem():
                for word in args:  # files the example reads: a group checks them first
                    if re.fullmatch(r"[\w-]+\.(toml|pem|csr)", word):
                        Path(word).touch()
                result = runner.invoke(main, [*args, "--help"], prog_name="pkigate")
            assert result.exit_code == 0, f"{name}: example {line!r}: {result.output}"
            usages.append(result.output.splitlines()[0])
        # At least one line shows this command (a group's may show a subcommand).
        assert any(u.startswith(f"Usage: pkigate {' '.join(path)}".rstrip()) for u in usages), (
            name,
            usages,
        )
    assert missing_help == []
    assert missing_example == []


@pytest.fixture
def unwritable() -> Iterator[Path]:
    """A data directory this user cannot write (as root, permissions do not apply: the
    command then runs as nobody, who must reach it: not under pytest's 0700 tmp_path)."""
    parent = Path(tempfile.mkdtemp(prefix="pkigate-ro-"))
    parent.chmod(0o755)
    folder = parent / "ro"
    folder.mkdir(mode=0o555)
    yield folder
    shutil.rmtree(parent)


def _as_unprivileged(args: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return args
    setpriv = shutil.which("setpriv")
    assert setpriv, "util-linux setpriv runs the command as nobody"
    return [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", *args]


def test_an_unwritable_data_directory_is_one_line_and_a_json_error_with_json(
    unwritable: Path,
) -> None:
    human = subprocess.run(
        _as_unprivileged([PKIGATE, "--data-dir", str(unwritable), "ca", "list"]),
        capture_output=True,
        text=True,
        cwd="/",
    )
    assert human.returncode == 1
    assert human.stdout == ""
    assert human.stderr.splitlines() == [
        f"error: the data directory {unwritable} is not writable by this user; give it to "
        "the user pkigate runs as, or choose another with --data-dir or $PKIGATE_HOME "
        "[dataDirectory]"
    ]
    machine = subprocess.run(
        _as_unprivileged([PKIGATE, "--json", "--data-dir", str(unwritable), "cert", "list"]),
        capture_output=True,
        text=True,
        cwd="/",
    )
    assert machine.returncode == 1
    assert machine.stderr == ""
    error = json.loads(machine.stdout)["error"]
    assert error["code"] == "dataDirectory"
    assert str(unwritable) in error["message"]


def test_json_errors_for_a_missing_ca_and_for_usage(tmp_path: Path) -> None:
    runner = CliRunner()
    data = str(tmp_path / "data")
    missing = runner.invoke(
        main,
        ["--json", "--data-dir", data, "ca", "describe", "8c1f6a8e-6b2a-4d8e-9a43-0f3c1e2d4b5a"],
    )
    assert missing.exit_code == 1
    assert json.loads(missing.stdout)["error"]["code"] == "notFound"
    usage = runner.invoke(main, ["--json", "--data-dir", data, "cert", "list", "--limit", "0"])
    assert usage.exit_code == 2
    assert json.loads(usage.stdout)["error"]["code"] == "usage"


def _two_configured(data_dir: Path) -> dict[str, str]:
    gateway = Gateway.open(parse_config(f'data_dir = "{data_dir}"'), bootstrap=True)
    try:
        return dict(gateway.ca_ids)
    finally:
        gateway.close()


def test_ca_and_parent_take_a_configured_name_tables_have_headers_and_ambiguity_is_refused(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    ids = _two_configured(data)  # the embedded default: "root" and "issuing"
    runner = CliRunner()

    def run(*args: str) -> click.testing.Result:
        return runner.invoke(main, ["--data-dir", str(data), *args])

    created = json.loads(
        run(
            "--json",
            "ca",
            "create",
            "--type",
            "SUBORDINATE",
            "--parent",
            "root",
            "--subject",
            "CN=Named Parent",
        ).stdout
    )
    assert created["parent_id"] == ids["root"]
    listing = run("cert", "list", "--ca", "root").output.splitlines()
    assert re.split(r"\s{2,}", listing[0].strip()) == [
        "SERIAL",
        "STATUS",
        "EXPIRES",
        "TEMPLATE",
        "SUBJECT",
    ]
    assert any("CN=pkigate Issuing CA" in line for line in listing[2:])
    cas = run("ca", "list").output.splitlines()
    assert re.split(r"\s{2,}", cas[0].strip()) == ["ID", "TYPE", "STATUS", "EXPIRES", "SUBJECT"]
    assert {line.split()[0] for line in cas[2:]} == {*ids.values(), created["id"]}

    unknown = run("cert", "list", "--ca", "nope")
    assert unknown.exit_code == 2
    assert "no CA has the id or configured name 'nope'" in unknown.output
    # A second CA carrying the same configured name: the name no longer says which.
    tagged = run("ca", "tag", created["id"], "pkigate:config-name=root")
    assert tagged.exit_code == 0, tagged.output
    ambiguous = run("cert", "list", "--ca", "root")
    assert ambiguous.exit_code == 2
    assert "'root' names 2 CAs" in ambiguous.output and created["id"] in ambiguous.output


def test_shell_completion_as_the_readme_sets_it_up_completes_commands() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert 'eval "$(_PKIGATE_COMPLETE=bash_source pkigate)"' in readme
    env = {**os.environ, "_PKIGATE_COMPLETE": "bash_complete", "COMP_WORDS": "pkigate ca cr"}
    result = subprocess.run(
        [PKIGATE], env={**env, "COMP_CWORD": "2"}, capture_output=True, text=True, check=True
    )
    assert "plain,create" in result.stdout.splitlines()
