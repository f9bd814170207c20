"""The attention implementations agree with each other and with the textbook formula."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_rel_close

from sdmesh.services.models.attention import attention


def textbook(q, k, v, causal):
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if causal:
        scores = np.where(np.tril(np.ones(scores.shape[-2:], bool)), scores, -np.inf)
    w = np.exp(scores - scores.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", w, v)


@pytest.mark.parametrize("impl", ["dot_product", "flash"])
@pytest.mark.parametrize("causal,lk", [(False, 77), (True, 33)])
def test_attention_matches_the_formula(impl, causal, lk):
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    lq = lk if causal else 33
    q = jax.random.normal(kq, (2, lq, 4, 16))
    k, v = jax.random.normal(kk, (2, lk, 4, 16)), jax.random.normal(kv, (2, lk, 4, 16))
    assert_rel_close(attention(q, k, v, causal=causal, impl=impl), textbook(q, k, v, causal), tol=1e-5)


def test_upcast_keeps_half_precision_inputs_close():
    kq, kk = jax.random.split(jax.random.key(1))
    q, k = jax.random.normal(kq, (1, 64, 2, 32)) * 4, jax.random.normal(kk, (1, 64, 2, 32)) * 4
    out = attention(q.astype(jnp.float16), k.astype(jnp.float16), k.astype(jnp.float16), upcast=True)
    assert out.dtype == jnp.float16
    assert_rel_close(out, textbook(q, k, k, False), tol=5e-3)


def test_unknown_implementation_is_named():
    x = jnp.zeros((1, 2, 1, 4))
    with pytest.raises(ValueError, match="unknown attention implementation 'magic'"):
        attention(x, x, x, impl="magic")


@pytest.mark.parametrize("lq", [7, 64, 100])
def test_query_blocked_attention_equals_dot_product(lq):
    """CPU's --attention flash: blocks of queries, each against every key, give the same numbers."""
    from sdmesh.services.models.attention import blocked_attention

    rng = np.random.default_rng(lq)
    q, k, v = (jnp.asarray(rng.standard_normal((2, n, 3, 8), dtype=np.float32)) for n in (lq, 50, 50))
    np.testing.assert_allclose(blocked_attention(q, k, v, block=16), attention(q, k, v), rtol=1e-5, atol=1e-6)
