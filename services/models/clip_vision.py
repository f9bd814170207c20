"""CLIP vision tower: transformers' `CLIPVisionModelWithProjection` in Flax, and CLIP's image preprocessing.

SD 1.x's safety checker (`safety_checker.py`) reads images through this tower; an image prompt
(IP-Adapter style) would too. The transformer blocks are the text encoder's (`text_encoder.py`),
run without the causal mask: every patch attends to every patch.

    images uint8 (N, h, w, 3) → preprocess → pixel values (N, S, S, 3), S = image_size
      → patch conv (p×p, stride p) → [CLS] + patches + position embedding → pre_layrnorm
      → encoder → last_hidden_state (N, 1 + (S/p)², D)
      → post_layernorm of the CLS token → pooled (N, D) → visual_projection → image_embeds (N, projection_dim)

Layout is NHWC (the checkpoint's NCHW pixel values transposed). Parameter names are the checkpoint's:
`vision_model.encoder.layers.1.self_attn.q_proj.weight` lives at
`params['vision_model']['encoder']['layers_1']['self_attn']['q_proj']['kernel']`.

Usage:
    cfg = VisionConfig.from_json(json.load(open("safety_checker/config.json")))
    pixels = preprocess(images, config=json.load(open("feature_extractor/preprocessor_config.json")))
    image_embeds, pooled, hidden = CLIPVisionModelWithProjection(cfg).apply({"params": params}, pixels)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import unfreeze

from sdmesh.services.models.attention import attention
from sdmesh.services.models.layers import Dense
from sdmesh.services.models.text_encoder import ACTIVATIONS, CLIPMLP, CLIPAttention, CLIPEncoder, CLIPEncoderLayer

# transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD: what CLIP was trained on, and SD's feature_extractor/.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The architecture fields of transformers' `CLIPVisionConfig`, with its defaults (ViT-B/32)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512

    def __post_init__(self) -> None:
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"vision tower hidden_act {self.hidden_act!r} is not supported; supported: {', '.join(ACTIVATIONS)}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"vision tower hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"vision tower image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1  # the patches and the CLS token

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> VisionConfig:
        """Read a CLIPVisionConfig, or a full CLIPConfig (a safety_checker/ or image_encoder/ config.json).

        In a CLIPConfig the projection head's width is the top-level `projection_dim`
        (CLIPModel and the safety checker build `visual_projection` from it), not the nested one.
        """
        if isinstance(d.get("vision_config"), dict):
            top = d.get("projection_dim")
            d = {**d["vision_config"], **({"projection_dim": top} if top is not None else {})}
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and v is not None})


# text_encoder's CLIPAttention fixes causal=True; these three keep its modules, parameter names and
# __call__s and change only the mask (a `causal` field there would reduce them to one argument).
class _BidirectionalAttention(CLIPAttention):
    """CLIPAttention (same projections, same parameter names) without the text tower's causal mask."""

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, length, width = x.shape
        heads = (batch, length, self.config.num_attention_heads, self.config.head_dim)
        q, k, v = (proj(x).reshape(heads) for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = attention(q, k, v, causal=False, impl=self.attention_impl)
        return self.out_proj(out.reshape(batch, length, width))


class _VisionEncoderLayer(CLIPEncoderLayer):
    """CLIPEncoderLayer (its names and its pre-norm __call__) around bidirectional attention."""

    def setup(self) -> None:
        eps = self.config.layer_norm_eps
        self.layer_norm1 = nn.LayerNorm(epsilon=eps, dtype=self.dtype)
        self.self_attn = _BidirectionalAttention(self.config, dtype=self.dtype, attention_impl=self.attention_impl)
        self.layer_norm2 = nn.LayerNorm(epsilon=eps, dtype=self.dtype)
        self.mlp = CLIPMLP(self.config, dtype=self.dtype)


class _VisionEncoder(CLIPEncoder):
    def setup(self) -> None:
        self.layers = [
            _VisionEncoderLayer(self.config, dtype=self.dtype, attention_impl=self.attention_impl)
            for _ in range(self.config.num_hidden_layers)
        ]


class CLIPVisionEmbeddings(nn.Module):
    """Pixels (N, S, S, C) → [CLS, patch_1, ..., patch_P] + position embedding, (N, 1 + P, D)."""

    config: VisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        cfg = self.config
        p = cfg.patch_size
        patches = nn.Conv(
            cfg.hidden_size,
            (p, p),
            strides=(p, p),
            padding="VALID",
            use_bias=False,
            dtype=self.dtype,
            name="patch_embedding",
        )(pixels)  # (N, S/p, S/p, D)
        n = patches.shape[0]
        patches = patches.reshape(n, -1, cfg.hidden_size)  # row-major, as torch's flatten(2) of NCHW
        cls = self.param("class_embedding", nn.initializers.normal(cfg.hidden_size**-0.5), (cfg.hidden_size,))
        cls = jnp.broadcast_to(cls.astype(patches.dtype), (n, 1, cfg.hidden_size))
        positions = nn.Embed(cfg.num_positions, cfg.hidden_size, dtype=self.dtype, name="position_embedding")
        return jnp.concatenate([cls, patches], axis=1) + positions(jnp.arange(cfg.num_positions))[None]


class CLIPVisionTransformer(nn.Module):
    """transformers' CLIPVisionModel body: pixels → (pooled (N, D), last_hidden_state (N, 1 + P, D))."""

    config: VisionConfig
    dtype: jnp.dtype = jnp.float32
    attention_impl: str = "dot_product"

    def setup(self) -> None:
        eps = self.config.layer_norm_eps
        self.embeddings = CLIPVisionEmbeddings(self.config, dtype=self.dtype)
        self.pre_layrnorm = nn.LayerNorm(epsilon=eps, dtype=self.dtype)  # sic: the checkpoint's spelling
        self.encoder = _VisionEncoder(self.config, dtype=self.dtype, attention_impl=self.attention_impl)
        self.post_layernorm = nn.LayerNorm(epsilon=eps, dtype=self.dtype)

    def __call__(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        size = self.config.image_size
        if pixels.shape[1:] != (size, size, self.config.num_channels):
            raise ValueError(
                f"vision tower expects pixels (N, {size}, {size}, {self.config.num_channels}), got "
                f"{tuple(pixels.shape)}; run `preprocess` first"
            )
        hidden = self.encoder(self.pre_layrnorm(self.embeddings(pixels.astype(self.dtype))))
        # last_hidden_state is not normalised; only the pooled CLS token goes through post_layernorm.
        return self.post_layernorm(hidden[:, 0]), hidden


class CLIPVisionModelWithProjection(nn.Module):
    """pixels (N, S, S, C) → (image_embeds (N, projection_dim), pooled (N, D), last_hidden_state (N, 1 + P, D))."""

    config: VisionConfig
    dtype: jnp.dtype = jnp.float32
    attention_impl: str = "dot_product"

    def setup(self) -> None:
        self.vision_model = CLIPVisionTransformer(self.config, dtype=self.dtype, attention_impl=self.attention_impl)
        self.visual_projection = Dense(self.config.projection_dim, use_bias=False, dtype=self.dtype)

    def __call__(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        pooled, hidden = self.vision_model(pixels)
        return self.visual_projection(pooled), pooled, hidden


def init_shapes(config: VisionConfig, dtype: jnp.dtype = jnp.float32) -> dict[str, Any]:
    """The params tree as ShapeDtypeStructs (no memory allocated), for `weights.convert`."""
    model = CLIPVisionModelWithProjection(config, dtype=dtype)
    pixels = jnp.zeros((1, config.image_size, config.image_size, config.num_channels), jnp.float32)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), pixels))
    return unfreeze(variables["params"])


# The vision tower's own modules, as a bare transformers-5 CLIPVisionModel saves them (no prefix).
_TOWER_MODULES = ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")
# Beside the vision tower in a full CLIPModel: the text tower and its head.
_FOREIGN_PREFIXES = ("text_model.", "text_projection.")
_FOREIGN_KEYS = ("logit_scale",)


def fix_checkpoint_key(key: str) -> str | None:
    """A checkpoint key → the key `weights.convert` expects (`vision_model.…`, `visual_projection.weight`), or None.

    The same tower is saved under three prefixes: `vision_model.` (CLIPVisionModelWithProjection,
    CLIPModel, a transformers-5 safety checker), `vision_model.vision_model.` (a transformers-4
    safety checker, whose CLIPVisionModel wrapped a CLIPVisionTransformer) and none (a
    transformers-5 CLIPVisionModel). Old checkpoints carry the `position_ids` buffer, which we
    compute. Anything else unknown is kept so the loader names it.
    """
    if key.startswith(_FOREIGN_PREFIXES) or key in _FOREIGN_KEYS:
        return None
    if key.startswith(_TOWER_MODULES):
        key = "vision_model." + key
    if key.startswith("vision_model.vision_model."):
        key = key.removeprefix("vision_model.")
    if key == "vision_model.embeddings.position_ids":
        return None
    return key


# --- Image preprocessing (transformers' CLIPImageProcessor, PIL backend) ------------------------------------


def _edge(value: Any, key: str) -> Any:
    """A size field of preprocessor_config.json: an int (older files) or a dict (newer ones)."""
    if not isinstance(value, dict):
        return value
    if key not in value:
        raise ValueError(f"preprocessor_config size {value} has no {key!r}; CLIP's preprocessing needs it")
    return value[key]


def preprocess(
    images: np.ndarray | Sequence[np.ndarray],
    size: int = 224,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    *,
    crop_size: int | None = None,
    config: dict[str, Any] | None = None,
) -> np.ndarray:
    """uint8 RGB images (N, h, w, 3), or a list of (h, w, 3) → float32 pixel values (N, crop, crop, 3), NHWC.

    CLIPImageProcessor's steps, as diffusers feeds it SD's images: resize the shortest side to
    `size` (bicubic, PIL; the long side is int(size · long / short)), center crop `crop_size`
    (default `size`), scale by 1/255, normalise by `mean`/`std`. Given `config` (a
    feature_extractor/preprocessor_config.json dict), its `size`, `crop_size`, `image_mean`,
    `image_std` and `rescale_factor` take the place of the arguments.
    """
    from PIL import Image

    scale = 1 / 255
    if config is not None:
        size = _edge(config.get("size", size), "shortest_edge")
        crop_size = _edge(config.get("crop_size", crop_size), "height")
        mean, std = config.get("image_mean", mean), config.get("image_std", std)
        scale = config.get("rescale_factor", scale)
        if config.get("resample", 3) != 3:
            raise ValueError(f"preprocessor_config resample {config['resample']} is not supported; only bicubic (3) is")
    crop = size if crop_size is None else crop_size
    out = []
    for image in images:
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"preprocess expects uint8 RGB images (h, w, 3), got {image.dtype} {image.shape}")
        h, w = image.shape[:2]
        short, long = min(h, w), max(h, w)
        new_long = int(size * long / short)
        new_h, new_w = (size, new_long) if h <= w else (new_long, size)
        resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), resample=Image.Resampling.BICUBIC))
        out.append(_center_crop(resized, crop))
    # transformers rescales in float64, then casts to float32 before normalising.
    pixels = (np.stack(out).astype(np.float64) * scale).astype(np.float32)
    return (pixels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def _center_crop(image: np.ndarray, crop: int) -> np.ndarray:
    """(h, w, C) → (crop, crop, C) around the centre, zero-padded where the image is smaller (transformers' rule)."""
    h, w = image.shape[:2]
    pad_h, pad_w = max(crop - h, 0), max(crop - w, 0)
    if pad_h or pad_w:
        top, left = -(-pad_h // 2), -(-pad_w // 2)  # ceil, as transformers pads
        image = np.pad(image, ((top, pad_h - top), (left, pad_w - left), (0, 0)))
        h, w = image.shape[:2]
    top, left = (h - crop) // 2, (w - crop) // 2
    return image[top : top + crop, left : left + crop]
