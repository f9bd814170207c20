"""CLIP vision tower: parity with transformers' CLIPVisionModelWithProjection, checkpoint keys, and preprocessing."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import assert_rel_close
from safetensors.numpy import load_file
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from sdmesh.services.checkpoints.weights import convert
from sdmesh.services.models.clip_vision import (
    CLIP_MEAN,
    CLIP_STD,
    CLIPVisionModelWithProjection,
    VisionConfig,
    fix_checkpoint_key,
    init_shapes,
    preprocess,
)

TINY = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
    projection_dim=16,
)


def tiny_torch_config(**overrides) -> transformers.CLIPVisionConfig:
    return transformers.CLIPVisionConfig(**{**TINY, **overrides})


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Replace the init with visible randomness so every weight (and bias) matters."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ("layer_norm" in name or "layrnorm" in name) and name.endswith("weight"):
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.05)
    return model.eval()


def numpy_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def load(state: dict[str, np.ndarray], cfg: VisionConfig) -> dict:
    """The loader's path: drop/rename keys, then the checked conversion."""
    pairs = ((fix_checkpoint_key(k), v) for k, v in state.items())
    return convert(((k, v) for k, v in pairs if k is not None), init_shapes(cfg))


def random_pixels(batch: int = 2, size: int = 32, seed: int = 0) -> np.ndarray:
    """Normalised pixel values, NHWC as our tower reads them."""
    return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)


def torch_outputs(model: torch.nn.Module, pixels_nhwc: np.ndarray):
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(pixels_nhwc.transpose(0, 3, 1, 2).copy()))
    return out.image_embeds.numpy(), out.last_hidden_state.numpy()


def run(cfg: VisionConfig, params: dict, pixels: np.ndarray):
    embeds, pooled, hidden = jax.jit(CLIPVisionModelWithProjection(cfg).apply)({"params": params}, jnp.asarray(pixels))
    return np.asarray(embeds), np.asarray(pooled), np.asarray(hidden)


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_matches_transformers_image_embeds_and_last_hidden_state(hidden_act):
    reference = randomized(transformers.CLIPVisionModelWithProjection(tiny_torch_config(hidden_act=hidden_act)))
    cfg = VisionConfig.from_json(reference.config.to_dict())
    pixels = random_pixels()

    embeds, pooled, hidden = run(cfg, load(numpy_state(reference), cfg), pixels)
    want_embeds, want_hidden = torch_outputs(reference, pixels)

    assert embeds.shape == (2, 16) and pooled.shape == (2, 32) and hidden.shape == (2, 1 + 16, 32)
    assert_rel_close(embeds, want_embeds)
    assert_rel_close(hidden, want_hidden)


def test_loads_what_save_pretrained_writes(tmp_path):
    reference = randomized(transformers.CLIPVisionModelWithProjection(tiny_torch_config(num_hidden_layers=3)), seed=1)
    reference.save_pretrained(str(tmp_path))
    state = load_file(str(tmp_path / "model.safetensors"))
    assert "vision_model.encoder.layers.2.self_attn.q_proj.weight" in state and "visual_projection.weight" in state

    cfg = VisionConfig.from_json(json.loads((tmp_path / "config.json").read_text()))
    assert cfg == VisionConfig(**{**TINY, "num_hidden_layers": 3})
    pixels = random_pixels(seed=1)
    embeds, _, hidden = run(cfg, load(state, cfg), pixels)
    want_embeds, want_hidden = torch_outputs(reference, pixels)
    assert_rel_close(embeds, want_embeds)
    assert_rel_close(hidden, want_hidden)


def test_every_patch_attends_to_every_other_patch():
    # Unlike the text tower, no causal mask: editing the last patch changes the CLS token.
    cfg = VisionConfig(**TINY)
    model = CLIPVisionModelWithProjection(cfg)
    pixels = random_pixels(batch=1)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), pixels)["params"]
    changed = pixels.copy()
    changed[:, -8:, -8:] += 1.0

    apply = jax.jit(model.apply)
    (_, _, a), (_, _, b) = apply({"params": params}, pixels), apply({"params": params}, changed)

    assert not np.allclose(a[:, 0], b[:, 0])


@pytest.mark.parametrize(
    "key, fixed",
    [
        ("vision_model.encoder.layers.1.mlp.fc1.weight", "vision_model.encoder.layers.1.mlp.fc1.weight"),
        ("visual_projection.weight", "visual_projection.weight"),
        # transformers 4 safety checker: CLIPVisionModel wrapped a CLIPVisionTransformer.
        ("vision_model.vision_model.pre_layrnorm.bias", "vision_model.pre_layrnorm.bias"),
        # transformers 5 bare CLIPVisionModel: no prefix.
        ("embeddings.class_embedding", "vision_model.embeddings.class_embedding"),
        ("post_layernorm.weight", "vision_model.post_layernorm.weight"),
        ("vision_model.embeddings.position_ids", None),
        ("vision_model.vision_model.embeddings.position_ids", None),
        ("text_model.encoder.layers.0.mlp.fc1.weight", None),  # a full CLIPModel checkpoint
        ("text_projection.weight", None),
        ("logit_scale", None),
        ("vision_model.something_new.weight", "vision_model.something_new.weight"),  # kept, so the loader names it
    ],
)
def test_fix_checkpoint_key(key, fixed):
    assert fix_checkpoint_key(key) == fixed


def test_param_tree_uses_checkpoint_names():
    shapes = init_shapes(VisionConfig(**TINY))
    assert set(shapes) == {"vision_model", "visual_projection"}
    tower = shapes["vision_model"]
    assert set(tower) == {"embeddings", "pre_layrnorm", "encoder", "post_layernorm"}
    assert set(tower["embeddings"]) == {"patch_embedding", "class_embedding", "position_embedding"}
    assert set(tower["embeddings"]["patch_embedding"]) == {"kernel"}  # no bias, as in CLIP
    assert tower["embeddings"]["patch_embedding"]["kernel"].shape == (8, 8, 3, 32)  # HWIO
    assert tower["embeddings"]["position_embedding"]["embedding"].shape == (17, 32)  # 4×4 patches + CLS
    assert set(tower["encoder"]["layers_1"]) == {"layer_norm1", "self_attn", "layer_norm2", "mlp"}
    assert shapes["visual_projection"] == {"kernel": jax.ShapeDtypeStruct((32, 16), jnp.float32)}


def test_config_from_clip_config_takes_the_top_level_projection_dim():
    # A CLIPConfig (safety_checker/config.json): visual_projection is built from the top-level projection_dim.
    vision = {"hidden_size": 1024, "num_attention_heads": 16, "projection_dim": 512, "patch_size": 14}
    full = {"projection_dim": 768, "vision_config": vision}
    cfg = VisionConfig.from_json(full)
    assert (cfg.hidden_size, cfg.patch_size, cfg.projection_dim) == (1024, 14, 768)
    assert VisionConfig.from_json({}) == VisionConfig()
    assert VisionConfig().num_positions == 50  # ViT-B/32 at 224: 7×7 patches + CLS


def test_config_and_model_reject_what_they_cannot_run():
    with pytest.raises(ValueError, match="'relu'"):
        VisionConfig(hidden_act="relu")
    with pytest.raises(ValueError, match="divisible"):
        VisionConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        VisionConfig(image_size=30, patch_size=8)
    with pytest.raises(ValueError, match="preprocess"):
        CLIPVisionModelWithProjection(VisionConfig(**TINY)).init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))


def random_images(shapes, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]


# Landscape, portrait, square, and one smaller than the target (upsampled); odd sizes exercise the int() rounding.
SHAPES = [(64, 96), (301, 200), (224, 224), (150, 151)]


def test_preprocess_matches_clip_image_processor_defaults():
    images = random_images(SHAPES)
    want = CLIPImageProcessorPil()(images, return_tensors="np")["pixel_values"]  # (N, 3, 224, 224)

    got = preprocess(images)

    assert got.shape == (4, 224, 224, 3) and got.dtype == np.float32
    # The same PIL resize, float64 rescale and float32 normalisation: equal bit for bit.
    np.testing.assert_array_equal(got, want.transpose(0, 2, 3, 1))


@pytest.mark.parametrize(
    "config",
    [
        # SD 1.x's feature_extractor/preprocessor_config.json (older ints), shrunk, with other statistics.
        {"size": 40, "crop_size": 32, "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3], "resample": 3},
        # transformers' newer dict form.
        {"size": {"shortest_edge": 36}, "crop_size": {"height": 36, "width": 36}, "rescale_factor": 1 / 255},
    ],
)
def test_preprocess_reads_preprocessor_config(config):
    images = random_images(SHAPES, seed=1)
    want = CLIPImageProcessorPil(**config)(images, return_tensors="np")["pixel_values"]

    got = preprocess(images, config=config)

    np.testing.assert_array_equal(got, want.transpose(0, 2, 3, 1))


def test_preprocess_arguments_without_config():
    images = random_images([(50, 70)], seed=2)
    want = CLIPImageProcessorPil(size={"shortest_edge": 48}, crop_size={"height": 40, "width": 40})(
        images, return_tensors="np"
    )["pixel_values"]
    got = preprocess(images, size=48, crop_size=40, mean=CLIP_MEAN, std=CLIP_STD)
    np.testing.assert_array_equal(got, want.transpose(0, 2, 3, 1))


def test_preprocess_rejects_float_images():
    with pytest.raises(ValueError, match="uint8"):
        preprocess([np.zeros((8, 8, 3), np.float32)])
