"""Layers shared by the UNet, the text encoder and the VAE.

`Dense` and `Conv2d` take per-row LoRA updates from the "lora" variable collection when it holds theirs
(`engine.lora_bank`): each batch row n adds (x_n @ down_n) @ up_n, its adapters' stacked low-rank factors,
weights folded in. Without that collection they are the plain layers, bit for bit.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Padding = tuple[tuple[int, int], tuple[int, int]]

# On XLA:CPU a 3×3 convolution over a small feature map (the UNet's 8×8 and 4×4
# levels) runs at a third of matmul speed; written as one matmul over the nine
# shifted copies it runs at full speed. Measured on 2 cores (benchmarks/RESULTS.md):
# 8×8×1280 → 91 vs 333 GFLOP/s; at 32×32 and above the native convolution wins.
_CPU_MATMUL_CONV_MAX_PIXELS = 16 * 16


def _conv_as_matmul(x: jax.Array, kernel: jax.Array, padding: Padding) -> jax.Array:
    """Stride-1 convolution as im2col + one matmul: (B, H, W, C) · (kh, kw, C, O) → (B, H', W', O)."""
    kh, kw, c, o = kernel.shape
    x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    h, w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    patches = jnp.concatenate(
        [x[:, i : i + h, j : j + w, :] for i in range(kh) for j in range(kw)], axis=-1
    )  # (B, H', W', kh·kw·C)
    return jnp.einsum("bhwk,ko->bhwo", patches, kernel.reshape(kh * kw * c, o))


def _small(x: jax.Array) -> bool:
    return x.shape[1] * x.shape[2] <= _CPU_MATMUL_CONV_MAX_PIXELS


def conv2d(x: jax.Array, kernel: jax.Array, *, stride: int = 1, padding: Padding) -> jax.Array:
    """NHWC × HWIO convolution, lowered whichever way is fastest on this backend (same math either way)."""
    kh, kw = kernel.shape[:2]
    if stride == 1 and (kh * kw == 1 or (_small(x) and jax.default_backend() == "cpu")):
        return _conv_as_matmul(x, kernel, padding)
    return jax.lax.conv_general_dilated(
        x, kernel, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _phase_taps(w: jax.Array, phase: int, axis: int) -> jax.Array:
    """Fold a 3-tap kernel axis onto the 2 input rows that output phase `phase` of a ×2 nearest upsample reads.

    Output row 2i+0 reads upsampled rows 2i−1, 2i, 2i+1 = input rows i−1, i, i: taps (w0, w1+w2).
    Output row 2i+1 reads upsampled rows 2i, 2i+1, 2i+2 = input rows i, i, i+1: taps (w0+w1, w2).
    """
    w0, w1, w2 = (jnp.take(w, t, axis=axis) for t in range(3))
    return jnp.stack((w0, w1 + w2) if phase == 0 else (w0 + w1, w2), axis=axis)


def upsample_conv2d(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """conv3×3(nearest_upsample_2x(x), pad 1) without building the upsampled tensor.

    Each of the four output phases is a 2×2 convolution of x with folded taps: 4/9 of the
    multiply-adds and a quarter of the input traffic. (B, H, W, C) → (B, 2H, 2W, O).
    """
    b, h, w, _ = x.shape
    rows = []
    for a in range(2):
        cols = []
        for c in range(2):
            k = _phase_taps(_phase_taps(kernel, a, 0), c, 1)  # (2, 2, C, O)
            pad = ((1, 0) if a == 0 else (0, 1), (1, 0) if c == 0 else (0, 1))
            cols.append(conv2d(x, k, padding=pad))
        rows.append(jnp.stack(cols, axis=3))  # (B, H, W, 2, O): column phase
    y = jnp.stack(rows, axis=2)  # (B, H, 2, W, 2, O): row phase, column phase
    return y.reshape(b, 2 * h, 2 * w, y.shape[-1])


def lora_dense_delta(x: jax.Array, down: jax.Array, up: jax.Array) -> jax.Array:
    """Per-row low-rank update: x (N, ..., in), down (N, in, K), up (N, K, out) → (N, ..., out)."""
    h = jnp.einsum("n...i,nik->n...k", x, down.astype(x.dtype))
    return jnp.einsum("n...k,nko->n...o", h, up.astype(x.dtype))


def lora_conv_delta(x: jax.Array, down: jax.Array, up: jax.Array, *, stride: int, padding: Padding) -> jax.Array:
    """Per-row LoCon update: x (N, H, W, in), down (N, kh, kw, in, K) a convolution like the layer's, then up
    (N, K, out) as a 1×1 convolution → (N, H', W', out)."""
    h = jax.vmap(lambda xi, ki: conv2d(xi[None], ki, stride=stride, padding=padding)[0])(x, down.astype(x.dtype))
    return jnp.einsum("nhwk,nko->nhwo", h, up.astype(x.dtype))


class Dense(nn.Module):
    """flax.linen.Dense (params `kernel` (in, out) and `bias`, the same computation), plus per-row LoRA."""

    features: int
    use_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,)) if self.use_bias else None
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
        if bias is not None:
            y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        if self.has_variable("lora", "down"):
            y = y + lora_dense_delta(x, self.get_variable("lora", "down"), self.get_variable("lora", "up"))
        return y


class Conv2d(nn.Module):
    """torch.nn.Conv2d in NHWC: params `kernel` (kh, kw, in, out) and `bias`, symmetric padding (k−1)//2 by default.

    With `upsample=True` the input is first upsampled ×2 by nearest neighbour (diffusers'
    Upsample2D), computed by `upsample_conv2d` (3×3 kernels only).
    """

    features: int
    kernel_size: int
    stride: int = 1
    padding: Padding | None = None
    upsample: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        p = (k - 1) // 2
        padding = self.padding if self.padding is not None else ((p, p), (p, p))
        if self.upsample:
            if k != 3 or self.stride != 1 or self.padding not in (None, ((1, 1), (1, 1))):
                raise ValueError("upsample=True needs a 3×3, stride-1, pad-1 convolution")
            if not _small(x):
                return self._with_lora(upsample_conv2d(x, kernel) + bias, x, padding, upsampled=False)
            # On a small map the folded kernels cost more to build than the 5/9 of the FLOPs they save.
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # (B, H, W, C) → (B, 2H, 2W, C)
        return self._with_lora(conv2d(x, kernel, stride=self.stride, padding=padding) + bias, x, padding)

    def _with_lora(self, y: jax.Array, x: jax.Array, padding: Padding, upsampled: bool = True) -> jax.Array:
        """`y` plus this layer's per-row LoRA update for input `x`, if the "lora" collection holds one."""
        if not self.has_variable("lora", "down"):
            return y
        if not upsampled:
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        down, up = self.get_variable("lora", "down"), self.get_variable("lora", "up")
        return y + lora_conv_delta(x, down, up, stride=self.stride, padding=padding)


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm over NHWC (params `scale`, `bias`), statistics in float32.

    Moments are taken per channel as column sums over the pixels, then combined per
    group: on XLA:CPU about 2× faster than flax's GroupNorm, which reduces (B, H, W, G, C/G)
    (256×256×128: 12.7 vs 22.2 ms; 128×128×256: 1.5 vs 2.9 ms, 2 cores).
    Each channel is shifted by its first pixel before
    E[x²]−E[x]², and the group variance adds the channels' spread of means exactly,
    so large-mean activations (the UNet's skip concatenations) keep full precision.
    """

    num_groups: int
    epsilon: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        g = self.num_groups
        scale = self.param("scale", nn.initializers.ones_init(), (c,))
        bias = self.param("bias", nn.initializers.zeros_init(), (c,))
        xf = x.reshape(b, h * w, c).astype(jnp.float32)  # (B, N, C)
        shift = xf[:, :1, :]  # (B, 1, C)
        d = xf - shift
        mean_d = d.mean(axis=1)  # (B, C)
        var_c = jnp.maximum((d * d).mean(axis=1) - mean_d**2, 0.0)  # per-channel variance
        mean_c = (mean_d + shift[:, 0, :]).reshape(b, g, c // g)  # (B, G, C/G)
        mean_g = mean_c.mean(axis=-1, keepdims=True)
        var_g = var_c.reshape(b, g, c // g).mean(-1, keepdims=True) + ((mean_c - mean_g) ** 2).mean(-1, keepdims=True)
        inv = jax.lax.rsqrt(var_g + self.epsilon)  # (B, G, 1)
        mul = (jnp.broadcast_to(inv, (b, g, c // g)).reshape(b, 1, c)) * scale.astype(jnp.float32)
        add = bias.astype(jnp.float32) - jnp.broadcast_to(mean_g, (b, g, c // g)).reshape(b, 1, c) * mul
        return (xf * mul + add).reshape(b, h, w, c).astype(self.dtype)
