"""Why a stage turned a call away or gave up on it (the server maps these to statuses). JAX-free."""

from __future__ import annotations


class Overloaded(Exception):
    """The stage's queue is full: the caller should retry later or elsewhere (RESOURCE_EXHAUSTED)."""


class OutOfDeviceMemory(Overloaded):
    """The device ran out of memory running the call's batch, alone or at the smallest batch tried
    (RESOURCE_EXHAUSTED: another replica, fewer images or a smaller size may fit)."""


class Draining(Exception):
    """The stage is shutting down: it admits nothing new and ends what is left at its drain deadline
    (UNAVAILABLE, so a gateway retries the call on another replica)."""


class CallerGone(Exception):
    """The call was cancelled or passed its deadline while it waited: there is no one to answer."""


def is_out_of_memory(error: BaseException) -> bool:
    """Whether a runtime error is the device running out of memory (XLA reports RESOURCE_EXHAUSTED)."""
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()
