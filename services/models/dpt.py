"""DPT-Hybrid (MiDaS): the depth estimator of Stable Diffusion 2's depth-to-image checkpoint.

A Flax re-implementation of transformers' `DPTForDepthEstimation` in its hybrid configuration
(`Intel/dpt-hybrid-midas`, `is_hybrid=True`), up to `predicted_depth`:

  pixels (B, H, W, 3) ─ BiT ResNet stem + 3 stages ─┬─ stage1, stage2 maps ─────────────┐
                                                     └─ stage3 map → 1×1 proj → tokens   │
  tokens + [CLS] + positions → ViT encoder; 2 chosen layers' outputs ─ readout/reassemble ┤
  4 maps → neck convs → fusion (coarse to fine, ×2 each) → head (×2, ReLU) → depth (B, H, W)

Inputs are NHWC (the project's layout), not transformers' NCHW. Module and parameter names are the
checkpoint's (see `sdmesh.services.checkpoints.weights`): `dpt.embeddings.backbone.bit.encoder.stages.0
.layers.1.conv2.weight` lives at `params['dpt']['embeddings']['backbone']['bit']['encoder']['stages_0']
['layers_1']['conv2']['kernel']`; load with `init_shapes` and `fix_checkpoint_key`.

Usage:
    config = DPTConfig.from_json(json.load(open("depth_estimator/config.json")))
    prep = DPTPreprocessConfig.from_json(json.load(open("feature_extractor/preprocessor_config.json")))
    depth = predict_depth(config, params, preprocess([image], prep))   # (1, 384, 384)

`preprocess` is `DPTImageProcessorPil` (PIL bicubic resize, rescale, normalise) in numpy.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import unfreeze

from sdmesh.services.models.attention import attention
from sdmesh.services.models.layers import Dense, GroupNorm, conv2d
from sdmesh.services.models.text_encoder import ACTIVATIONS as _GELUS

# transformers' ACT2FN names this model's configs use → the same function in JAX.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {**_GELUS, "relu": jax.nn.relu}

# BiT's `WeightStandardizedConv2d` is built with eps=1e-8 everywhere in the backbone (its 1e-6 default is unused).
_WS_EPS = 1e-8
_BIT_GROUP_NORM_EPS = 1e-5
_HEAD_CHANNELS = 32  # DPTDepthEstimationHead's second conv width, fixed in transformers

# DPTConfig's backbone when `backbone_config` is null, and BitConfig's own defaults for keys a dict leaves out.
_DPT_HYBRID_BACKBONE: dict[str, Any] = {
    "global_padding": "same",
    "layer_type": "bottleneck",
    "depths": [3, 4, 9],
    "out_features": ["stage1", "stage2", "stage3"],
    "embedding_dynamic_padding": True,
}
_BIT_CONFIG_DEFAULTS: dict[str, Any] = {
    "layer_type": "preactivation",
    "global_padding": None,
    "embedding_dynamic_padding": False,
    "depths": [3, 4, 6, 3],
    "output_stride": 32,
}


def _pair(v: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    if len(v) != 2:
        raise ValueError(f"DPT {name} {v!r}: expected an int or [height, width]")
    return int(v[0]), int(v[1])


def make_div(value: float, divisor: int = 8) -> int:
    """BiT's channel rounding (timm's `make_div`): nearest multiple of `divisor`, never below 90% of `value`."""
    new_value = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new_value + divisor if new_value < 0.9 * value else new_value


@dataclasses.dataclass(frozen=True)
class BitBackboneConfig:
    """The fields of transformers' `BitConfig` that DPT-Hybrid's backbone uses; defaults are DPTConfig's hybrid ones."""

    num_channels: int = 3
    embedding_size: int = 64
    hidden_sizes: tuple[int, ...] = (256, 512, 1024, 2048)
    depths: tuple[int, ...] = (3, 4, 9)
    hidden_act: str = "relu"
    num_groups: int = 32
    width_factor: int = 1

    @property
    def stage_channels(self) -> tuple[int, ...]:
        """Output channels of each stage (BitEncoder zips depths with hidden_sizes: extra sizes are unused)."""
        return tuple(make_div(h * self.width_factor) for h in self.hidden_sizes[: len(self.depths)])

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> BitBackboneConfig:
        """Read DPTConfig's `backbone_config` (None: the hybrid defaults DPTConfig fills in).

        Only the ViT-hybrid BiT is modelled: non-pre-activation bottlenecks, TF "SAME" padding with the
        stem's dynamically padded max-pool, three stages all feeding DPT, no dilation.
        """
        # As DPTConfig builds it: None → its hybrid backbone; a dict → BitConfig's defaults for missing keys.
        d = {**_BIT_CONFIG_DEFAULTS, **(_DPT_HYBRID_BACKBONE if d is None else d)}
        checks = {
            "layer_type": (d["layer_type"], "bottleneck"),
            "global_padding": (str(d["global_padding"]).upper(), "SAME"),
            "embedding_dynamic_padding": (d["embedding_dynamic_padding"], True),
        }
        for name, (got, want) in checks.items():
            if got != want:
                raise ValueError(
                    f"DPT backbone {name}={got!r} is not supported: only DPT-Hybrid's BiT ({name}={want!r}) is modelled"
                )
        if d.get("model_type", "bit") != "bit":
            raise ValueError(f"DPT backbone model_type {d['model_type']!r} is not supported; DPT-Hybrid uses 'bit'")
        depths = list(d["depths"])
        # BitConfig without out_features/out_indices outputs only its last stage.
        out_features = d.get("out_features") or [f"stage{i}" for i in d.get("out_indices") or [len(depths)]]
        if len(depths) != 3 or list(out_features) != ["stage1", "stage2", "stage3"]:
            raise ValueError(
                f"DPT backbone depths {depths} / out_features {out_features}: DPT-Hybrid needs exactly "
                "three BiT stages, all three as outputs (stage1, stage2, stage3)"
            )
        # BitEncoder dilates instead of striding once the stride reaches output_stride; the stride before
        # each stage is 4, 4, 8 here, so any output_stride above 8 means plain strided stages.
        if d["output_stride"] <= 8:
            raise ValueError(f"DPT backbone output_stride {d['output_stride']}: dilated BiT stages are not supported")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names and v is not None}
        for k in ("hidden_sizes", "depths"):
            if k in kwargs:
                kwargs[k] = tuple(kwargs[k])
        return cls(**kwargs)


@dataclasses.dataclass(frozen=True)
class DPTConfig:
    """The fields of transformers' `DPTConfig` the hybrid depth model uses (defaults: transformers')."""

    backbone: BitBackboneConfig = BitBackboneConfig()
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    image_size: tuple[int, int] = (384, 384)
    patch_size: int = 16
    num_channels: int = 3
    qkv_bias: bool = True
    backbone_out_indices: tuple[int, ...] = (2, 5, 8, 11)
    reassemble_factors: tuple[float, ...] = (4, 2, 1, 0.5)
    neck_hidden_sizes: tuple[int, ...] = (96, 192, 384, 768)
    fusion_hidden_size: int = 256
    head_in_index: int = -1
    use_bias_in_fusion_residual: bool = True
    backbone_featmap_channels: int = 1024  # backbone_featmap_shape[1]: the embeddings projection's input width

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def encoder_out_layers(self) -> tuple[int, ...]:
        """Encoder layers whose outputs feed the neck after the two BiT maps, in layer order (as transformers
        collects them: `backbone_out_indices[2:]` filtered over the layers, not in list order)."""
        wanted = set(self.backbone_out_indices[2:])
        return tuple(i for i in range(self.num_hidden_layers) if i in wanted)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DPTConfig:
        """Read a transformers DPTConfig JSON (diffusers' `depth_estimator/config.json`); DPT-Hybrid only."""
        if not d.get("is_hybrid", False):
            raise ValueError(
                "DPT config has is_hybrid=false: only DPT-Hybrid (SD 2 depth's Intel/dpt-hybrid-midas) is "
                "implemented; use a hybrid depth_estimator checkpoint"
            )
        unsupported = {
            "readout_type": (d.get("readout_type", "project"), "project"),
            "use_batch_norm_in_fusion_residual": (bool(d.get("use_batch_norm_in_fusion_residual") or False), False),
            "add_projection": (bool(d.get("add_projection") or False), False),
            "neck_ignore_stages": (list(d.get("neck_ignore_stages", [0, 1])), [0, 1]),
        }
        for name, (got, want) in unsupported.items():
            if got != want:
                raise ValueError(f"DPT {name}={got!r} is not supported (DPT-Hybrid MiDaS uses {want!r})")
        if d.get("backbone") is not None or d.get("use_timm_backbone"):
            raise ValueError("DPT with a named/timm backbone is not supported; only DPT-Hybrid's BiT")
        names = {f.name for f in dataclasses.fields(cls)} - {"backbone", "image_size", "backbone_featmap_channels"}
        kwargs: dict[str, Any] = {k: v for k, v in d.items() if k in names and v is not None}
        for k in ("backbone_out_indices", "reassemble_factors", "neck_hidden_sizes"):
            if k in kwargs:
                kwargs[k] = tuple(kwargs[k])
        if "patch_size" in kwargs:
            ph, pw = _pair(kwargs["patch_size"], "patch_size")
            if ph != pw:
                raise ValueError(f"DPT patch_size {kwargs['patch_size']}: only square patches are supported")
            kwargs["patch_size"] = ph
        backbone = BitBackboneConfig.from_json(d.get("backbone_config"))
        featmap = d.get("backbone_featmap_shape") or [1, 1024, 24, 24]
        cfg = cls(
            backbone=backbone,
            image_size=_pair(d.get("image_size", 384), "image_size"),
            backbone_featmap_channels=int(featmap[1]),
            **kwargs,
        )
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise naming the first inconsistency (each would otherwise fail deep inside a trace)."""
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"DPT hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        for act in (self.hidden_act, self.backbone.hidden_act):
            if act not in ACTIVATIONS:
                raise ValueError(f"DPT hidden_act {act!r} is not supported; use one of {list(ACTIVATIONS)}")
        n = len(self.neck_hidden_sizes)
        if n != 4 or len(self.reassemble_factors) != 4 or len(self.backbone_out_indices) != 4:
            raise ValueError(
                "DPT-Hybrid needs 4 neck_hidden_sizes, reassemble_factors and backbone_out_indices (2 BiT maps "
                f"+ 2 encoder layers); got {list(self.neck_hidden_sizes)}, {list(self.reassemble_factors)}, "
                f"{list(self.backbone_out_indices)}"
            )
        if len(self.encoder_out_layers) != 2:
            raise ValueError(
                f"DPT backbone_out_indices[2:] {list(self.backbone_out_indices[2:])} must name 2 distinct encoder "
                f"layers below num_hidden_layers {self.num_hidden_layers}"
            )
        stage = self.backbone.stage_channels
        if self.backbone_featmap_channels != stage[-1]:
            raise ValueError(
                f"DPT backbone_featmap_shape[1] {self.backbone_featmap_channels} != the last BiT stage's "
                f"{stage[-1]} channels"
            )
        if tuple(self.neck_hidden_sizes[:2]) != stage[:2]:
            raise ValueError(
                f"DPT neck_hidden_sizes[:2] {list(self.neck_hidden_sizes[:2])} must be the BiT stage1/stage2 "
                f"widths {list(stage[:2])}: those maps enter the neck unchanged"
            )
        for f in self.reassemble_factors[2:]:
            if f > 1 and f != int(f):
                raise ValueError(f"DPT reassemble factor {f}: upsampling factors must be integers")
        h, w = self.image_size
        if h != w or h % self.patch_size:
            raise ValueError(
                f"DPT image_size {list(self.image_size)}: only square images that are a multiple of patch_size "
                f"{self.patch_size} are supported (transformers reshapes the token grid as a square)"
            )


# --- BiT backbone -------------------------------------------------------------------------------


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME" padding (BiT's DynamicPad2d): the extra pixel, if any, goes after."""
    pad = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return pad // 2, pad - pad // 2


class WeightStandardizedConv2d(nn.Module):
    """BiT's convolution: each output filter standardised to zero mean, unit (biased) variance, no bias,
    TF "SAME" padding. Weight Standardization, Qiao et al. 2019 (arXiv:1903.10520)."""

    features: int
    kernel_size: int
    stride: int = 1
    eps: float = _WS_EPS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features))
        # Statistics per output filter, over (kh, kw, in): transformers' batch_norm over weight.reshape(1, O, -1).
        mean = kernel.mean(axis=(0, 1, 2))
        var = kernel.var(axis=(0, 1, 2))
        kernel = (kernel - mean) * jax.lax.rsqrt(var + self.eps)
        padding = (same_padding(x.shape[1], k, self.stride), same_padding(x.shape[2], k, self.stride))
        return conv2d(x, kernel.astype(x.dtype), stride=self.stride, padding=padding)


class BitEmbeddings(nn.Module):
    """BiT stem: 7×7/2 conv, group norm + activation, 3×3/2 max-pool (input padded "SAME" with zeros)."""

    config: BitBackboneConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        x = WeightStandardizedConv2d(cfg.embedding_size, 7, stride=2, name="convolution")(x)
        x = ACTIVATIONS[cfg.hidden_act](GroupNorm(cfg.num_groups, _BIT_GROUP_NORM_EPS, name="norm")(x))
        # DynamicPad2d pads with 0, not -inf: matched exactly (after ReLU the two agree anyway).
        pads = (same_padding(x.shape[1], 3, 2), same_padding(x.shape[2], 3, 2))
        x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "VALID")


class BitDownsampleConv(nn.Module):
    """The shortcut of a stage's first block: 1×1 strided conv, group norm without activation."""

    config: BitBackboneConfig
    features: int
    stride: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = WeightStandardizedConv2d(self.features, 1, stride=self.stride, name="conv")(x)
        return GroupNorm(self.config.num_groups, _BIT_GROUP_NORM_EPS, name="norm")(x)


class BitBottleneckLayer(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3×3): act(norm3(conv3(…conv1(x))) + shortcut(x))."""

    config: BitBackboneConfig
    features: int
    stride: int
    is_first_layer: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        act = ACTIVATIONS[cfg.hidden_act]
        mid = make_div(self.features * 0.25)

        def norm(name: str) -> GroupNorm:
            return GroupNorm(cfg.num_groups, _BIT_GROUP_NORM_EPS, name=name)

        shortcut = (
            BitDownsampleConv(cfg, self.features, self.stride, name="downsample")(x) if self.is_first_layer else x
        )
        h = act(norm("norm1")(WeightStandardizedConv2d(mid, 1, name="conv1")(x)))
        h = act(norm("norm2")(WeightStandardizedConv2d(mid, 3, stride=self.stride, name="conv2")(h)))
        h = norm("norm3")(WeightStandardizedConv2d(self.features, 1, name="conv3")(h))
        return act(h + shortcut)


class BitStage(nn.Module):
    config: BitBackboneConfig
    features: int
    stride: int
    depth: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.depth):
            x = BitBottleneckLayer(
                self.config, self.features, self.stride if i == 0 else 1, i == 0, name=f"layers_{i}"
            )(x)
        return x


class BitEncoder(nn.Module):
    config: BitBackboneConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> list[jax.Array]:
        """Stem output (B, H/4, W/4, C) → each stage's output; stage 0 keeps the resolution, the rest halve it."""
        cfg = self.config
        outs = []
        for i, (depth, features) in enumerate(zip(cfg.depths, cfg.stage_channels)):
            x = BitStage(cfg, features, 1 if i == 0 else 2, depth, name=f"stages_{i}")(x)
            outs.append(x)
        return outs


class BitModel(nn.Module):
    config: BitBackboneConfig

    def setup(self) -> None:
        self.embedder = BitEmbeddings(self.config)
        self.encoder = BitEncoder(self.config)

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        return self.encoder(self.embedder(x))


class BitBackbone(nn.Module):
    """transformers' `BitBackbone` as `load_backbone` builds it for DPT: the stage1..3 feature maps."""

    config: BitBackboneConfig

    def setup(self) -> None:
        self.bit = BitModel(self.config)

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        return self.bit(x)


# --- ViT over the backbone's features ---------------------------------------------------------------


class Conv(nn.Module):
    """torch.nn.Conv2d in NHWC with symmetric integer padding and an optional bias."""

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, p = self.kernel_size, self.padding
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features))
        y = conv2d(x, kernel.astype(x.dtype), stride=self.stride, padding=((p, p), (p, p)))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros_init(), (self.features,)).astype(y.dtype)
        return y


class DPTViTHybridEmbeddings(nn.Module):
    """BiT features → 1×1 projection → tokens, with [CLS] and learned positions; also the stage1/2 maps."""

    config: DPTConfig

    def setup(self) -> None:
        cfg = self.config
        grid = cfg.image_size[0] // cfg.patch_size
        self.backbone = BitBackbone(cfg.backbone)
        self.projection = Conv(cfg.hidden_size, 1)
        self.cls_token = self.param("cls_token", nn.initializers.zeros_init(), (1, 1, cfg.hidden_size))
        self.position_embeddings = self.param(
            "position_embeddings", nn.initializers.zeros_init(), (1, grid * grid + 1, cfg.hidden_size)
        )

    def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        """(B, H, W, C) → tokens (B, 1 + N, D) and the stage1, stage2 maps (transformers' intermediate activations)."""
        maps = self.backbone(pixel_values)
        features = self.projection(maps[-1])  # (B, h, w, D)
        b, h, w, d = features.shape
        if h * w + 1 != self.position_embeddings.shape[1]:
            raise ValueError(
                f"DPT backbone grid {h}×{w} does not match the {self.position_embeddings.shape[1] - 1} position "
                f"embeddings of image_size {list(self.config.image_size)}; resize the input to image_size"
            )
        cls = jnp.broadcast_to(self.cls_token.astype(features.dtype), (b, 1, d))
        # transformers resizes the position grid to (H/patch, W/patch) bilinearly; at image_size that is exact identity.
        tokens = jnp.concatenate([cls, features.reshape(b, h * w, d)], axis=1)
        return tokens + self.position_embeddings.astype(tokens.dtype), maps[:2]


class DPTSelfAttention(nn.Module):
    config: DPTConfig
    attention_impl: str = "dot_product"

    def setup(self) -> None:
        cfg = self.config
        self.query = Dense(cfg.hidden_size, use_bias=cfg.qkv_bias)
        self.key = Dense(cfg.hidden_size, use_bias=cfg.qkv_bias)
        self.value = Dense(cfg.hidden_size, use_bias=cfg.qkv_bias)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        heads = (b, n, self.config.num_attention_heads, self.config.head_dim)
        q, k, v = (proj(x).reshape(heads) for proj in (self.query, self.key, self.value))
        return attention(q, k, v, impl=self.attention_impl).reshape(b, n, d)


class DPTViTSelfOutput(nn.Module):
    config: DPTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return Dense(self.config.hidden_size, name="dense")(x)


class DPTViTAttention(nn.Module):
    config: DPTConfig
    attention_impl: str = "dot_product"

    def setup(self) -> None:
        self.attention = DPTSelfAttention(self.config, self.attention_impl)
        self.output = DPTViTSelfOutput(self.config)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.output(self.attention(x))


class DPTViTLayer(nn.Module):
    """Pre-norm ViT block: x + attn(ln_before(x)), then x + mlp(ln_after(x))."""

    config: DPTConfig
    attention_impl: str = "dot_product"

    def setup(self) -> None:
        cfg = self.config
        # Two-pass variance: eps is 1e-12, so E[x²]−E[x]² cancellation would not be hidden by it.
        self.layernorm_before = nn.LayerNorm(epsilon=cfg.layer_norm_eps, use_fast_variance=False)
        self.attention = DPTViTAttention(cfg, self.attention_impl)
        self.layernorm_after = nn.LayerNorm(epsilon=cfg.layer_norm_eps, use_fast_variance=False)
        self.intermediate = DPTViTIntermediate(cfg)
        self.output = DPTViTOutput(cfg)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attention(self.layernorm_before(x))
        return x + self.output(self.intermediate(self.layernorm_after(x)))


class DPTViTIntermediate(nn.Module):
    config: DPTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return ACTIVATIONS[self.config.hidden_act](Dense(self.config.intermediate_size, name="dense")(x))


class DPTViTOutput(nn.Module):
    config: DPTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return Dense(self.config.hidden_size, name="dense")(x)


class DPTViTEncoder(nn.Module):
    config: DPTConfig
    attention_impl: str = "dot_product"

    def setup(self) -> None:
        self.layer = [DPTViTLayer(self.config, self.attention_impl) for _ in range(self.config.num_hidden_layers)]

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        """Tokens (B, 1 + N, D) → every layer's output (before any final norm: DPT reads these)."""
        outs = []
        for layer in self.layer:
            x = layer(x)
            outs.append(x)
        return outs


class DPTModel(nn.Module):
    """Embeddings + encoder. The checkpoint's final `dpt.layernorm` is not used for depth (see fix_checkpoint_key)."""

    config: DPTConfig
    attention_impl: str = "dot_product"

    def setup(self) -> None:
        self.embeddings = DPTViTHybridEmbeddings(self.config)
        self.encoder = DPTViTEncoder(self.config, self.attention_impl)

    def __call__(self, pixel_values: jax.Array) -> tuple[list[jax.Array], list[jax.Array]]:
        """→ (the BiT stage1/stage2 maps, every encoder layer's tokens)."""
        tokens, maps = self.embeddings(pixel_values)
        return maps, self.encoder(tokens)


# --- Neck and head -----------------------------------------------------------------------------------


def _interp_matrix(n_in: int, n_out: int, align_corners: bool) -> np.ndarray:
    """(n_out, n_in) weights of torch's 1-D linear interpolation (`F.interpolate(mode="bilinear")` per axis)."""
    i = np.arange(n_out, dtype=np.float64)
    if align_corners:
        src = i * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros(n_out)
    else:
        src = np.maximum((i + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = src - i0
    m = np.zeros((n_out, n_in), np.float64)
    np.add.at(m, (np.arange(n_out), i0), 1.0 - frac)
    np.add.at(m, (np.arange(n_out), i1), frac)
    return m


def resize_bilinear(x: jax.Array, size: tuple[int, int], *, align_corners: bool) -> jax.Array:
    """torch's bilinear `F.interpolate` (no antialiasing) on NHWC, as two small matmuls: (B, H, W, C) → (B, h, w, C)."""
    mh = jnp.asarray(_interp_matrix(x.shape[1], size[0], align_corners), x.dtype)
    mw = jnp.asarray(_interp_matrix(x.shape[2], size[1], align_corners), x.dtype)
    return jnp.einsum("pw,bowc->bopc", mw, jnp.einsum("oh,bhwc->bowc", mh, x))


def upsample2x(x: jax.Array) -> jax.Array:
    """`nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)`, which DPT's fusion and head use."""
    return resize_bilinear(x, (2 * x.shape[1], 2 * x.shape[2]), align_corners=True)


class ConvTranspose(nn.Module):
    """torch.nn.ConvTranspose2d with kernel_size == stride (non-overlapping, no padding): each pixel paints
    one factor×factor block. `kernel` is (f, f, out, in): torch's (in, out, f, f) after weights.to_flax_layout."""

    features: int
    factor: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        f = self.factor
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (f, f, self.features, x.shape[-1]))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        b, h, w, _ = x.shape
        y = jnp.einsum("bijc,pqoc->bipjqo", x, kernel.astype(x.dtype))  # (B, H, f, W, f, O)
        return y.reshape(b, h * f, w * f, self.features) + bias.astype(x.dtype)


class DPTReassembleLayer(nn.Module):
    config: DPTConfig
    channels: int
    factor: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = Conv(self.channels, 1, name="projection")(x)
        if self.factor > 1:
            return ConvTranspose(self.channels, int(self.factor), name="resize")(x)
        if self.factor < 1:
            return Conv(self.channels, 3, stride=int(1 / self.factor), padding=1, name="resize")(x)
        return x


class DPTReassembleStage(nn.Module):
    """Tokens → maps for the two encoder outputs: readout "project" (concat [CLS] to each token, Linear, act),
    1×1 projection, resize. DPT-Hybrid's first two entries are the BiT maps and pass unchanged."""

    config: DPTConfig

    @nn.compact
    def __call__(self, hidden_states: list[jax.Array]) -> list[jax.Array]:
        cfg = self.config
        out = list(hidden_states[:2])
        for i in (2, 3):
            tokens = hidden_states[i]  # (B, 1 + N, D)
            cls, tokens = tokens[:, :1], tokens[:, 1:]
            b, n, d = tokens.shape
            side = math.isqrt(n)  # transformers assumes a square grid
            readout = jnp.broadcast_to(cls, tokens.shape)
            project = Dense(cfg.hidden_size, name=f"readout_projects_{i}_0")
            x = ACTIVATIONS[cfg.hidden_act](project(jnp.concatenate([tokens, readout], axis=-1)))
            x = x.reshape(b, side, side, d)  # (B, h, w, D)
            out.append(
                DPTReassembleLayer(cfg, cfg.neck_hidden_sizes[i], cfg.reassemble_factors[i], name=f"layers_{i}")(x)
            )
        return out


class DPTPreActResidualLayer(nn.Module):
    """MiDaS's ResidualConvUnit: x + conv2(relu(conv1(relu(x))))."""

    config: DPTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        width, bias = cfg.fusion_hidden_size, cfg.use_bias_in_fusion_residual
        h = Conv(width, 3, padding=1, use_bias=bias, name="convolution1")(jax.nn.relu(x))
        h = Conv(width, 3, padding=1, use_bias=bias, name="convolution2")(jax.nn.relu(h))
        return h + x


class DPTFeatureFusionLayer(nn.Module):
    config: DPTConfig

    @nn.compact
    def __call__(self, x: jax.Array, residual: jax.Array | None = None) -> jax.Array:
        if residual is not None:
            if residual.shape != x.shape:
                residual = resize_bilinear(residual, (x.shape[1], x.shape[2]), align_corners=False)
            x = x + DPTPreActResidualLayer(self.config, name="residual_layer1")(residual)
        x = DPTPreActResidualLayer(self.config, name="residual_layer2")(x)
        return Conv(self.config.fusion_hidden_size, 1, name="projection")(upsample2x(x))


class DPTFeatureFusionStage(nn.Module):
    config: DPTConfig

    @nn.compact
    def __call__(self, features: list[jax.Array]) -> list[jax.Array]:
        """Coarsest map first; each layer adds the next finer map and doubles the resolution."""
        fused: list[jax.Array] = []
        x = None
        for i, feature in enumerate(features[::-1]):
            layer = DPTFeatureFusionLayer(self.config, name=f"layers_{i}")
            x = layer(feature) if x is None else layer(x, feature)
            fused.append(x)
        return fused


class DPTNeck(nn.Module):
    config: DPTConfig

    @nn.compact
    def __call__(self, hidden_states: list[jax.Array]) -> list[jax.Array]:
        cfg = self.config
        maps = DPTReassembleStage(cfg, name="reassemble_stage")(hidden_states)
        features = [
            Conv(cfg.fusion_hidden_size, 3, padding=1, use_bias=False, name=f"convs_{i}")(m) for i, m in enumerate(maps)
        ]
        return DPTFeatureFusionStage(cfg, name="fusion_stage")(features)


class DPTDepthEstimationHead(nn.Module):
    """conv3×3 (F → F/2), ×2 bilinear, conv3×3 (→ 32), ReLU, conv1×1 (→ 1), ReLU: depth (B, H, W)."""

    config: DPTConfig

    @nn.compact
    def __call__(self, fused: list[jax.Array]) -> jax.Array:
        width = self.config.fusion_hidden_size
        x = fused[self.config.head_in_index]
        x = upsample2x(Conv(width // 2, 3, padding=1, name="head_0")(x))
        x = jax.nn.relu(Conv(_HEAD_CHANNELS, 3, padding=1, name="head_2")(x))
        x = jax.nn.relu(Conv(1, 1, name="head_4")(x))
        return x[..., 0]


class DPTForDepthEstimation(nn.Module):
    """pixel_values (B, H, W, 3), normalised as `preprocess` does, at config.image_size → predicted depth (B, H, W).

    With `return_stages=True` it also returns the named intermediates (BiT maps, encoder outputs, neck outputs),
    which is what a parity test compares stage by stage.
    """

    config: DPTConfig
    attention_impl: str = "dot_product"

    def setup(self) -> None:
        self.dpt = DPTModel(self.config, self.attention_impl)
        self.neck = DPTNeck(self.config)
        self.head = DPTDepthEstimationHead(self.config)

    def __call__(self, pixel_values: jax.Array, return_stages: bool = False) -> Any:
        cfg = self.config
        if pixel_values.ndim != 4 or pixel_values.shape[-1] != cfg.num_channels:
            raise ValueError(
                f"DPT expects NHWC pixel values (B, H, W, {cfg.num_channels}); got shape {tuple(pixel_values.shape)}"
            )
        if tuple(pixel_values.shape[1:3]) != cfg.image_size:
            raise ValueError(
                f"DPT input is {pixel_values.shape[1]}×{pixel_values.shape[2]} but the model was built for "
                f"{cfg.image_size[0]}×{cfg.image_size[1]}; resize with `preprocess` first"
            )
        maps, layers = self.dpt(pixel_values)
        hidden_states = maps + [layers[i] for i in cfg.encoder_out_layers]
        fused = self.neck(hidden_states)
        depth = self.head(fused)
        if not return_stages:
            return depth
        return depth, {"backbone": maps, "encoder": layers, "neck": fused}


def predict_depth(
    config: DPTConfig, params: dict[str, Any], pixel_values: jax.Array, attention_impl: str = "dot_product"
) -> jax.Array:
    """pixel_values (B, H, W, 3) NHWC, as `preprocess` returns → predicted depth (B, H, W) (relative inverse depth)."""
    return DPTForDepthEstimation(config, attention_impl).apply({"params": params}, pixel_values)


def init_shapes(config: DPTConfig) -> dict[str, Any]:
    """The params tree as ShapeDtypeStructs (no memory allocated), for `weights.convert`."""
    model = DPTForDepthEstimation(config)
    pixels = jnp.zeros((1, *config.image_size, config.num_channels), jnp.float32)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), pixels))
    return unfreeze(variables["params"])


# Checkpoint keys that are not on the depth path: the ViT's final layer norm (DPT reads the layers' outputs
# before it), a pooler if one was saved, and the first fusion layer's residual unit (transformers builds
# every fusion layer alike, but the coarsest one has no finer map to add, so that unit never runs).
_UNUSED_PREFIXES = ("dpt.layernorm.", "dpt.pooler.", "neck.fusion_stage.layers.0.residual_layer1.")


def fix_checkpoint_key(key: str) -> str | None:
    """A `depth_estimator` checkpoint key → the key `weights.convert` expects, or None to drop it."""
    if key.startswith(_UNUSED_PREFIXES):
        return None
    return key


# --- Preprocessing (DPTImageProcessor as SD 2 depth configures it) ------------------------------------


@dataclasses.dataclass(frozen=True)
class DPTPreprocessConfig:
    """The fields of a DPTImageProcessor `preprocessor_config.json` (defaults: the processor's)."""

    do_resize: bool = True
    size: tuple[int, int] = (384, 384)  # (height, width)
    resample: int = 3  # PIL.Image.BICUBIC
    keep_aspect_ratio: bool = False
    ensure_multiple_of: int = 1
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DPTPreprocessConfig:
        if d.get("do_pad") and d.get("size_divisor"):
            raise ValueError("DPT preprocessing with do_pad/size_divisor is not supported (SD 2 depth does not pad)")
        if d.get("do_center_crop"):
            raise ValueError("DPT preprocessing with do_center_crop is not supported (SD 2 depth does not crop)")
        names = {f.name for f in dataclasses.fields(cls)} - {"size"}
        kwargs: dict[str, Any] = {k: v for k, v in d.items() if k in names and v is not None}
        for k in ("image_mean", "image_std"):
            if k in kwargs:
                v = kwargs[k]
                kwargs[k] = tuple(v) if isinstance(v, (list, tuple)) else (float(v),) * 3
        size = d.get("size", {"height": 384, "width": 384})
        if isinstance(size, int):
            size = {"height": size, "width": size}
        if "height" not in size or "width" not in size:
            raise ValueError(f"DPT preprocessing size {size}: expected an int or {{'height', 'width'}}")
        return cls(size=(int(size["height"]), int(size["width"])), **kwargs)


def _constrain_to_multiple_of(val: float, multiple: int) -> int:
    x = round(val / multiple) * multiple  # Python's round, as transformers
    return math.ceil(val / multiple) * multiple if x < 0 else x


def resize_output_size(height: int, width: int, config: DPTPreprocessConfig) -> tuple[int, int]:
    """transformers' DPT `get_resize_output_image_size`: the target size, or with keep_aspect_ratio the
    scale closest to 1 applied to both sides, each rounded to a multiple of ensure_multiple_of."""
    scale_h, scale_w = config.size[0] / height, config.size[1] / width
    if config.keep_aspect_ratio:
        if abs(1 - scale_w) < abs(1 - scale_h):
            scale_h = scale_w
        else:
            scale_w = scale_h
    m = config.ensure_multiple_of
    return _constrain_to_multiple_of(scale_h * height, m), _constrain_to_multiple_of(scale_w * width, m)


def preprocess(images: Sequence[Any], config: DPTPreprocessConfig) -> np.ndarray:
    """PIL images or uint8 (H, W, 3) arrays → float32 pixel values (B, H, W, 3) NHWC for `predict_depth`.

    DPTImageProcessorPil's steps: PIL resize (config.resample), x·rescale_factor in float64 then float32,
    (x − mean)/std. transformers' `DPTImageProcessor` is this same code when torchvision is absent; with
    torchvision installed it resizes with torchvision instead (not matched here).
    """
    from PIL import Image

    out = []
    for image in images:
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
                raise ValueError(f"DPT preprocess takes uint8 (H, W, 3) arrays; got {image.dtype} {image.shape}")
            image = Image.fromarray(image)
        if image.mode != "RGB":
            image = image.convert("RGB")
        if config.do_resize:
            h, w = resize_output_size(image.height, image.width, config)
            image = image.resize((w, h), resample=config.resample)
        x = np.asarray(image)
        x = (x.astype(np.float64) * config.rescale_factor).astype(np.float32) if config.do_rescale else x
        x = x.astype(np.float32)
        if config.do_normalize:
            mean = np.asarray(config.image_mean, np.float32)
            std = np.asarray(config.image_std, np.float32)
            x = (x - mean) / std
        out.append(x)
    if len({x.shape for x in out}) > 1:
        raise ValueError(
            f"DPT preprocess produced different sizes {sorted({x.shape for x in out})}; with keep_aspect_ratio "
            "preprocess images of one aspect ratio per call"
        )
    return np.stack(out)
