"""pkigate's device simulator (``pkigate-sim``): fleets that drive every front-end over real
HTTP exactly as real clients do, check every certificate independently, and load the
server for the benchmarks.

Modules, by responsibility:

* ``scep_client`` and ``acme_client``: the wire clients (SCEP over HTTP, ACME JWS);
* ``devices``: the device kinds as state machines (phones over SCEP, servers over ACME);
  a new kind (AD-style machines) is one more ``Device`` subclass in ``DEVICE_KINDS``;
* ``challenges``: the http-01 responder on loopback and the test DNS server for dns-01;
* ``verify``: the independent check of each certificate (pyhanko-certvalidator path
  validation to the root, names, EKU, key, OCSP and CRL status);
* ``clock``: simulated time, so that short-lived certificates renew several times in a
  short run;
* ``attempts`` and ``events``: timing, recording and retrying each protocol exchange;
* ``fleet``: the scheduler over ``concurrency`` worker threads and the progress bar;
* ``spawn``: a `pkigate serve` of the simulator's own, and fault mode (SIGKILL, restart);
* ``postconditions``: what the server's store must say afterwards;
* ``report``: the per-protocol summary, JSON and plot; ``simulation`` ties a run
  together and ``cli`` is the ``pkigate-sim`` command.

The CI fleets are in tests/test_devsim.py. The large fleet (10,000 devices, 30,000
certificates with two renewals each) is not in CI; it is its own command::

    pkigate-sim run --spawn --workers 2 --phones 6000 --servers 4000 --renewals 2 \\
        --concurrency 16 --ramp-seconds 60 --json large-fleet.json --plot large-fleet.png

add ``--database-url postgresql://...`` to run it against PostgreSQL. On the two-core
development machine a 1,000-device fleet (600 phones, 400 servers, 3,000 certificates)
took 210 s, simulator and server sharing the CPU; the large fleet should take about ten
times that.
"""
