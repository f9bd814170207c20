"""Shared layers: the fast lowerings compute the same convolution as the plain one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_rel_close

from sdmesh.services.models import layers


def plain_conv(x, kernel, padding, stride=1):
    return jax.lax.conv_general_dilated(
        x, kernel, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


@pytest.mark.parametrize(
    "size,k,padding",
    [
        (4, 3, ((1, 1), (1, 1))),
        (16, 3, ((1, 1), (1, 1))),
        (8, 1, ((0, 0), (0, 0))),
        (5, 3, ((0, 1), (0, 1))),
        (40, 3, ((1, 1), (1, 1))),
    ],
)
def test_conv2d_equals_plain_convolution(size, k, padding):
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (2, size, size + 1, 6))
    kernel = jax.random.normal(kw, (k, k, 6, 5))
    assert_rel_close(layers.conv2d(x, kernel, padding=padding), plain_conv(x, kernel, padding), tol=1e-6)


@pytest.mark.parametrize("shape", [(1, 3, 5, 4), (2, 8, 8, 6), (1, 20, 20, 3)])
def test_upsample_conv_equals_nearest_upsample_then_conv(shape):
    kx, kw = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, shape)
    kernel = jax.random.normal(kw, (3, 3, shape[-1], 7))
    upsampled = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    assert_rel_close(layers.upsample_conv2d(x, kernel), plain_conv(upsampled, kernel, ((1, 1), (1, 1))), tol=1e-6)


def test_upsample_needs_a_3x3_same_convolution():
    with pytest.raises(ValueError, match="3×3"):
        layers.Conv2d(4, 1, upsample=True).init(jax.random.key(0), np.zeros((1, 4, 4, 2), np.float32))


def group_norm_float64(x, groups, scale, bias, eps):
    x = np.asarray(x, np.float64)
    b, h, w, c = x.shape
    xg = x.reshape(b, h * w, groups, c // groups)
    mean, var = xg.mean(axis=(1, 3), keepdims=True), xg.var(axis=(1, 3), keepdims=True)
    return ((xg - mean) / np.sqrt(var + eps)).reshape(x.shape) * np.asarray(scale) + np.asarray(bias)


@pytest.mark.parametrize(
    "shape,groups,offset", [((2, 8, 8, 32), 8, 0.0), ((1, 16, 12, 64), 32, 50.0), ((2, 4, 4, 96), 32, -7.0)]
)
def test_group_norm_equals_torch_semantics(shape, groups, offset):
    x = jax.random.normal(jax.random.key(2), shape) * 2 + offset + jnp.arange(shape[-1]) * 0.1
    scale, bias = jax.random.normal(jax.random.key(3), (shape[-1],)), jnp.arange(shape[-1]) * 0.01
    ours = layers.GroupNorm(groups, 1e-5).apply({"params": {"scale": scale, "bias": bias}}, x)
    # float32 inputs with a mean of 50 carry ~3e-6 relative rounding of their own
    assert_rel_close(ours, group_norm_float64(x, groups, scale, bias, 1e-5), tol=5e-6)
