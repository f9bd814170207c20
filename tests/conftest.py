"""Shared test helpers. Checkpoints are built here, in the session, from the reference classes."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

# The CLI keeps a persistent compilation cache by default; tests compile afresh (and leave nothing in the user's
# cache) unless a test turns it on for itself.
os.environ["SDMESH_JAX_CACHE"] = "off"


def rel_error(actual, reference) -> float:
    """‖actual − reference‖₂ / ‖reference‖₂ in float64."""
    a = np.asarray(actual, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    assert a.shape == r.shape, f"shape {a.shape} != reference {r.shape}"
    return float(np.linalg.norm(a - r) / max(np.linalg.norm(r), 1e-30))


def assert_rel_close(actual, reference, tol: float = 1e-4) -> None:
    """The parity bar for fp32 tensors: relative L2 error ≤ 1e-4."""
    err = rel_error(actual, reference)
    assert err <= tol, f"relative error {err:.3e} > {tol:.0e}"


def wait_until(predicate, timeout: float = 10.0) -> bool:
    """Poll `predicate` until it holds (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Random-weight diffusers checkpoints (SD2- and SD1-shaped), saved by the reference classes once per session."""
    from sdmesh.services.dev import reference

    root = tmp_path_factory.mktemp("checkpoints")
    return {
        name: reference.build(root / name, reference.TINY[name], seed=i, perturb=0.02)
        for i, name in enumerate(("sd2", "sd1"))
    }


@pytest.fixture
def make_stack():
    """make_stack(denoisers=None, **gateway options): fake stages behind a real gateway in this process
    (tests/test_gateway.py's `Stack`), closed after the test."""
    from test_gateway import FakeDenoiser, Stack

    stacks = []

    def make(denoisers=None, **kwargs):
        stacks.append(Stack(denoisers if denoisers is not None else [FakeDenoiser()], **kwargs))
        return stacks[-1]

    yield make
    for s in stacks:
        s.close()
