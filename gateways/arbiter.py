"""The process `pkigate serve` becomes after its bootstrap: the arbiter (server.py).

gevent's monkey-patching comes first, before anything imports threading, socket or ssl.
The arbiter imports none of what its workers run; the zygotes it forks import it for
several workers at once (ZygoteArbiter), and a single worker imports it itself. Patched
here, every lock and socket those modules make at import is gevent's, as it would be had
each worker imported them after patching itself.
"""

from gevent import monkey

monkey.patch_all()

from pkigate.gateways.server import main  # noqa: E402

if __name__ == "__main__":
    main()
