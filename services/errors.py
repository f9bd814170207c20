"""Errors a caller can fix. JAX-free, so the gateway and the clients share them with the stages."""
from __future__ import annotations


class InvalidRequest(ValueError):
    """A request the caller can fix: the message says what was wrong and what to do."""
