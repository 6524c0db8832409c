"""The development directory (slapd with the example AD domain) as a pytest fixture.

Import the fixture into a test module (``from adcs_directory_fixture import dev_directory``),
or make one of another scope with :func:`make_dev_directory_fixture`. Each pytest-xdist
worker starts its own slapd, on a free loopback port, in its own temporary directory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Literal

import pytest

from pkigate.adcs.directory import DevDirectory, slapd_available

Scope = Literal["session", "package", "module", "class", "function"]


def make_dev_directory_fixture(scope: Scope = "session") -> Callable[..., Any]:
    """A fixture yielding a running :class:`DevDirectory`, stopped when its scope ends."""

    @pytest.fixture(scope=scope)
    def dev_directory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevDirectory]:
        if not slapd_available():
            pytest.skip("OpenLDAP slapd is not installed (scripts/setup --test installs it)")
        directory = DevDirectory(tmp_path_factory.mktemp("adcs-directory"))
        with directory:
            yield directory

    return dev_directory


dev_directory = make_dev_directory_fixture()
