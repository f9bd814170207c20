"""The error a caller can fix. Dependency-free, so every layer (and the light CLI) can raise and catch it."""

from __future__ import annotations


class InvalidRequest(ValueError):
    """A request the caller can fix: the message says what was wrong and what to do."""
