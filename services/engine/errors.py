"""Engine errors the serving layer maps to statuses. JAX-free, so the servers can name them without loading JAX."""

from __future__ import annotations


class FollowerLost(Exception):
    """A follower process of this multi-process stage died or went silent: the stage cannot run programs
    (the server answers UNAVAILABLE, so the caller retries on another replica)."""


class AdaptersBusy(Exception):
    """Every LoRA bank row of this stage is held by a running request (RESOURCE_EXHAUSTED: retry later, or on
    another replica)."""
