"""Errors a caller can fix. JAX-free, so the gateway and the clients share them with the stages."""
from __future__ import annotations


class InvalidRequest(ValueError):
    """A request the caller can fix: the message says what was wrong and what to do."""


class FollowerLost(Exception):
    """A follower process of this multi-process stage died or went silent: the stage cannot run programs
    (UNAVAILABLE: the caller retries on another replica)."""
