"""pebble-challtestsrv, Let's Encrypt's mock DNS server, for the ACME tests.

The process is the device simulator's :class:`~pkigate.devsim.challenges.ChallengeDns`
(free loopback ports, so parallel pytest-xdist workers each get their own server); this
adds the mock records the validation tests need beyond TXT. A queries for names without
a mock are answered with 127.0.0.1, AAAA only for mocked names::

    with ChallTestServer() as server:
        resolver = server.dns_address  # ("127.0.0.1", port) for dnspython
        server.set_txt("_acme-challenge.web.example.test.", value)

Records set by one test stay until cleared, so tests use names of their own.
"""

from __future__ import annotations

from collections.abc import Sequence

from pkigate.devsim.challenges import ChallengeDns, _fqdn


class ChallTestServer(ChallengeDns):
    def __enter__(self) -> ChallTestServer:
        self.start()
        return self

    def add_a(self, host: str, addresses: Sequence[str]) -> None:
        """Answer A queries for ``host`` with ``addresses``, in this order."""
        self._post("/add-a", {"host": _fqdn(host), "addresses": list(addresses)})

    def clear_a(self, host: str) -> None:
        self._post("/clear-a", {"host": _fqdn(host)})

    def add_aaaa(self, host: str, addresses: Sequence[str]) -> None:
        self._post("/add-aaaa", {"host": _fqdn(host), "addresses": list(addresses)})

    def clear_aaaa(self, host: str) -> None:
        self._post("/clear-aaaa", {"host": _fqdn(host)})

    def set_cname(self, host: str, target: str) -> None:
        """Answer queries for ``host`` with a CNAME to ``target`` and ``target``'s records."""
        self._post("/set-cname", {"host": _fqdn(host), "target": _fqdn(target)})

    def clear_cname(self, host: str) -> None:
        self._post("/clear-cname", {"host": _fqdn(host)})

    def set_servfail(self, host: str) -> None:
        """Answer every query for ``host`` with SERVFAIL."""
        self._post("/set-servfail", {"host": _fqdn(host)})

    def clear_servfail(self, host: str) -> None:
        self._post("/clear-servfail", {"host": _fqdn(host)})
