"""Why a stage turned a call away before running it (the server maps these to statuses). JAX-free."""

from __future__ import annotations


class Overloaded(Exception):
    """The stage's queue is full: the caller should retry later or elsewhere (RESOURCE_EXHAUSTED)."""


class CallerGone(Exception):
    """The call was cancelled or passed its deadline while it waited: there is no one to answer."""
