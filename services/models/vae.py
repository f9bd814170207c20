"""The Stable Diffusion VAE (diffusers' `AutoencoderKL`) in Flax, encoder and decoder.

Layout is NHWC throughout (TPU/GPU-friendly); the weight loader turns the
checkpoint's OIHW convs into HWIO. Every submodule carries the name diffusers
gives it, so `sdmesh.services.checkpoints.weights.convert` maps checkpoint keys onto this
tree mechanically ("decoder.up_blocks.0.resnets.1.conv1.weight" →
decoder/up_blocks_0/resnets_1/conv1/kernel): lists assigned in `setup` are
named `<attr>_<i>` by linen, which is exactly that mapping.

    images (B, H, W, 3) in [-1, 1]
      → Encoder → quant_conv → (mean, logvar), each (B, H/f, W/f, latent_channels)
    latents (B, H/f, W/f, latent_channels), raw (unscaled)
      → post_quant_conv → Decoder → images (B, H, W, 3)

with f = `VAEConfig.scale_factor` (8 for SD, 4 for the x4 upscaler's 3-level VAE). Latent scaling
(`scaling_factor`, `shift_factor`) is left to the pipeline: see `scale_latents` / `unscale_latents`,
and `encode_image` for images → scaled latents (img2img, inpainting).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdmesh.services.models.attention import attention
from sdmesh.services.models.layers import Conv2d, GroupNorm

# diffusers builds the VAE with these epsilons regardless of config.
_NORM_EPS = 1e-6

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    # diffusers' `get_activation` names; SD checkpoints all use silu.
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
}
_DOWN_BLOCK_TYPES = ("DownEncoderBlock2D",)
_UP_BLOCK_TYPES = ("UpDecoderBlock2D",)


# --------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The fields of diffusers' `vae/config.json` that shape the model (diffusers' defaults)."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self) -> None:
        for name in ("down_block_types", "up_block_types", "block_out_channels"):
            value = getattr(self, name)
            if isinstance(value, list):  # keep the dataclass hashable (it is a module field)
                object.__setattr__(self, name, tuple(value))
        if isinstance(self.sample_size, list):
            object.__setattr__(self, "sample_size", tuple(self.sample_size))
        if self.shift_factor is None:  # diffusers writes null for "no shift"
            object.__setattr__(self, "shift_factor", 0.0)

        bad = [t for t in self.down_block_types if t not in _DOWN_BLOCK_TYPES]
        if bad:
            raise ValueError(f"VAE down_block_types {bad} are not supported; only {_DOWN_BLOCK_TYPES}")
        bad = [t for t in self.up_block_types if t not in _UP_BLOCK_TYPES]
        if bad:
            raise ValueError(f"VAE up_block_types {bad} are not supported; only {_UP_BLOCK_TYPES}")
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(
                f"VAE needs one down and one up block per block_out_channels entry: got {n} channels, "
                f"{len(self.down_block_types)} down and {len(self.up_block_types)} up block types"
            )
        if self.act_fn not in _ACTIVATIONS:
            raise ValueError(f"VAE act_fn {self.act_fn!r} is not supported; choose one of {tuple(_ACTIVATIONS)}")

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> VAEConfig:
        """From a parsed diffusers `vae/config.json`; keys this model does not use are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def scale_factor(self) -> int:
        """Image pixels per latent pixel along each side (8 for SD)."""
        return 2 ** (len(self.block_out_channels) - 1)


def scale_latents(z: jax.Array, config: VAEConfig) -> jax.Array:
    """Raw VAE latents → the latent space the UNet works in."""
    return (z - config.shift_factor) * config.scaling_factor


def unscale_latents(z: jax.Array, config: VAEConfig) -> jax.Array:
    """UNet latents → raw VAE latents, ready for `AutoencoderKL.decode`."""
    return z / config.scaling_factor + config.shift_factor


# ------------------------------------------------------------------ checkpoint keys

# Before diffusers 0.14 the VAE's mid-block attention was `AttentionBlock` with
# these names; many Hub checkpoints still carry them.
_OLD_ATTENTION = re.compile(r"(^|\.)mid_block\.attentions\.(\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_NEW_NAME = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_ATTENTION_WEIGHT = re.compile(
    r"(^|\.)mid_block\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0|query|key|value|proj_attn)\.weight$"
)


def fix_checkpoint_key(key: str) -> str | None:
    """Rename a VAE checkpoint key to the current diffusers name (None would drop it; none are dropped)."""
    m = _OLD_ATTENTION.search(key)
    if m is None:
        return key
    return key[: m.start(3)] + _NEW_NAME[m.group(3)] + key[m.end(3) :]


def fix_checkpoint_tensor(key: str, array: Any) -> Any:
    """Squeeze mid-block attention weights stored as 1×1 convs (out, in, 1, 1) to linear (out, in).

    Accepts the key before or after `fix_checkpoint_key`.
    """
    if _ATTENTION_WEIGHT.search(key) and array.ndim == 4 and tuple(array.shape[2:]) == (1, 1):
        return array[:, :, 0, 0]
    return array


# --------------------------------------------------------------------------- blocks


def _conv(features: int, kernel: int, dtype: Any, name: str | None = None, stride: int = 1, pad: int | None = None):
    pad = kernel // 2 if pad is None else pad
    return Conv2d(features, kernel, stride=stride, padding=((pad, pad), (pad, pad)), dtype=dtype, name=name)


def _group_norm(groups: int, dtype: Any, name: str | None = None) -> GroupNorm:
    return GroupNorm(groups, _NORM_EPS, dtype=dtype, name=name)


class ResnetBlock2D(nn.Module):
    """GroupNorm → act → conv → GroupNorm → act → conv, plus a (1×1-projected) skip. No time embedding."""

    out_channels: int
    groups: int
    act_fn: str = "silu"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # Compact (not setup) because only channel-changing blocks have `conv_shortcut`,
        # and that is known from the input.
        act = _ACTIVATIONS[self.act_fn]
        h = act(_group_norm(self.groups, self.dtype, name="norm1")(x))
        h = _conv(self.out_channels, 3, self.dtype, name="conv1")(h)
        h = act(_group_norm(self.groups, self.dtype, name="norm2")(h))
        h = _conv(self.out_channels, 3, self.dtype, name="conv2")(h)  # (dropout is 0 at inference)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, self.dtype, name="conv_shortcut")(x)
        return x + h  # output_scale_factor is 1 in the VAE


class AttentionBlock(nn.Module):
    """Single-head spatial self-attention over all H×W positions, with a residual.

    diffusers' `Attention(_from_deprecated_attn_block=True)`: one head of
    width `channels` (attention_head_dim = channels).
    """

    channels: int
    groups: int
    num_heads: int = 1
    attention_impl: str = "dot_product"
    dtype: Any = jnp.float32

    def setup(self) -> None:
        self.group_norm = _group_norm(self.groups, self.dtype)
        self.to_q = nn.Dense(self.channels, dtype=self.dtype)
        self.to_k = nn.Dense(self.channels, dtype=self.dtype)
        self.to_v = nn.Dense(self.channels, dtype=self.dtype)
        self.to_out = [nn.Dense(self.channels, dtype=self.dtype)]  # → "to_out_0", as in the checkpoint

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        heads = self.num_heads
        tokens = self.group_norm(x).reshape(b, h * w, c)  # (B, L=H·W, C)

        def split(t: jax.Array) -> jax.Array:  # (B, L, C) → (B, L, heads, C/heads)
            return t.reshape(b, h * w, heads, c // heads)

        out = attention(
            split(self.to_q(tokens)), split(self.to_k(tokens)), split(self.to_v(tokens)), impl=self.attention_impl
        )
        out = self.to_out[0](out.reshape(b, h * w, c))  # (B, L, C)
        return x + out.reshape(b, h, w, c)  # rescale_output_factor is 1 in the VAE


class Downsample2D(nn.Module):
    """Halve H and W with a stride-2 3×3 conv, padding only bottom/right (diffusers' padding=0 path)."""

    channels: int
    dtype: Any = jnp.float32

    def setup(self) -> None:
        self.conv = _conv(self.channels, 3, self.dtype, stride=2, pad=0)

    def __call__(self, x: jax.Array) -> jax.Array:
        # Asymmetric (0, 1, 0, 1) pad, as the original LDM VAE was trained with.
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Double H and W by nearest-neighbour repetition, then a 3×3 conv."""

    channels: int
    dtype: Any = jnp.float32

    def setup(self) -> None:
        self.conv = Conv2d(self.channels, 3, upsample=True, dtype=self.dtype)  # (B, H, W, C) → (B, 2H, 2W, C')

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class DownEncoderBlock2D(nn.Module):
    num_layers: int
    out_channels: int
    groups: int
    add_downsample: bool
    act_fn: str = "silu"
    dtype: Any = jnp.float32

    def setup(self) -> None:
        self.resnets = [
            ResnetBlock2D(self.out_channels, self.groups, self.act_fn, self.dtype) for _ in range(self.num_layers)
        ]
        self.downsamplers = [Downsample2D(self.out_channels, self.dtype)] if self.add_downsample else []

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        for down in self.downsamplers:
            x = down(x)
        return x


class UpDecoderBlock2D(nn.Module):
    num_layers: int
    out_channels: int
    groups: int
    add_upsample: bool
    act_fn: str = "silu"
    dtype: Any = jnp.float32

    def setup(self) -> None:
        self.resnets = [
            ResnetBlock2D(self.out_channels, self.groups, self.act_fn, self.dtype) for _ in range(self.num_layers)
        ]
        self.upsamplers = [Upsample2D(self.out_channels, self.dtype)] if self.add_upsample else []

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        for up in self.upsamplers:
            x = up(x)
        return x


class UNetMidBlock2D(nn.Module):
    """resnet → [attention → resnet]; the attention can be switched off (mid_block_add_attention)."""

    channels: int
    groups: int
    add_attention: bool = True
    act_fn: str = "silu"
    attention_impl: str = "dot_product"
    dtype: Any = jnp.float32

    def setup(self) -> None:
        self.resnets = [ResnetBlock2D(self.channels, self.groups, self.act_fn, self.dtype) for _ in range(2)]
        if self.add_attention:
            self.attentions = [
                AttentionBlock(self.channels, self.groups, attention_impl=self.attention_impl, dtype=self.dtype)
            ]
        else:
            self.attentions = []

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


# ------------------------------------------------------------------ encoder/decoder


class Encoder(nn.Module):
    """Images (B, H, W, in) → moments (B, H/f, W/f, 2·latent_channels)."""

    config: VAEConfig
    attention_impl: str = "dot_product"
    dtype: Any = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        channels = cfg.block_out_channels
        self.conv_in = _conv(channels[0], 3, self.dtype)
        self.down_blocks = [
            DownEncoderBlock2D(
                num_layers=cfg.layers_per_block,
                out_channels=ch,
                groups=cfg.norm_num_groups,
                add_downsample=i < len(channels) - 1,
                act_fn=cfg.act_fn,
                dtype=self.dtype,
            )
            for i, ch in enumerate(channels)
        ]
        self.mid_block = UNetMidBlock2D(
            channels[-1],
            cfg.norm_num_groups,
            add_attention=cfg.mid_block_add_attention,
            act_fn=cfg.act_fn,
            attention_impl=self.attention_impl,
            dtype=self.dtype,
        )
        self.conv_norm_out = _group_norm(cfg.norm_num_groups, self.dtype)
        self.conv_out = _conv(2 * cfg.latent_channels, 3, self.dtype)  # mean and logvar ("double_z")

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        x = _ACTIVATIONS[self.config.act_fn](self.conv_norm_out(x))
        return self.conv_out(x)


class Decoder(nn.Module):
    """Latents (B, h, w, latent_channels) → images (B, h·f, w·f, out)."""

    config: VAEConfig
    attention_impl: str = "dot_product"
    dtype: Any = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        channels = tuple(reversed(cfg.block_out_channels))  # widest first
        self.conv_in = _conv(channels[0], 3, self.dtype)
        self.mid_block = UNetMidBlock2D(
            channels[0],
            cfg.norm_num_groups,
            add_attention=cfg.mid_block_add_attention,
            act_fn=cfg.act_fn,
            attention_impl=self.attention_impl,
            dtype=self.dtype,
        )
        self.up_blocks = [
            UpDecoderBlock2D(
                num_layers=cfg.layers_per_block + 1,  # the decoder is one resnet deeper per block
                out_channels=ch,
                groups=cfg.norm_num_groups,
                add_upsample=i < len(channels) - 1,
                act_fn=cfg.act_fn,
                dtype=self.dtype,
            )
            for i, ch in enumerate(channels)
        ]
        self.conv_norm_out = _group_norm(cfg.norm_num_groups, self.dtype)
        self.conv_out = _conv(cfg.out_channels, 3, self.dtype)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.conv_in(z)
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x)
        x = _ACTIVATIONS[self.config.act_fn](self.conv_norm_out(x))
        return self.conv_out(x)


# -------------------------------------------------------------------------- model


class AutoencoderKL(nn.Module):
    """diffusers' `AutoencoderKL` (NHWC). Use `encode` / `decode` via `apply(..., method=...)`."""

    config: VAEConfig
    dtype: jnp.dtype = jnp.float32  # activation dtype; params stay as loaded
    attention_impl: str = "dot_product"

    def setup(self) -> None:
        cfg = self.config
        self.encoder = Encoder(cfg, self.attention_impl, self.dtype)
        self.decoder = Decoder(cfg, self.attention_impl, self.dtype)
        self.quant_conv = _conv(2 * cfg.latent_channels, 1, self.dtype) if cfg.use_quant_conv else None
        self.post_quant_conv = _conv(cfg.latent_channels, 1, self.dtype) if cfg.use_post_quant_conv else None

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images (B, H, W, C) in [-1, 1] → (mean, logvar) of the latent Gaussian, each (B, H/f, W/f, latent)."""
        moments = self.encoder(images.astype(self.dtype))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        # diffusers' DiagonalGaussianDistribution clamps so exp(logvar) stays finite.
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Raw (unscaled) latents (B, h, w, latent) → images (B, h·f, w·f, C), roughly in [-1, 1]."""
        z = latents.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, images: jax.Array) -> jax.Array:
        """Encode then decode the mean: touches every parameter, so `init` builds the whole tree."""
        mean, _ = self.encode(images)
        return self.decode(mean)


def encode_image(vae: AutoencoderKL, params: Any, images: jax.Array, noise: jax.Array | None = None) -> jax.Array:
    """Images (B, H, W, C) in [-1, 1] → scaled latents (B, H/f, W/f, latent_channels), ready for the UNet.

    diffusers' `scaling_factor * retrieve_latents(vae.encode(images), generator)` as the img2img and
    inpaint pipelines call it: with `noise` (shaped like the posterior mean, standard normal) the
    posterior sample mean + exp(logvar / 2) · noise (`latent_dist.sample(generator)`); without, the
    mean (`sample_mode="argmax"`).
    """
    mean, logvar = vae.apply({"params": params}, images.astype(vae.dtype), method=AutoencoderKL.encode)
    z = mean.astype(jnp.float32)
    if noise is not None:
        z = z + jnp.exp(0.5 * logvar.astype(jnp.float32)) * noise
    return scale_latents(z, vae.config)


def init_shapes(config: VAEConfig, dtype: Any = jnp.float32) -> dict[str, Any]:
    """The params tree as ShapeDtypeStructs (no compute, no memory): the loader's expected tree."""
    model = AutoencoderKL(config, dtype=dtype)
    side = config.scale_factor  # smallest image that survives every downsample (1×1 latent)
    images = jax.ShapeDtypeStruct((1, side, side, config.in_channels), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
    return variables["params"]
