"""ControlNet: a Flax port of diffusers' `ControlNetModel` (Zhang et al. 2023, arXiv:2302.05543).

A ControlNet is the UNet's encoder half (conv_in, time embedding, down blocks, mid block),
copied from its base model and trained further, plus:
  * `controlnet_cond_embedding`: a small conv net taking the conditioning image (edges, depth,
    pose... as RGB in [0, 1]) to the latent grid, added to conv_in's output;
  * a zero-initialised 1×1 conv per UNet skip (`controlnet_down_blocks_N`) and one after the
    mid block (`controlnet_mid_block`).
Its outputs are residuals the UNet adds to its skips and to its mid-block output.

    config = ControlNetConfig.from_json(json.loads((folder / "config.json").read_text()))
    check_matches_unet(config, unet_config, str(folder))
    params = load_params(files, init_shapes(config), dtype=..., fix_key=fix_checkpoint_key, source=str(folder))
    down, mid = ControlNetModel(config).apply({"params": params}, latents, t, context, image, scale)

The encoder half is built from unet.py's own blocks, so it is the same code as the UNet's.
Layout is NHWC; parameter names follow the checkpoint's, as in unet.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sdmesh.services.checkpoints.weights import CheckpointError
from sdmesh.services.models.layers import Conv2d
from sdmesh.services.models.unet import (
    CrossAttnDownBlock2D,
    DownBlock2D,
    TimestepEmbedding,
    UNetConfig,
    UNetMidBlock2DCrossAttn,
    _conv,
    _strip_res,
    _tuplify,
    timestep_embedding,
)

# diffusers' ControlNetModel builds these two; UNetMidBlock2D (no attention) is one resnet.
_MID_BLOCKS = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D")
_CHANNEL_ORDERS = ("rgb", "bgr")


@dataclasses.dataclass(frozen=True)
class ControlNetConfig:
    """diffusers' ControlNet `config.json`, with diffusers' defaults.

    The encoder options mean what they mean in `UNetConfig` (`attention_head_dim` is the
    head count unless `num_attention_heads` is given); `unet_config` is that view.
    """

    in_channels: int = 4
    conditioning_channels: int = 3
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2  # one int: diffusers' ControlNet takes no per-block list
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int | None = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 1280
    transformer_layers_per_block: int | tuple[int | tuple[int, ...], ...] = 1
    encoder_hid_dim: int | None = None
    encoder_hid_dim_type: str | None = None
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False
    class_embed_type: str | None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    num_class_embeds: int | None = None
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    projection_class_embeddings_input_dim: int | None = None
    # "bgr": the model was trained on BGR images; the RGB input is flipped before the embedding.
    controlnet_conditioning_channel_order: str = "rgb"
    conditioning_embedding_out_channels: tuple[int, ...] | None = (16, 32, 96, 256)
    # Shuffle-style ControlNets: residuals averaged over the grid (and guess mode's ramp not applied).
    global_pool_conditions: bool = False
    addition_embed_type_num_heads: int = 64

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            object.__setattr__(self, field.name, _tuplify(getattr(self, field.name)))
        self._validate()

    @classmethod
    def from_json(cls, d: dict) -> ControlNetConfig:
        """From a parsed ControlNet `config.json`; unknown keys (`_class_name`, ...) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def unet_config(self) -> UNetConfig:
        """The encoder half as a UNetConfig: what unet.py's blocks read (the up half mirrors the down half)."""
        up = tuple(
            "CrossAttnUpBlock2D" if _strip_res(t) == "CrossAttnDownBlock2D" else "UpBlock2D"
            for t in reversed(self.down_block_types)
        )
        layers = self.transformer_layers_per_block
        reverse = tuple(reversed(layers)) if isinstance(layers, tuple) else None
        return UNetConfig(
            in_channels=self.in_channels,
            flip_sin_to_cos=self.flip_sin_to_cos,
            freq_shift=self.freq_shift,
            down_block_types=self.down_block_types,
            mid_block_type="UNetMidBlock2DCrossAttn",  # either kind is built from this block
            up_block_types=up,
            only_cross_attention=self.only_cross_attention,
            block_out_channels=self.block_out_channels,
            layers_per_block=self.layers_per_block,
            downsample_padding=self.downsample_padding,
            mid_block_scale_factor=self.mid_block_scale_factor,
            act_fn=self.act_fn,
            norm_num_groups=self.norm_num_groups,
            norm_eps=self.norm_eps,
            cross_attention_dim=self.cross_attention_dim,
            transformer_layers_per_block=layers,
            reverse_transformer_layers_per_block=reverse,
            attention_head_dim=self.attention_head_dim,
            num_attention_heads=self.num_attention_heads,
            use_linear_projection=self.use_linear_projection,
            upcast_attention=self.upcast_attention,
            resnet_time_scale_shift=self.resnet_time_scale_shift,
        )

    @property
    def conditioning_downscale(self) -> int:
        """How much smaller the latent grid is than the conditioning image (8 for SD's (16, 32, 96, 256))."""
        return 2 ** (len(self.conditioning_embedding_out_channels or ()) - 1)

    @property
    def num_down_residuals(self) -> int:
        """One per UNet skip: conv_in's output, every resnet, every downsample."""
        n = len(self.down_block_types)
        return 1 + n * self.layers_per_block + (n - 1)

    def _validate(self) -> None:
        def unsupported(option: str, value: Any, supported: Any) -> CheckpointError:
            return CheckpointError(
                f"ControlNet config: {option}={value!r} is not supported by sdmesh's ControlNet "
                f"(supported: {supported})"
            )

        must_be_none = (
            "class_embed_type",
            "num_class_embeds",
            "addition_embed_type",
            "projection_class_embeddings_input_dim",
            "encoder_hid_dim",
            "encoder_hid_dim_type",
        )
        for option in must_be_none:
            if getattr(self, option) is not None:
                raise unsupported(option, getattr(self, option), None)
        if self.mid_block_type not in _MID_BLOCKS:
            raise unsupported("mid_block_type", self.mid_block_type, _MID_BLOCKS)
        if self.controlnet_conditioning_channel_order not in _CHANNEL_ORDERS:
            raise unsupported(
                "controlnet_conditioning_channel_order", self.controlnet_conditioning_channel_order, _CHANNEL_ORDERS
            )
        if not isinstance(self.layers_per_block, int):
            raise unsupported("layers_per_block", self.layers_per_block, "one int for all blocks")
        channels = self.conditioning_embedding_out_channels
        if not channels or not all(isinstance(c, int) and c > 0 for c in channels):
            raise unsupported(
                "conditioning_embedding_out_channels", channels, "a list of widths, e.g. [16, 32, 96, 256]"
            )
        if self.conditioning_channels < 1:
            raise unsupported("conditioning_channels", self.conditioning_channels, "1 or more")
        try:
            self.unet_config  # noqa: B018 (validates the encoder options as the UNet does)
        except ValueError as e:
            message = str(e).removeprefix("UNetConfig: ").replace("sdmesh's UNet", "sdmesh's ControlNet")
            raise CheckpointError(f"ControlNet config: {message}") from e


def check_matches_unet(controlnet: ControlNetConfig, unet: UNetConfig, name: str) -> None:
    """Refuse a ControlNet made for another base model: its residuals would not fit the UNet's skips.

    (`in_channels` may differ: an inpainting UNet takes 9 channels, its ControlNet the 4 of the latents.)
    """
    down = tuple(_strip_res(t) for t in controlnet.down_block_types)
    unet_down = tuple(_strip_res(t) for t in unet.down_block_types)
    checks = (
        ("cross_attention_dim", controlnet.unet_config.context_dim, unet.context_dim),
        ("block_out_channels", controlnet.block_out_channels, unet.block_out_channels),
        ("down_block_types", down, unet_down),
        ("layers_per_block", (controlnet.layers_per_block,) * len(down), unet.layers_per_block_list),
    )
    for option, ours, theirs in checks:
        if ours != theirs:
            raise CheckpointError(
                f"ControlNet {name} was made for another base model: its {option} is {ours} but the UNet's is "
                f"{theirs}; use a ControlNet trained for this checkpoint's family (SD 1.x and SD 2.x differ)"
            )


class ControlNetConditioningEmbedding(nn.Module):
    """Conditioning image → latent grid: conv_in, then per width step a conv and a stride-2 conv, all SiLU,
    then the zero-initialised conv_out (diffusers' `ControlNetConditioningEmbedding`)."""

    out_channels: int
    block_out_channels: tuple[int, ...]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, image: jax.Array) -> jax.Array:
        widths = self.block_out_channels
        x = nn.silu(_conv(widths[0], 3, self.dtype, "conv_in")(image))
        for i in range(len(widths) - 1):  # diffusers' `blocks` list holds both convs of a step
            x = nn.silu(_conv(widths[i], 3, self.dtype, f"blocks_{2 * i}")(x))
            x = nn.silu(_conv(widths[i + 1], 3, self.dtype, f"blocks_{2 * i + 1}", stride=2)(x))  # (B, ⌈H/2⌉, ⌈W/2⌉, C)
        return _conv(self.out_channels, 3, self.dtype, "conv_out")(x)


class ControlNetModel(nn.Module):
    """The residuals a ControlNet adds to the UNet, scaled per batch row."""

    config: ControlNetConfig
    dtype: jnp.dtype = jnp.float32  # activations; params may be stored in another dtype
    attention_impl: str = "dot_product"

    def setup(self) -> None:
        cfg = self.config
        ucfg = cfg.unet_config
        channels = cfg.block_out_channels
        n = ucfg.num_blocks
        common = dict(config=ucfg, attention_impl=self.attention_impl, dtype=self.dtype)

        self.conv_in = _conv(channels[0], 3, self.dtype, "conv_in")
        self.time_embedding = TimestepEmbedding(ucfg.time_embed_dim, act_fn=cfg.act_fn, dtype=self.dtype)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            channels[0], cfg.conditioning_embedding_out_channels, self.dtype
        )

        heads = ucfg.heads_per_block
        only_cross = ucfg.only_cross_attention_list
        down_blocks = []
        for i, block_type in enumerate(cfg.down_block_types):
            block = CrossAttnDownBlock2D if _strip_res(block_type) == "CrossAttnDownBlock2D" else DownBlock2D
            down_blocks.append(
                block(
                    out_channels=channels[i],
                    num_layers=cfg.layers_per_block,
                    heads=heads[i],
                    transformer_layers=ucfg.transformer_layers_list[i],
                    only_cross_attention=only_cross[i],
                    add_downsample=i < n - 1,
                    **common,
                )
            )
        self.down_blocks = down_blocks
        self.mid_block = UNetMidBlock2DCrossAttn(
            out_channels=channels[-1],
            num_layers=1 if cfg.mid_block_type == "UNetMidBlock2DCrossAttn" else 0,  # 0: resnets_0 alone
            heads=heads[-1],
            transformer_layers=ucfg.transformer_layers_list[-1],
            **common,
        )

        # The zero convs, one per skip in the UNet's order (conv_in's output first), then the mid block's.
        widths = [channels[0]]
        for i in range(n):
            widths += [channels[i]] * (cfg.layers_per_block + (i < n - 1))
        self.controlnet_down_blocks = [Conv2d(c, 1, dtype=self.dtype) for c in widths]
        self.controlnet_mid_block = Conv2d(channels[-1], 1, dtype=self.dtype)

    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array | int | float,
        context: jax.Array,
        cond_image: jax.Array,
        conditioning_scale: jax.Array | float,
        guess_mode: bool | jax.Array = False,
    ) -> tuple[list[jax.Array], jax.Array]:
        """sample (B, h, w, C_in), timesteps (B,) or (), context (B, L, cross_attention_dim),
        cond_image (B, h·f, w·f, conditioning_channels) in [0, 1] (f = config.conditioning_downscale),
        conditioning_scale (B,) or () → (down residuals: one (B, h_i, w_i, c_i) per UNet skip, mid residual).

        A row's residuals are multiplied by its scale, so rows of different requests share a batch
        (scale 0: zeros). `guess_mode` (a bool, or (B,) per row) ramps the scales from 0.1 at the first skip to 1 at the
        mid block, as diffusers does for ControlNet without prompt guidance; global-pool models ignore it.
        """
        cfg = self.config
        batch = sample.shape[0]
        t = jnp.broadcast_to(jnp.reshape(jnp.asarray(timesteps), (-1,)), (batch,))  # (B,)
        t_emb = timestep_embedding(
            t, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos, downscale_freq_shift=cfg.freq_shift
        ).astype(self.dtype)  # (B, C0)
        emb = self.time_embedding(t_emb)  # (B, time_embed_dim)
        context = context.astype(self.dtype)

        image = cond_image.astype(self.dtype)
        if cfg.controlnet_conditioning_channel_order == "bgr":
            image = image[..., ::-1]
        hint = self.controlnet_cond_embedding(image)  # (B, h, w, C0)
        if hint.shape[1:3] != sample.shape[1:3]:
            f = cfg.conditioning_downscale
            raise ValueError(
                f"ControlNet: the conditioning image is {cond_image.shape[1]}×{cond_image.shape[2]} but latents of "
                f"{sample.shape[1]}×{sample.shape[2]} need a {f * sample.shape[1]}×{f * sample.shape[2]} image "
                "(the image at the output resolution)"
            )
        x = self.conv_in(sample.astype(self.dtype)) + hint
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, emb, context)
            skips.extend(block_skips)
        x = self.mid_block(x, emb, context)

        down = [conv(s) for conv, s in zip(self.controlnet_down_blocks, skips, strict=True)]
        mid = self.controlnet_mid_block(x)

        row_scale = jnp.broadcast_to(jnp.reshape(jnp.asarray(conditioning_scale, self.dtype), (-1,)), (batch,))
        row_scale = row_scale[:, None, None, None]  # (B, 1, 1, 1)
        ramp = np.logspace(-1, 0, len(down) + 1, dtype=np.float32)  # 0.1 → 1.0; the last is the mid block's
        if cfg.global_pool_conditions or (isinstance(guess_mode, bool) and not guess_mode):
            ramp = np.ones_like(ramp)
        if isinstance(guess_mode, bool):
            scales = [row_scale * float(r) for r in ramp]
        else:  # per row: (B,) of 0/1
            guess = jnp.broadcast_to(jnp.reshape(jnp.asarray(guess_mode, self.dtype), (-1,)), (batch,))
            guess = guess[:, None, None, None]
            scales = [row_scale * (1 + guess * (float(r) - 1)) for r in ramp]
        down = [r * s for r, s in zip(down, scales[:-1], strict=True)]
        mid = mid * scales[-1]
        if cfg.global_pool_conditions:
            down = [r.mean(axis=(1, 2), keepdims=True) for r in down]  # (B, 1, 1, c_i)
            mid = mid.mean(axis=(1, 2), keepdims=True)
        return down, mid


# --------------------------------------------------------------------------- loading support


def init_shapes(config: ControlNetConfig, dtype: Any = jnp.float32) -> dict[str, Any]:
    """The params tree as ShapeDtypeStructs (no memory allocated), for `weights.convert` / `load_params`."""
    size = 2 ** (len(config.down_block_types) - 1)
    image_size = size * config.conditioning_downscale
    variables = jax.eval_shape(
        ControlNetModel(config).init,
        jax.random.PRNGKey(0),
        jnp.zeros((1, size, size, config.in_channels)),
        jnp.zeros((1,)),
        jnp.zeros((1, 1, config.unet_config.context_dim)),
        jnp.zeros((1, image_size, image_size, config.conditioning_channels)),
        jnp.ones((1,)),
    )
    return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), variables["params"])


def fix_checkpoint_key(key: str) -> str | None:
    """Rename a checkpoint key to our naming, or None to drop it. Our modules carry diffusers'
    names (controlnet_cond_embedding.blocks.N, controlnet_down_blocks.N, controlnet_mid_block)
    and it saves no buffers, so this is the identity."""
    return key
