"""The Stable Diffusion denoiser: a Flax port of diffusers' `UNet2DConditionModel`.

Covers what SD 1.x / 2.x / 2.1 and their image-conditioned variants (inpainting, depth,
the x4 upscaler's noise-level class embedding) use: the
CrossAttnDownBlock2D / DownBlock2D / UNetMidBlock2DCrossAttn / CrossAttnUpBlock2D /
UpBlock2D blocks, Transformer2DModel with GEGLU feed-forward, and the sinusoidal
timestep embedding. Anything else in a config raises `ValueError` naming the option.

Layout is NHWC throughout (diffusers is NCHW). Every submodule is named as in the
diffusers state dict ("down_blocks.0.attentions.1..." → `down_blocks_0/attentions_1/...`),
so `sdmesh.services.checkpoints.weights.convert` maps checkpoint tensors onto our params tree
without a renaming table. Input feature sizes are inferred by Flax, so the only
channel bookkeeping here is each layer's *output* width.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdmesh.services.models.attention import attention
from sdmesh.services.models.layers import Conv2d, Dense, GroupNorm

# --------------------------------------------------------------------------- config

_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
_MID_BLOCKS = ("UNetMidBlock2DCrossAttn", None)
# None: a learned table when num_class_embeds is set, else no class conditioning.
_CLASS_EMBED_TYPES = (None, "timestep", "identity", "projection", "simple_projection")

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": nn.silu,
    "swish": nn.silu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": nn.relu,
}


def _activation(name: str) -> Callable[[jax.Array], jax.Array]:
    return _ACTIVATIONS[name]


def _tuplify(value: Any) -> Any:
    """JSON lists → tuples (recursively), so the config is hashable."""
    if isinstance(value, (list, tuple)):
        return tuple(_tuplify(v) for v in value)
    return value


def _strip_res(block_type: str) -> str:
    # diffusers' get_down_block/get_up_block accept a legacy "UNetRes" prefix.
    return block_type[7:] if block_type.startswith("UNetRes") else block_type


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """diffusers' `unet/config.json`, with diffusers' defaults.

    Options that only matter to block types or embeddings we do not implement
    (`resnet_skip_time_act`, `resnet_out_scale_factor`, `cross_attention_norm`,
    `mid_block_only_cross_attention`, `addition_*`) are accepted and, as in
    diffusers for these blocks, have no effect. `dropout` is irrelevant at inference.

    Class conditioning (`class_labels` in `__call__`) follows diffusers' `_set_class_embedding`:
    `num_class_embeds` alone is a learned table (the x4 upscaler's noise level);
    `class_embed_type` "timestep" | "identity" | "projection" | "simple_projection" embeds
    a float label instead. The result is added to the time embedding, or concatenated
    with it under `class_embeddings_concat`.
    """

    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    )
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    dropout: float = 0.0
    act_fn: str = "silu"
    norm_num_groups: int | None = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 1280
    transformer_layers_per_block: int | tuple[int | tuple[int, ...], ...] = 1
    reverse_transformer_layers_per_block: tuple[int | tuple[int, ...], ...] | None = None
    encoder_hid_dim: int | None = None
    encoder_hid_dim_type: str | None = None
    # diffusers' historical misnomer: this is the number of heads unless
    # `num_attention_heads` is given (see `heads_per_block`).
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    dual_cross_attention: bool = False
    use_linear_projection: bool = False
    class_embed_type: str | None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    num_class_embeds: int | None = None
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    resnet_skip_time_act: bool = False
    resnet_out_scale_factor: float = 1.0
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    time_embedding_act_fn: str | None = None
    timestep_post_act: str | None = None
    time_cond_proj_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    projection_class_embeddings_input_dim: int | None = None
    attention_type: str = "default"
    class_embeddings_concat: bool = False
    mid_block_only_cross_attention: bool | None = None
    cross_attention_norm: str | None = None
    addition_embed_type_num_heads: int = 64

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            object.__setattr__(self, field.name, _tuplify(getattr(self, field.name)))
        self._validate()

    @classmethod
    def from_json(cls, d: dict) -> UNetConfig:
        """From a parsed `unet/config.json`; unknown keys (`_class_name`, ...) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    # ---- per-block views (diffusers broadcasts scalars to one value per block)

    @property
    def num_blocks(self) -> int:
        return len(self.down_block_types)

    def _per_block(self, value: Any) -> tuple:
        return tuple(value) if isinstance(value, tuple) else (value,) * self.num_blocks

    @property
    def heads_per_block(self) -> tuple[int, ...]:
        """Attention heads per down block (diffusers: `num_attention_heads or attention_head_dim`)."""
        return self._per_block(self.num_attention_heads or self.attention_head_dim)

    @property
    def layers_per_block_list(self) -> tuple[int, ...]:
        return self._per_block(self.layers_per_block)

    @property
    def transformer_layers_list(self) -> tuple[int | tuple[int, ...], ...]:
        return self._per_block(self.transformer_layers_per_block)

    @property
    def up_transformer_layers_list(self) -> tuple[int | tuple[int, ...], ...]:
        if self.reverse_transformer_layers_per_block is not None:
            return self.reverse_transformer_layers_per_block
        return self.transformer_layers_list[::-1]

    @property
    def only_cross_attention_list(self) -> tuple[bool, ...]:
        return self._per_block(self.only_cross_attention)

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @property
    def class_labels_shape(self) -> tuple[int, ...] | None:
        """Per-sample shape of `class_labels` ((): one label each), or None when the UNet takes none."""
        if self.class_embed_type is None:
            return None if self.num_class_embeds is None else ()
        if self.class_embed_type == "timestep":
            return ()
        if self.class_embed_type == "identity":
            return (self.time_embed_dim,)
        return (self.projection_class_embeddings_input_dim,)

    @property
    def context_dim(self) -> int:
        """Width of `encoder_hidden_states` (one value; validated to be the same for all blocks)."""
        return self._per_block(self.cross_attention_dim)[0]

    # ---- validation

    def _validate(self) -> None:
        def unsupported(option: str, value: Any, supported: Any = None) -> ValueError:
            hint = f" (supported: {supported})" if supported is not None else ""
            return ValueError(f"UNetConfig: {option}={value!r} is not supported by sdmesh's UNet{hint}")

        n = self.num_blocks
        for t in self.down_block_types:
            if _strip_res(t) not in _DOWN_BLOCKS:
                raise unsupported("down_block_types", t, _DOWN_BLOCKS)
        for t in self.up_block_types:
            if _strip_res(t) not in _UP_BLOCKS:
                raise unsupported("up_block_types", t, _UP_BLOCKS)
        if self.mid_block_type not in _MID_BLOCKS:
            raise unsupported("mid_block_type", self.mid_block_type, _MID_BLOCKS)
        if self.class_embed_type not in _CLASS_EMBED_TYPES:
            raise unsupported("class_embed_type", self.class_embed_type, _CLASS_EMBED_TYPES)
        if (
            self.class_embed_type in ("projection", "simple_projection")
            and self.projection_class_embeddings_input_dim is None
        ):
            raise ValueError(
                f"UNetConfig: class_embed_type={self.class_embed_type!r} needs projection_class_embeddings_input_dim "
                "(as in diffusers)"
            )
        must_be = {
            "addition_embed_type": None,
            "encoder_hid_dim": None,
            "encoder_hid_dim_type": None,
            "dual_cross_attention": False,
            "time_embedding_type": "positional",
            "attention_type": "default",
        }
        for option, ok in must_be.items():
            if getattr(self, option) != ok:
                raise unsupported(option, getattr(self, option), ok)
        if self.resnet_time_scale_shift not in ("default", "scale_shift"):
            raise unsupported("resnet_time_scale_shift", self.resnet_time_scale_shift, ("default", "scale_shift"))
        for option in ("act_fn", "time_embedding_act_fn", "timestep_post_act"):
            value = getattr(self, option)
            if value is not None and value not in _ACTIVATIONS:
                raise unsupported(option, value, tuple(_ACTIVATIONS))
        if self.norm_num_groups is None:
            raise unsupported("norm_num_groups", None)
        if len(set(self._per_block(self.cross_attention_dim))) != 1:
            # Every block attends to the same encoder_hidden_states, so one width.
            raise unsupported("cross_attention_dim", self.cross_attention_dim, "one width for all blocks")

        per_block = {
            "up_block_types": self.up_block_types,
            "block_out_channels": self.block_out_channels,
            "only_cross_attention": self.only_cross_attention,
            "layers_per_block": self.layers_per_block,
            "attention_head_dim": self.attention_head_dim,
            "num_attention_heads": self.num_attention_heads,
            "cross_attention_dim": self.cross_attention_dim,
            "transformer_layers_per_block": self.transformer_layers_per_block,
            "reverse_transformer_layers_per_block": self.reverse_transformer_layers_per_block,
        }
        for option, value in per_block.items():
            if isinstance(value, tuple) and len(value) != n:
                raise ValueError(
                    f"UNetConfig: {option} has {len(value)} entries but there are {n} down blocks "
                    f"({self.down_block_types})"
                )
        if self.reverse_transformer_layers_per_block is None and any(
            isinstance(t, tuple) for t in self.transformer_layers_list
        ):
            raise ValueError(
                "UNetConfig: nested transformer_layers_per_block needs reverse_transformer_layers_per_block "
                "(as in diffusers)"
            )


# --------------------------------------------------------------------------- helpers


def timestep_embedding(
    timesteps: jax.Array,
    dim: int,
    *,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1.0,
    scale: float = 1.0,
    max_period: int = 10000,
) -> jax.Array:
    """Sinusoidal embedding of (N,) timesteps → (N, dim) float32; diffusers' `get_timestep_embedding`."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
    emb = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]  # (N, half)
    emb = scale * emb
    emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def _conv(features: int, kernel: int, dtype: Any, name: str, *, stride: int = 1, padding: Any = None) -> Conv2d:
    """A torch-style Conv2d: symmetric padding (kernel-1)//2 unless given."""
    return Conv2d(features, kernel, stride=stride, padding=padding, dtype=dtype, name=name)


def _group_norm(groups: int, eps: float, dtype: Any, name: str) -> GroupNorm:
    # Our GroupNorm keeps full precision on large-mean activations (the skip concatenations).
    return GroupNorm(groups, eps, dtype=dtype, name=name)


def _layer_norm(dtype: Any, name: str) -> nn.LayerNorm:
    # Transformer blocks use torch.nn.LayerNorm's default eps in SD configs.
    return nn.LayerNorm(epsilon=1e-5, dtype=dtype, use_fast_variance=False, name=name)


def _nearest_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Nearest-neighbour resize of NHWC `x` to `size`, with torch's `mode="nearest"` index rule."""
    _, h, w, _ = x.shape
    out_h, out_w = size
    if (out_h, out_w) == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # (B, 2H, 2W, C)
    rows = (jnp.arange(out_h) * h) // out_h  # torch: floor(dst * in / out)
    cols = (jnp.arange(out_w) * w) // out_w
    return x[:, rows][:, :, cols]  # (B, out_h, out_w, C)


# --------------------------------------------------------------------------- layers


class TimestepEmbedding(nn.Module):
    """MLP on the sinusoidal embedding: linear_1 → act → linear_2 (→ post_act)."""

    features: int
    act_fn: str = "silu"
    post_act_fn: str | None = None
    cond_proj_dim: int | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, sample: jax.Array, condition: jax.Array | None = None) -> jax.Array:
        if condition is not None:
            if self.cond_proj_dim is None:
                raise ValueError("timestep_cond was given but the config has no time_cond_proj_dim")
            # LCM-style guidance embedding, added before the MLP.
            sample = sample + Dense(sample.shape[-1], use_bias=False, dtype=self.dtype, name="cond_proj")(condition)
        sample = Dense(self.features, dtype=self.dtype, name="linear_1")(sample)
        sample = _activation(self.act_fn)(sample)
        sample = Dense(self.features, dtype=self.dtype, name="linear_2")(sample)
        if self.post_act_fn is not None:
            sample = _activation(self.post_act_fn)(sample)
        return sample


class ResnetBlock2D(nn.Module):
    """norm1 → act → conv1 (+ time_emb_proj) → norm2 → act → conv2, plus a (1×1-projected) skip."""

    out_channels: int
    groups: int
    eps: float
    act_fn: str = "silu"
    time_embedding_norm: str = "default"  # or "scale_shift"
    output_scale_factor: float = 1.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        act = _activation(self.act_fn)
        h = act(_group_norm(self.groups, self.eps, self.dtype, "norm1")(x))
        h = _conv(self.out_channels, 3, self.dtype, "conv1")(h)

        scale_shift = self.time_embedding_norm == "scale_shift"
        t = Dense(self.out_channels * (2 if scale_shift else 1), dtype=self.dtype, name="time_emb_proj")(act(temb))
        t = t[:, None, None, :]  # (B, 1, 1, C or 2C): broadcast over H, W
        norm2 = _group_norm(self.groups, self.eps, self.dtype, "norm2")
        if scale_shift:
            scale, shift = jnp.split(t, 2, axis=-1)
            h = norm2(h) * (1 + scale) + shift
        else:
            h = norm2(h + t)
        h = _conv(self.out_channels, 3, self.dtype, "conv2")(act(h))

        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, self.dtype, "conv_shortcut")(x)
        return (x + h) / self.output_scale_factor


class Attention(nn.Module):
    """Multi-head attention without q/k/v biases (SD's `attention_bias=False`)."""

    heads: int
    head_dim: int
    upcast: bool = False
    attention_impl: str = "dot_product"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        inner = self.heads * self.head_dim
        context = x if context is None else context  # self-attention unless given a context
        b, lq, query_dim = x.shape
        lk = context.shape[1]
        q = Dense(inner, use_bias=False, dtype=self.dtype, name="to_q")(x)
        k = Dense(inner, use_bias=False, dtype=self.dtype, name="to_k")(context)
        v = Dense(inner, use_bias=False, dtype=self.dtype, name="to_v")(context)
        q = q.reshape(b, lq, self.heads, self.head_dim)  # (B, Lq, H, D)
        k = k.reshape(b, lk, self.heads, self.head_dim)  # (B, Lk, H, D)
        v = v.reshape(b, lk, self.heads, self.head_dim)
        out = attention(q, k, v, upcast=self.upcast, impl=self.attention_impl)  # (B, Lq, H, D)
        out = out.reshape(b, lq, inner)
        # diffusers' to_out is [Linear, Dropout]; only index 0 holds weights.
        return Dense(query_dim, dtype=self.dtype, name="to_out_0")(out)


class GEGLU(nn.Module):
    """proj to 2×inner, split into (value, gate), value * gelu(gate) with exact (erf) gelu."""

    inner_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = Dense(2 * self.inner_dim, dtype=self.dtype, name="proj")(x)
        value, gate = jnp.split(h, 2, axis=-1)
        return value * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    mult: int = 4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        # diffusers' ff.net is [GEGLU, Dropout, Linear]: weights at indices 0 and 2.
        h = GEGLU(dim * self.mult, dtype=self.dtype, name="net_0")(x)
        return Dense(dim, dtype=self.dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention and feed-forward, each residual."""

    heads: int
    head_dim: int
    only_cross_attention: bool = False
    upcast_attention: bool = False
    attention_impl: str = "dot_product"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        def attn(name: str) -> Attention:
            return Attention(
                self.heads, self.head_dim, self.upcast_attention, self.attention_impl, self.dtype, name=name
            )

        # only_cross_attention: attn1 also attends to the text instead of to itself.
        x = x + attn("attn1")(_layer_norm(self.dtype, "norm1")(x), context if self.only_cross_attention else None)
        x = x + attn("attn2")(_layer_norm(self.dtype, "norm2")(x), context)
        x = x + FeedForward(dtype=self.dtype, name="ff")(_layer_norm(self.dtype, "norm3")(x))
        return x


class Transformer2DModel(nn.Module):
    """GroupNorm → proj_in → transformer blocks over the H·W tokens → proj_out, plus the input."""

    heads: int
    head_dim: int
    num_layers: int
    groups: int
    use_linear_projection: bool = False  # Dense (SD 2.x) vs 1×1 conv (SD 1.x) projections
    only_cross_attention: bool = False
    upcast_attention: bool = False
    attention_impl: str = "dot_product"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        inner = self.heads * self.head_dim
        residual = x
        x = _group_norm(self.groups, 1e-6, self.dtype, "norm")(x)
        if self.use_linear_projection:
            x = Dense(inner, dtype=self.dtype, name="proj_in")(x.reshape(b, h * w, c))  # (B, HW, inner)
        else:
            x = _conv(inner, 1, self.dtype, "proj_in")(x).reshape(b, h * w, inner)  # (B, HW, inner)
        for i in range(self.num_layers):
            x = BasicTransformerBlock(
                self.heads,
                self.head_dim,
                self.only_cross_attention,
                self.upcast_attention,
                self.attention_impl,
                self.dtype,
                name=f"transformer_blocks_{i}",
            )(x, context)
        if self.use_linear_projection:
            x = Dense(c, dtype=self.dtype, name="proj_out")(x).reshape(b, h, w, c)  # (B, H, W, C)
        else:
            x = _conv(c, 1, self.dtype, "proj_out")(x.reshape(b, h, w, inner))  # (B, H, W, C)
        return x + residual


class Downsample2D(nn.Module):
    """3×3 conv with stride 2; padding 0 means diffusers' asymmetric (right/bottom) pad by one."""

    out_channels: int
    padding: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.padding
        padding = ((0, 1), (0, 1)) if p == 0 else ((p, p), (p, p))
        return _conv(self.out_channels, 3, self.dtype, "conv", stride=2, padding=padding)(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour ×2 (or to `output_size`, for latents not divisible by the total factor), then 3×3 conv."""

    out_channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, output_size: tuple[int, int] | None = None) -> jax.Array:
        _, h, w, _ = x.shape
        if output_size in (None, (2 * h, 2 * w)):  # the usual case: fold the ×2 into the conv
            return Conv2d(self.out_channels, 3, upsample=True, dtype=self.dtype, name="conv")(x)
        x = _nearest_resize(x, output_size)
        return _conv(self.out_channels, 3, self.dtype, "conv")(x)


# --------------------------------------------------------------------------- blocks


class _Block(nn.Module):
    """What every UNet block shares: the config and how it builds resnets / transformers."""

    config: UNetConfig
    out_channels: int
    num_layers: int  # resnets in this block
    heads: int = 1
    transformer_layers: int | tuple[int, ...] = 1
    only_cross_attention: bool = False
    attention_impl: str = "dot_product"
    dtype: Any = jnp.float32

    def _resnet(self, name: str, output_scale_factor: float = 1.0) -> ResnetBlock2D:
        cfg = self.config
        return ResnetBlock2D(
            self.out_channels,
            groups=cfg.norm_num_groups,
            eps=cfg.norm_eps,
            act_fn=cfg.act_fn,
            time_embedding_norm=cfg.resnet_time_scale_shift,
            output_scale_factor=output_scale_factor,
            dtype=self.dtype,
            name=name,
        )

    def _transformer(self, i: int) -> Transformer2DModel:
        cfg = self.config
        layers = self.transformer_layers
        return Transformer2DModel(
            heads=self.heads,
            head_dim=self.out_channels // self.heads,
            num_layers=layers if isinstance(layers, int) else layers[i],  # per block, or per resnet
            groups=cfg.norm_num_groups,
            use_linear_projection=cfg.use_linear_projection,
            only_cross_attention=self.only_cross_attention,
            upcast_attention=cfg.upcast_attention,
            attention_impl=self.attention_impl,
            dtype=self.dtype,
            name=f"attentions_{i}",
        )


class DownBlock2D(_Block):
    """Resnets, then an optional stride-2 conv; returns every intermediate as a skip."""

    add_downsample: bool = True
    has_attention = False

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        skips = []
        for i in range(self.num_layers):
            x = self._resnet(f"resnets_{i}")(x, temb)
            if self.has_attention:
                x = self._transformer(i)(x, context)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, self.config.downsample_padding, self.dtype, name="downsamplers_0")(x)
            skips.append(x)
        return x, skips


class CrossAttnDownBlock2D(DownBlock2D):
    """DownBlock2D with a Transformer2DModel after each resnet."""

    has_attention = True


class UpBlock2D(_Block):
    """Per resnet: concatenate the next skip (channels last), resnet; then an optional upsample."""

    add_upsample: bool = True
    has_attention = False

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        skips: Sequence[jax.Array],
        temb: jax.Array,
        context: jax.Array,
        upsample_size: tuple[int, int] | None = None,
    ) -> jax.Array:
        skips = list(skips)
        for i in range(self.num_layers):
            x = jnp.concatenate([x, skips.pop()], axis=-1)  # (B, H, W, C + C_skip)
            x = self._resnet(f"resnets_{i}")(x, temb)
            if self.has_attention:
                x = self._transformer(i)(x, context)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, self.dtype, name="upsamplers_0")(x, upsample_size)
        return x


class CrossAttnUpBlock2D(UpBlock2D):
    """UpBlock2D with a Transformer2DModel after each resnet."""

    has_attention = True


class UNetMidBlock2DCrossAttn(_Block):
    """resnet → (transformer → resnet) × num_layers, all at the innermost width."""

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
        scale = self.config.mid_block_scale_factor
        x = self._resnet("resnets_0", scale)(x, temb)
        for i in range(self.num_layers):
            x = self._transformer(i)(x, context)
            x = self._resnet(f"resnets_{i + 1}", scale)(x, temb)
        return x


# --------------------------------------------------------------------------- the UNet


def _class_embedding(cfg: UNetConfig, dtype: Any) -> nn.Module | None:
    """diffusers' `_set_class_embedding`: the module named `class_embedding`, or None (also for "identity")."""
    dim = cfg.time_embed_dim
    if cfg.class_embed_type is None:
        return (
            None
            if cfg.num_class_embeds is None
            else nn.Embed(cfg.num_class_embeds, dim, dtype=dtype, name="class_embedding")
        )
    if cfg.class_embed_type == "timestep":
        return TimestepEmbedding(dim, act_fn=cfg.act_fn, dtype=dtype, name="class_embedding")
    if cfg.class_embed_type == "projection":
        # diffusers builds this one with TimestepEmbedding's default act_fn, not the config's
        return TimestepEmbedding(dim, act_fn="silu", dtype=dtype, name="class_embedding")
    if cfg.class_embed_type == "simple_projection":
        return Dense(dim, dtype=dtype, name="class_embedding")
    return None  # identity: the labels are the embedding


class UNet2DConditionModel(nn.Module):
    """ε/v-prediction UNet. NHWC in, NHWC out, in the activation `dtype`."""

    config: UNetConfig
    dtype: jnp.dtype = jnp.float32  # activations; params may be stored in another dtype
    attention_impl: str = "dot_product"

    def setup(self) -> None:
        cfg = self.config
        channels = cfg.block_out_channels
        n = cfg.num_blocks
        common = dict(config=cfg, attention_impl=self.attention_impl, dtype=self.dtype)

        self.conv_in = _conv(channels[0], cfg.conv_in_kernel, self.dtype, "conv_in")
        self.time_embedding = TimestepEmbedding(
            cfg.time_embed_dim,
            act_fn=cfg.act_fn,
            post_act_fn=cfg.timestep_post_act,
            cond_proj_dim=cfg.time_cond_proj_dim,
            dtype=self.dtype,
        )
        self.class_embedding = _class_embedding(cfg, self.dtype)

        heads = cfg.heads_per_block
        layers = cfg.layers_per_block_list
        only_cross = cfg.only_cross_attention_list
        down_blocks = []
        for i, block_type in enumerate(cfg.down_block_types):
            block = CrossAttnDownBlock2D if _strip_res(block_type) == "CrossAttnDownBlock2D" else DownBlock2D
            down_blocks.append(
                block(
                    out_channels=channels[i],
                    num_layers=layers[i],
                    heads=heads[i],
                    transformer_layers=cfg.transformer_layers_list[i],
                    only_cross_attention=only_cross[i],
                    add_downsample=i < n - 1,
                    **common,
                )
            )
        self.down_blocks = down_blocks  # named down_blocks_0, down_blocks_1, ...

        if cfg.mid_block_type is not None:
            self.mid_block = UNetMidBlock2DCrossAttn(
                out_channels=channels[-1],
                num_layers=1,
                heads=heads[-1],
                transformer_layers=cfg.transformer_layers_list[-1],
                **common,
            )

        # Up blocks mirror the down blocks: per-block lists are read reversed, and
        # each has one more resnet than its mirror (it also eats the downsample's skip).
        up_blocks = []
        for i, block_type in enumerate(cfg.up_block_types):
            block = CrossAttnUpBlock2D if _strip_res(block_type) == "CrossAttnUpBlock2D" else UpBlock2D
            up_blocks.append(
                block(
                    out_channels=channels[::-1][i],
                    num_layers=layers[::-1][i] + 1,
                    heads=heads[::-1][i],
                    transformer_layers=cfg.up_transformer_layers_list[i],
                    only_cross_attention=only_cross[::-1][i],
                    add_upsample=i < n - 1,
                    **common,
                )
            )
        self.up_blocks = up_blocks

        self.conv_norm_out = _group_norm(cfg.norm_num_groups, cfg.norm_eps, self.dtype, "conv_norm_out")
        self.conv_out = _conv(cfg.out_channels, cfg.conv_out_kernel, self.dtype, "conv_out")

    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array | int | float,
        encoder_hidden_states: jax.Array,
        timestep_cond: jax.Array | None = None,
        class_labels: jax.Array | None = None,
        down_residuals: Sequence[jax.Array] | None = None,
        mid_residual: jax.Array | None = None,
    ) -> jax.Array:
        """sample (B, H, W, C_in), timesteps () or (B,), encoder_hidden_states (B, L, cross_attention_dim)
        → (B, H, W, out_channels). `timestep_cond` (B, time_cond_proj_dim) only for configs with
        `time_cond_proj_dim`; `class_labels` (B, *config.class_labels_shape) only for configs with a
        class embedding (the x4 upscaler: the integer noise level). `down_residuals` (one per skip, as
        ControlNetModel returns them) are added to the skips and `mid_residual` to the mid block's output
        (diffusers' down_block_additional_residuals / mid_block_additional_residual)."""
        cfg = self.config
        batch = sample.shape[0]
        if cfg.center_input_sample:
            sample = 2 * sample - 1.0

        # 1. time: one embedding per sample, shared by every resnet.
        t = jnp.broadcast_to(jnp.reshape(jnp.asarray(timesteps), (-1,)), (batch,))  # (B,)
        t_emb = timestep_embedding(
            t,
            cfg.block_out_channels[0],
            flip_sin_to_cos=cfg.flip_sin_to_cos,
            downscale_freq_shift=cfg.freq_shift,
        ).astype(self.dtype)  # (B, C0)
        emb = self.time_embedding(t_emb, timestep_cond)  # (B, time_embed_dim)
        if cfg.class_labels_shape is not None:
            class_emb = self._embed_class(class_labels, batch)  # (B, time_embed_dim)
            # concat: the blocks' time_emb_proj then take 2·time_embed_dim inputs
            emb = jnp.concatenate([emb, class_emb], axis=-1) if cfg.class_embeddings_concat else emb + class_emb
        elif class_labels is not None:
            raise ValueError("class_labels were given but this UNet's config has no class embedding")
        if cfg.time_embedding_act_fn is not None:
            emb = _activation(cfg.time_embedding_act_fn)(emb)
        context = encoder_hidden_states.astype(self.dtype)

        # 2. down: keep every intermediate for the skip connections.
        x = self.conv_in(sample.astype(self.dtype))
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, emb, context)
            skips.extend(block_skips)
        if down_residuals is not None:
            if len(down_residuals) != len(skips):
                raise ValueError(f"{len(down_residuals)} down residuals for a UNet with {len(skips)} skips")
            skips = [s + r.astype(s.dtype) for s, r in zip(skips, down_residuals, strict=True)]

        # 3. mid
        if cfg.mid_block_type is not None:
            x = self.mid_block(x, emb, context)
        if mid_residual is not None:
            x = x + mid_residual.astype(x.dtype)

        # 4. up: each block takes its skips from the end of the stack; upsampling
        # targets the next skip's size, so odd latent sizes round-trip as in diffusers.
        for block in self.up_blocks:
            block_skips, skips = skips[-block.num_layers :], skips[: -block.num_layers]
            upsample_size = tuple(skips[-1].shape[1:3]) if skips else None
            x = block(x, block_skips, emb, context, upsample_size)

        # 5. out
        x = _activation(cfg.act_fn)(self.conv_norm_out(x))
        return self.conv_out(x)

    def _embed_class(self, class_labels: jax.Array | None, batch: int) -> jax.Array:
        """class_labels (B, ...) → (B, time_embed_dim), as diffusers' `get_class_embed`."""
        cfg = self.config
        if class_labels is None:
            raise ValueError(
                "this UNet's config has a class embedding, so class_labels must be given "
                "(the x4 upscaler: the noise level of its low-res image)"
            )
        labels = jnp.asarray(class_labels)
        labels = jnp.broadcast_to(labels, (batch, *labels.shape[1:]) if labels.ndim else (batch,))
        if cfg.class_embed_type is None:  # a learned table, indexed by integer label
            return self.class_embedding(labels.astype(jnp.int32))
        if cfg.class_embed_type == "timestep":  # the same sinusoid as the timestep, then its own MLP
            labels = timestep_embedding(
                labels,
                cfg.block_out_channels[0],
                flip_sin_to_cos=cfg.flip_sin_to_cos,
                downscale_freq_shift=cfg.freq_shift,
            )
        labels = labels.astype(self.dtype)
        return labels if cfg.class_embed_type == "identity" else self.class_embedding(labels)


# --------------------------------------------------------------------------- loading support


def init_shapes(config: UNetConfig, dtype: Any = jnp.float32) -> dict[str, Any]:
    """The params tree as ShapeDtypeStructs (no memory allocated), for `weights.convert`.

    `dtype` is the dtype the parameters will be stored in; shapes do not depend on it.
    """
    model = UNet2DConditionModel(config)
    size = 2 ** (config.num_blocks - 1)  # smallest latent every downsample accepts cleanly
    sample = jnp.zeros((1, size, size, config.in_channels), jnp.float32)
    context = jnp.zeros((1, 1, config.context_dim), jnp.float32)
    cond = None if config.time_cond_proj_dim is None else jnp.zeros((1, config.time_cond_proj_dim), jnp.float32)
    label_shape = config.class_labels_shape
    labels = None if label_shape is None else jnp.zeros((1, *label_shape), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), sample, jnp.zeros((1,)), context, cond, labels)
    return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), variables["params"])


def fix_checkpoint_key(key: str) -> str | None:
    """Rename a checkpoint key to our naming, or None to drop it. diffusers' UNet names
    already match and it saves no buffers, so this is the identity."""
    return key
