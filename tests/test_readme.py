"""The README runs as written: every `sh` block not marked `no-run: why`, in order, in one
shell, in a fresh directory, against the real server, DNS server and clients it starts.

The blocks use the default ports (8080, 8443, 80 for http-01, 8053 for DNS) as a reader
would; the run has a network namespace of its own (``unshare``), so those ports are free
whatever else runs on this machine, and nothing it starts is reachable from outside."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)([^\n]*)\n(.*?)^```$", re.M | re.S)


def _blocks() -> list[tuple[str, str, str]]:
    return [
        (m.group(1), m.group(2).strip(), m.group(3)) for m in FENCE.finditer(README.read_text())
    ]


def test_blocks_not_run_say_why_and_the_clients_are_run() -> None:
    shell = [(info, body) for language, info, body in _blocks() if language == "sh"]
    skipped = [info for info, _ in shell if info.startswith("no-run")]
    assert all(re.fullmatch(r"no-run: \S.{10,}", info) for info in skipped), skipped
    assert all(info == "" for info, _ in shell if not info.startswith("no-run")), shell
    run = "\n".join(body for info, body in shell if info == "")
    for client in ("certbot certonly", "lego --server", "scepclient -server-url", "curl --cacert"):
        assert client in run, client
    assert len(skipped) <= 10  # kept small: each one is a reason the README is not tested


def test_relative_links_point_into_the_repository() -> None:
    text = README.read_text()
    links = re.findall(r"\]\(([^)#:]+)\)", text)
    assert links, "no relative link found"
    assert [link for link in links if not (ROOT / link).exists()] == []
    assert "../" not in "".join(re.findall(r"`(\.\./[^`]*)`", text))


def _isolated_network() -> list[str]:
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    if unshare is None or ip is None:
        pytest.fail("util-linux unshare and iproute2 ip are needed (scripts/setup --test)")
    return [
        unshare,
        "--map-root-user",
        "--net",
        "--",
        "sh",
        "-c",
        f'{ip} link set lo up && exec "$@"',
        "-",
    ]


def test_every_runnable_shell_block_of_the_readme_runs_verbatim(tmp_path: Path) -> None:
    script = "set -euo pipefail\n" + "\n".join(
        body for language, info, body in _blocks() if language == "sh" and info == ""
    )
    (tmp_path / "readme.sh").write_text(script)
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parent.parent)
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
    }
    process = subprocess.Popen(
        [*_isolated_network(), "bash", "readme.sh"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its background servers go with its process group
    )
    try:
        output, _ = process.communicate(timeout=600)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    logs = "".join(
        f"\n--- {name} ---\n{(tmp_path / name).read_text(errors='replace')[-3000:]}"
        for name in ("serve.log", "dns.log")
        if (tmp_path / name).exists()
    )
    assert process.returncode == 0, output[-6000:] + logs
    assert "device.pem: OK" in output and "cert.pem: OK" in output, output
    assert (tmp_path / "lego" / "certificates" / "www.example.test.crt").exists()
