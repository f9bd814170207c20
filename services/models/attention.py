"""Scaled dot-product attention shared by the UNet, the VAE and CLIP.

One function so the attention implementation is chosen in one place: the
models pass `impl` through from their config and never branch on it themselves.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("dot_product", "flash")
QUERY_BLOCK = 1024  # CPU "flash": queries per block, so scores take O(block · Lk) memory, not O(Lq · Lk)

log = logging.getLogger("sdmesh.attention")


@functools.cache
def _notice_cpu_fallback() -> None:
    log.warning(
        "--attention flash on CPU: no fused kernel here, using query-blocked attention "
        "(memory bounded by %d queries at a time; same numbers as dot_product)",
        QUERY_BLOCK,
    )


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    upcast: bool = False,
    impl: str = "dot_product",
) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v over (B, L, H, D) inputs; returns (B, Lq, H, D).

    `upcast` computes scores and softmax in float32 (diffusers' `upcast_attention`,
    which SD 2.1 needs in float16); the softmax is always taken in float32 when
    activations are half precision, as diffusers' attention processors do.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {impl!r}; choose one of {IMPLEMENTATIONS}")
    if impl == "flash":
        if jax.default_backend() == "cpu":  # read while tracing: the program is built for this backend
            _notice_cpu_fallback()
            return blocked_attention(q, k, v, causal=causal, upcast=upcast)
        # JAX's fused attention: cuDNN's flash kernel on GPU when dtype and shapes allow, XLA's own
        # lowering elsewhere (it computes the softmax in float32 either way).
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal)
    return _dot_product(q, k, v, causal=causal, upcast=upcast)


def blocked_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False, upcast: bool = False, block: int = QUERY_BLOCK
) -> jax.Array:
    """Attention over blocks of `block` queries, one block at a time (lax.map): each query's softmax sees
    every key, so the result is dot-product attention's, with scores held for one block only."""
    b, lq, h, d = q.shape
    if lq <= block or causal:  # CLIP's causal attention is 77 tokens: nothing to bound
        return _dot_product(q, k, v, causal=causal, upcast=upcast)
    pad = -lq % block
    blocks = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, -1, block, h, d).transpose(1, 0, 2, 3, 4)
    out = jax.lax.map(lambda qb: _dot_product(qb, k, v, causal=False, upcast=upcast), blocks)  # (n, B, block, H, D)
    return out.transpose(1, 0, 2, 3, 4).reshape(b, -1, h, d)[:, :lq]


def _dot_product(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool, upcast: bool) -> jax.Array:
    dtype = q.dtype
    b, lq, h, d = q.shape
    if upcast:
        q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    # Heads folded into the batch: (B, L, H, D) → (B·H, L, D). XLA:CPU runs these plain
    # batched matmuls up to 4× faster than the 4-D einsums at the UNet's small levels.
    qh, kh, vh = (t.transpose(0, 2, 1, 3).reshape(b * h, t.shape[1], d) for t in (q, k, v))
    scores = jnp.einsum("bqd,bkd->bqk", qh * jnp.asarray(d**-0.5, qh.dtype), kh)  # (B·H, Lq, Lk)
    if causal:
        mask = jnp.tril(jnp.ones(scores.shape[-2:], dtype=bool))
        scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(vh.dtype)
    out = jnp.einsum("bqk,bkd->bqd", weights, vh)  # (B·H, Lq, D)
    return out.reshape(b, h, lq, d).transpose(0, 2, 1, 3).astype(dtype)
