"""SD 1.x safety checker: the same flags as diffusers' StableDiffusionSafetyChecker.forward, and its checkpoints."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker as TorchSafetyChecker
from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance
from safetensors.numpy import load_file
from test_clip_vision import TINY, randomized

from sdmesh.services.checkpoints.weights import convert
from sdmesh.services.models.clip_vision import preprocess
from sdmesh.services.models.safety_checker import (
    SafetyCheckerConfig,
    StableDiffusionSafetyChecker,
    blacken,
    fix_checkpoint_key,
    init_shapes,
    nsfw_scores,
)

PROJECTION = 24  # the CLIPConfig's top-level projection_dim, unlike the vision_config's 16


def tiny_reference(seed: int = 0) -> TorchSafetyChecker:
    config = transformers.CLIPConfig(
        vision_config=TINY,
        text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4),
        projection_dim=PROJECTION,
    )
    reference = randomized(TorchSafetyChecker(config), seed=seed)
    with torch.no_grad():  # at std 0.05 every image's CLS token is nearly the same; at 0.2 images are told apart
        for name, p in reference.vision_model.named_parameters():
            if "norm" not in name:
                p.mul_(4)
        reference.visual_projection.weight.mul_(4)
    return reference


def sample_images() -> np.ndarray:
    """Two decoded images as the pipeline holds them (N, H, W, 3) uint8, not square so the crop matters:
    red rows and blue columns."""
    images = np.zeros((2, 48, 40, 3), np.uint8)
    images[0, ::2, :, 0] = 255
    images[1, :, ::2, 2] = 255
    return images


def clip_input(images: np.ndarray) -> np.ndarray:
    return preprocess(images, size=TINY["image_size"])  # (N, 32, 32, 3)


def torch_embeds(reference: TorchSafetyChecker, pixels: np.ndarray) -> torch.Tensor:
    """The reference's projected image embeddings (N, PROJECTION), as its forward computes them."""
    with torch.no_grad():
        pooled = reference.vision_model(torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()))[1]
        return reference.visual_projection(pooled)


def torch_flags(reference: TorchSafetyChecker, images: np.ndarray, pixels: np.ndarray) -> tuple[np.ndarray, list]:
    """diffusers' forward: (images with flagged ones black, has_nsfw_concepts)."""
    clip = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())
    out, flags = reference(clip_input=clip, images=images.astype(np.float32) / 255)
    return np.asarray(out), flags


def save_and_load(reference: TorchSafetyChecker, tmp_path) -> tuple[SafetyCheckerConfig, dict]:
    """save_pretrained the reference, then read config.json and the weights with our loader."""
    reference.save_pretrained(str(tmp_path))
    cfg = SafetyCheckerConfig.from_json(json.loads((tmp_path / "config.json").read_text()))
    return cfg, load(load_file(str(tmp_path / "model.safetensors")), cfg)


def load(state: dict[str, np.ndarray], cfg: SafetyCheckerConfig) -> dict:
    pairs = ((fix_checkpoint_key(k), v) for k, v in state.items())
    return convert(((k, v) for k, v in pairs if k is not None), init_shapes(cfg))


def run(cfg: SafetyCheckerConfig, params: dict, pixels: np.ndarray):
    scores = jax.jit(StableDiffusionSafetyChecker(cfg).apply)({"params": params}, jnp.asarray(pixels))
    return jax.tree.map(np.asarray, scores)


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(cosine_distance(a[None], b[None])[0, 0])


def set_thresholds(reference: TorchSafetyChecker, concept: float, special: float) -> None:
    with torch.no_grad():
        reference.concept_embeds_weights.fill_(concept)
        reference.special_care_embeds_weights.fill_(special)


def test_an_image_matching_a_concept_is_flagged_as_diffusers_flags_it(tmp_path):
    reference, images = tiny_reference(), sample_images()
    pixels = clip_input(images)
    e = torch_embeds(reference, pixels)
    between = cos(e[1], e[0])
    assert between < 0.95  # the two images are told apart, so one threshold can split them
    set_thresholds(reference, concept=1.0, special=1.0)  # cosine ≤ 1: nothing is flagged ...
    with torch.no_grad():
        reference.concept_embeds[3] = e[0]  # ... but concept 3, which is image 0, halfway between the two
        reference.concept_embeds_weights[3] = (1 + between) / 2

    cfg, params = save_and_load(reference, tmp_path)
    scores = run(cfg, params, pixels)
    want_images, want_flags = torch_flags(reference, images, pixels)

    assert scores.has_nsfw_concepts.tolist() == want_flags == [True, False]
    assert scores.concept_scores.shape == (2, 17) and scores.special_scores.shape == (2, 3)
    assert (scores.concept_scores[0] > 0).tolist() == [i == 3 for i in range(17)]
    np.testing.assert_array_equal(blacken(images.astype(np.float32) / 255, scores.has_nsfw_concepts), want_images)


def test_images_below_every_threshold_are_not_flagged_and_scores_match(tmp_path):
    reference, images = tiny_reference(seed=1), sample_images()
    set_thresholds(reference, concept=1.0, special=1.0)
    pixels = clip_input(images)

    cfg, params = save_and_load(reference, tmp_path)
    scores = run(cfg, params, pixels)
    _, want_flags = torch_flags(reference, images, pixels)

    assert scores.has_nsfw_concepts.tolist() == want_flags == [False, False]
    e = torch_embeds(reference, pixels)
    want = np.round(cosine_distance(e, reference.concept_embeds).numpy() - 1.0, 3)
    # The towers agree to ~1e-6; a score may round to the other side of a 3rd-decimal tie.
    np.testing.assert_allclose(scores.concept_scores, want, atol=1e-3 + 1e-6)


@pytest.mark.parametrize("special_threshold_hit", [True, False])
def test_a_special_care_hit_lowers_every_concept_threshold_by_0_01(tmp_path, special_threshold_hit):
    reference, images = tiny_reference(seed=2), sample_images()
    pixels = clip_input(images)
    e = torch_embeds(reference, pixels)
    between = cos(e[1], e[0])
    assert between < 0.95
    set_thresholds(reference, concept=1.0, special=1.0)
    with torch.no_grad():
        # Concept 2 is image 0 but its threshold sits 0.005 above a perfect match: only the 0.01 flags it.
        reference.concept_embeds[2] = e[0]
        reference.concept_embeds_weights[2] = 1.005
        reference.special_care_embeds[1] = e[0]
        reference.special_care_embeds_weights[1] = (1 + between) / 2 if special_threshold_hit else 1.0

    cfg, params = save_and_load(reference, tmp_path)
    scores = run(cfg, params, pixels)
    _, want_flags = torch_flags(reference, images, pixels)

    assert scores.has_nsfw_concepts.tolist() == want_flags == [special_threshold_hit, False]
    assert scores.concept_scores[0, 2] == pytest.approx(0.005 if special_threshold_hit else -0.005, abs=1e-6)


def test_loads_transformers4_safety_checker_keys(tmp_path):
    # Hub SD 1.x checkpoints: `vision_model.vision_model.` prefixes and the position_ids buffer.
    reference, images = tiny_reference(seed=3), sample_images()
    pixels = clip_input(images)
    cfg, params = save_and_load(reference, tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    old = {(f"vision_model.{k}" if k.startswith("vision_model.") else k): v for k, v in state.items()}
    old["vision_model.vision_model.embeddings.position_ids"] = np.arange(17, dtype=np.int64)[None]
    assert "vision_model.vision_model.encoder.layers.1.mlp.fc2.weight" in old

    new_scores, old_scores = run(cfg, params, pixels), run(cfg, load(old, cfg), pixels)

    np.testing.assert_array_equal(old_scores.concept_scores, new_scores.concept_scores)


def test_config_reads_the_clip_config_and_its_top_level_projection_dim(tmp_path):
    cfg, params = save_and_load(tiny_reference(), tmp_path)
    assert cfg.vision.projection_dim == PROJECTION and cfg.vision.hidden_size == 32
    assert params["concept_embeds"].shape == (17, PROJECTION)
    assert params["special_care_embeds_weights"].shape == (3,)
    assert params["visual_projection"]["kernel"].shape == (32, PROJECTION)


def test_later_special_scores_carry_the_adjustment_after_the_first_hit():
    # diffusers' loop raises `adjustment` at the first special-care hit; scores after it include the 0.01.
    image = jnp.array([[1.0, 0.0]])
    special = jnp.array([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])  # cosines 0, 1, 0.7071
    scores = nsfw_scores(image, jnp.array([[1.0, 0.0]]), jnp.array([1.005]), special, jnp.array([0.5, 0.5, 0.7]))

    np.testing.assert_allclose(scores.special_scores[0], [-0.5, 0.5, 0.017], atol=1e-6)  # 0.7071 − 0.7 + 0.01
    np.testing.assert_allclose(scores.concept_scores[0], [0.005], atol=1e-6)
    assert scores.has_nsfw_concepts.tolist() == [True]


def test_scores_round_to_three_decimals_before_the_comparison():
    # 4e-4 above the threshold rounds to 0.000: not flagged, as in diffusers' forward (forward_onnx would flag it).
    image = jnp.array([[1.0, 0.0]])
    none = jnp.array([[0.0, 1.0]]), jnp.array([1.0])
    scores = nsfw_scores(image, jnp.array([[1.0, 0.0]]), jnp.array([1.0 - 4e-4]), *none)
    assert scores.has_nsfw_concepts.tolist() == [False]
    scores = nsfw_scores(image, jnp.array([[1.0, 0.0]]), jnp.array([1.0 - 6e-4]), *none)
    assert scores.has_nsfw_concepts.tolist() == [True]


def test_blacken_replaces_only_flagged_images_and_leaves_the_input_alone():
    images = np.full((3, 4, 4, 3), 200, np.uint8)
    out = blacken(images, np.array([False, True, False]))
    assert out[1].max() == 0 and (out[[0, 2]] == 200).all()
    assert (images == 200).all()
