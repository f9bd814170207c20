"""SD 1.x's NSFW filter: diffusers' `StableDiffusionSafetyChecker` in Flax.

The CLIP vision tower (`clip_vision.py`) embeds each image; the image is flagged when its
cosine similarity to any of 17 hidden "concept" embeddings exceeds that concept's threshold.
Three "special care" embeddings, when any is exceeded, lower every concept threshold by 0.01.
Scores are rounded to 3 decimals before the comparison, as diffusers' `forward` does (its
`forward_onnx` does not round), so an image within 5e-4 of a threshold is flagged as diffusers flags it.

    pixels (N, 224, 224, 3) from clip_vision.preprocess
      → vision_model → pooled (N, D) → visual_projection → (N, projection_dim)
      → cosine to concept_embeds (17, E), special_care_embeds (3, E) → SafetyScores

Usage:
    cfg = SafetyCheckerConfig.from_json(json.load(open("safety_checker/config.json")))
    scores = StableDiffusionSafetyChecker(cfg).apply({"params": params}, pixels)
    images = blacken(images, np.asarray(scores.has_nsfw_concepts))
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import unfreeze

from sdmesh.services.models import clip_vision
from sdmesh.services.models.clip_vision import CLIPVisionTransformer, VisionConfig
from sdmesh.services.models.layers import Dense

SPECIAL_CARE_ADJUSTMENT = 0.01  # diffusers: how much a special-care hit lowers every concept threshold
_EMBEDDING_KEYS = ("concept_embeds", "special_care_embeds", "concept_embeds_weights", "special_care_embeds_weights")


@dataclasses.dataclass(frozen=True)
class SafetyCheckerConfig:
    vision: VisionConfig
    # diffusers builds the checker with these fixed counts; the checkpoint's tensors must match.
    num_concepts: int = 17
    num_special_care: int = 3

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SafetyCheckerConfig:
        """Read safety_checker/config.json (a CLIPConfig; its text_config is unused)."""
        return cls(vision=VisionConfig.from_json(d))


class SafetyScores(NamedTuple):
    has_nsfw_concepts: jax.Array  # (N,) bool
    concept_scores: jax.Array  # (N, num_concepts): cosine − threshold (+ adjustment), rounded to 3 decimals
    special_scores: jax.Array  # (N, num_special_care): likewise


def cosine_similarity(a: jax.Array, b: jax.Array) -> jax.Array:
    """(N, E) · (M, E) → (N, M), each row L2-normalised as torch.nn.functional.normalize does (norm ≥ 1e-12)."""

    def unit(x: jax.Array) -> jax.Array:
        return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    return unit(a) @ unit(b).T


def nsfw_scores(
    image_embeds: jax.Array,
    concept_embeds: jax.Array,
    concept_thresholds: jax.Array,
    special_care_embeds: jax.Array,
    special_care_thresholds: jax.Array,
) -> SafetyScores:
    """diffusers' `StableDiffusionSafetyChecker.forward` decision, vectorised over images, in float32.

    Its loop over special-care concepts raises `adjustment` to 0.01 at the first hit, so each later
    special score carries it too; a hit can only follow the first raw one, so "any raw hit before j"
    is the adjustment of score j.
    """
    embeds = image_embeds.astype(jnp.float32)
    special_raw = cosine_similarity(embeds, special_care_embeds.astype(jnp.float32)) - special_care_thresholds
    raw_hit = jnp.round(special_raw, 3) > 0  # (N, S)
    hit_before = (jnp.cumsum(raw_hit, axis=-1) - raw_hit) > 0
    special_scores = jnp.round(special_raw + SPECIAL_CARE_ADJUSTMENT * hit_before, 3)
    adjustment = SPECIAL_CARE_ADJUSTMENT * raw_hit.any(axis=-1, keepdims=True)  # (N, 1)
    cos = cosine_similarity(embeds, concept_embeds.astype(jnp.float32))
    concept_scores = jnp.round(cos - concept_thresholds + adjustment, 3)
    return SafetyScores((concept_scores > 0).any(axis=-1), concept_scores, special_scores)


class StableDiffusionSafetyChecker(nn.Module):
    """pixels (N, S, S, 3) (clip_vision.preprocess) → SafetyScores. Parameter names are the checkpoint's."""

    config: SafetyCheckerConfig
    dtype: jnp.dtype = jnp.float32
    attention_impl: str = "dot_product"

    def setup(self) -> None:
        cfg = self.config
        dim = cfg.vision.projection_dim
        self.vision_model = CLIPVisionTransformer(cfg.vision, dtype=self.dtype, attention_impl=self.attention_impl)
        self.visual_projection = Dense(dim, use_bias=False, dtype=self.dtype)
        ones = nn.initializers.ones_init()
        self.concept_embeds = self.param("concept_embeds", ones, (cfg.num_concepts, dim))
        self.special_care_embeds = self.param("special_care_embeds", ones, (cfg.num_special_care, dim))
        self.concept_embeds_weights = self.param("concept_embeds_weights", ones, (cfg.num_concepts,))
        self.special_care_embeds_weights = self.param("special_care_embeds_weights", ones, (cfg.num_special_care,))

    def __call__(self, pixels: jax.Array) -> SafetyScores:
        pooled, _ = self.vision_model(pixels)
        return nsfw_scores(
            self.visual_projection(pooled),
            self.concept_embeds,
            self.concept_embeds_weights,
            self.special_care_embeds,
            self.special_care_embeds_weights,
        )


def blacken(images: np.ndarray, has_nsfw_concepts: np.ndarray) -> np.ndarray:
    """A copy of `images` (N, ...) with every flagged image replaced by zeros (diffusers' black image)."""
    out = np.array(images, copy=True)
    out[np.asarray(has_nsfw_concepts, dtype=bool)] = 0
    return out


def init_shapes(config: SafetyCheckerConfig, dtype: jnp.dtype = jnp.float32) -> dict[str, Any]:
    """The params tree as ShapeDtypeStructs (no memory allocated), for `weights.convert`."""
    v = config.vision
    pixels = jnp.zeros((1, v.image_size, v.image_size, v.num_channels), jnp.float32)
    model = StableDiffusionSafetyChecker(config, dtype=dtype)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), pixels))
    return unfreeze(variables["params"])


def fix_checkpoint_key(key: str) -> str | None:
    """A safety_checker/ key → the key `weights.convert` expects: the four embedding tensors as they are,
    the tower's keys as `clip_vision.fix_checkpoint_key` renames them (transformers 4 and 5 prefixes)."""
    if key in _EMBEDDING_KEYS:
        return key
    return clip_vision.fix_checkpoint_key(key)
