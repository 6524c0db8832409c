"""ACME (RFC 8555) server front-end. Not built yet: see the ACME issue."""
