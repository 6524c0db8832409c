"""The ``[pkcs11]`` settings and the error a token that cannot be used raises, apart from
the binding (core/pkcs11.py): the configuration is parsed in every process, and only a
process with a token configured loads python-pkcs11 (a few MiB in each worker)."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from pkigate.core.errors import KeyBackendError


class TokenUnavailableError(KeyBackendError):
    """The token cannot be used now (absent, locked, wrong PIN): a 503, retried later."""

    code = "tokenUnavailable"


@dataclass(frozen=True)
class Pkcs11Settings:
    """The gateway's ``[pkcs11]`` table. The PIN is read when the token is opened, from
    the environment variable ``pin_env`` or the 0600 file ``pin_file``: it is in no
    configuration file and no object's repr."""

    module: Path
    token_label: str
    pin_env: str | None = None
    pin_file: Path | None = None

    def pin(self) -> str:
        if self.pin_env is not None:
            value = os.environ.get(self.pin_env)
            if not value:
                raise TokenUnavailableError(
                    f"the PIN of token {self.token_label!r} is not set: {self.pin_env} is empty"
                )
            return value
        assert self.pin_file is not None  # the configuration requires one of the two
        try:
            mode = stat.S_IMODE(self.pin_file.stat().st_mode)
            text = self.pin_file.read_text().strip()
        except OSError as exc:
            raise TokenUnavailableError(
                f"cannot read the PIN file {self.pin_file}: {exc.strerror}"
            ) from None
        if mode & 0o077:
            raise TokenUnavailableError(
                f"{self.pin_file} is readable by others (mode {mode:o}); chmod 600 it"
            )
        return text
