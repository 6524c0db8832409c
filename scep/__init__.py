"""SCEP (RFC 8894) enrollment front-end.

`messages` is the wire format: pkiMessage parsing (signature, SCEP attributes, envelope)
and CertRep building, plus the client half used by the tests and devices-sim. `cms` holds
the CMS (RFC 5652) SignedData and EnvelopedData primitives underneath. The HTTP routes and
the authorization of requests come next (see the SCEP issue).
"""
