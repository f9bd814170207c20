"""Scaled dot-product attention shared by the UNet, the VAE and CLIP.

One function so the attention implementation is chosen in one place: the
models pass `impl` through from their config and never branch on it themselves.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("dot_product", "flash")


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
        # Filled in by the sharding issue (cuDNN / splash kernels); until then the
        # reference math keeps `--attention flash` runnable everywhere.
        pass
    dtype = q.dtype
    scale = q.shape[-1] ** -0.5
    if upcast:
        q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q * jnp.asarray(scale, q.dtype), k)  # (B, H, Lq, Lk)
    if causal:
        lq, lk = scores.shape[-2:]
        mask = jnp.tril(jnp.ones((lq, lk), dtype=bool))
        scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v).astype(dtype)
