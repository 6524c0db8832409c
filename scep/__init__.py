"""SCEP (RFC 8894) enrollment front-end. Not built yet: see the SCEP issue."""
