"""Composition root: CLI, configuration and (later) the HTTP gateway."""
