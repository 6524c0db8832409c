"""SCEP (RFC 8894) enrollment front-end.

`messages` is the wire format: pkiMessage parsing (signature, SCEP attributes, envelope)
and CertRep building, plus the client half used by the tests and devices-sim. `cms` holds
the CMS (RFC 5652) SignedData and EnvelopedData primitives underneath. `connector` is the
gateway connector (settings, HTTP routes, the PKIOperation flow), `authorization` decides
who may enroll (challenges, renewal), and `ra` keeps the RSA registration-authority
certificate that clients encrypt to.
"""
