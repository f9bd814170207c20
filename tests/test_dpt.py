"""DPT-Hybrid depth estimator: parity with transformers' DPTForDepthEstimation and DPTImageProcessor."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import assert_rel_close
from PIL import Image

from sdmesh.services.checkpoints.weights import convert
from sdmesh.services.engine.stages import load_params
from sdmesh.services.models.dpt import (
    DPTConfig,
    DPTForDepthEstimation,
    DPTPreprocessConfig,
    fix_checkpoint_key,
    init_shapes,
    predict_depth,
    preprocess,
)

SIZE = 64  # BiT stride 16 → a 4×4 token grid


def tiny_hybrid_config(reassemble_factors=(1, 1, 1, 0.5), **overrides) -> transformers.DPTConfig:
    """SD 2 depth's DPT-Hybrid shape, shrunk: 3 BiT stages, 4 ViT layers, layers 1 and 3 read by the neck."""
    fields = dict(
        is_hybrid=True,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=48,
        image_size=SIZE,
        patch_size=16,
        backbone_out_indices=[0, 1, 1, 3],
        reassemble_factors=list(reassemble_factors),
        neck_hidden_sizes=[16, 32, 32, 32],
        fusion_hidden_size=16,
        backbone_featmap_shape=[1, 64, SIZE // 16, SIZE // 16],
        backbone_config=dict(
            global_padding="same",
            layer_type="bottleneck",
            depths=[1, 2, 2],
            hidden_sizes=[16, 32, 64],
            embedding_size=8,
            num_groups=4,
            out_features=["stage1", "stage2", "stage3"],
            embedding_dynamic_padding=True,
        ),
    )
    return transformers.DPTConfig(**{**fields, **overrides})


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Visible randomness in every weight, norm scales near 1, so each parameter and its layout matter."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.1)
    return model.eval()


def saved_and_loaded(tmp_path, torch_config: transformers.DPTConfig):
    """Save a random transformers model, read it back the way the engine loads checkpoints."""
    model = randomized(transformers.DPTForDepthEstimation(torch_config))
    model.save_pretrained(tmp_path)
    cfg = DPTConfig.from_json(json.loads((tmp_path / "config.json").read_text()))
    params = load_params(
        [tmp_path / "model.safetensors"],
        init_shapes(cfg),
        dtype=jnp.float32,
        fix_key=fix_checkpoint_key,
        source="depth_estimator",
    )
    return model, cfg, params


def random_pixels(batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (batch, SIZE, SIZE, 3)).astype(np.float32)  # NHWC


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def run(cfg: DPTConfig, params, pixels: np.ndarray):
    fn = jax.jit(lambda p, x: DPTForDepthEstimation(cfg).apply({"params": p}, x, return_stages=True))
    return fn(params, jnp.asarray(pixels))


def torch_depth(model: torch.nn.Module, pixels: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(pixel_values=nchw(pixels)).predicted_depth.numpy()


@pytest.fixture(scope="module")
def sd2_shaped(tmp_path_factory):
    """The tiny model with SD 2 depth's reassemble factors, its inputs and our outputs: built and compiled once."""
    model, cfg, params = saved_and_loaded(tmp_path_factory.mktemp("dpt"), tiny_hybrid_config())
    pixels = random_pixels()
    depth, stages = run(cfg, params, pixels)
    return model, pixels, np.asarray(depth), stages


def test_predicted_depth_matches_transformers_dpt_hybrid(sd2_shaped):
    model, pixels, depth, _ = sd2_shaped
    want = torch_depth(model, pixels)
    assert depth.shape == want.shape == (2, SIZE, SIZE)
    assert_rel_close(depth, want)  # fp32 end to end; observed ~2e-6


def test_an_upsampling_reassemble_and_a_resized_fusion_residual_match_transformers(tmp_path):
    # Factor 2 on the third map: a ConvTranspose2d, and that map (8×8) no longer matches the fused 4×4,
    # so the fusion layer interpolates its residual (align_corners=False) before adding it.
    model, cfg, params = saved_and_loaded(tmp_path, tiny_hybrid_config(reassemble_factors=(1, 1, 2, 0.5)))
    pixels = random_pixels(seed=2)
    depth = jax.jit(predict_depth, static_argnums=0)(cfg, params, jnp.asarray(pixels))
    assert_rel_close(np.asarray(depth), torch_depth(model, pixels))


def test_each_stage_matches_transformers_backbone_encoder_and_neck(sd2_shaped):
    model, pixels, _, stages = sd2_shaped
    neck_out = []
    hook = model.neck.fusion_stage.register_forward_hook(lambda _m, _i, out: neck_out.extend(out))
    with torch.no_grad():
        x = nchw(pixels)
        maps = model.dpt.embeddings.backbone(x).feature_maps
        layers = model.dpt(x, output_hidden_states=True).hidden_states[1:]
        model(pixel_values=x)
    hook.remove()
    for ours, theirs in zip(stages["backbone"], maps[:2], strict=True):
        assert_rel_close(np.asarray(ours), theirs.numpy().transpose(0, 2, 3, 1))
    for ours, theirs in zip(stages["encoder"], layers, strict=True):
        assert_rel_close(np.asarray(ours), theirs.numpy())
    for ours, theirs in zip(stages["neck"], neck_out, strict=True):
        assert_rel_close(np.asarray(ours), theirs.numpy().transpose(0, 2, 3, 1))


def sd2_depth_estimator_config() -> transformers.DPTConfig:
    """Intel/dpt-hybrid-midas as SD 2 depth ships it (transformers' conversion script's values)."""
    return transformers.DPTConfig(
        is_hybrid=True,
        reassemble_factors=[1, 1, 1, 0.5],
        neck_hidden_sizes=[256, 512, 768, 768],
        backbone_featmap_shape=[1, 1024, 24, 24],
    )


def test_the_full_size_checkpoint_layout_converts_key_for_key_and_shape_for_shape():
    with torch.device("meta"):  # shapes only: no 120M-parameter init
        model = transformers.DPTForDepthEstimation(sd2_depth_estimator_config())
    cfg = DPTConfig.from_json(model.config.to_dict())
    assert cfg.backbone.stage_channels == (256, 512, 1024)
    assert cfg.encoder_out_layers == (8, 11)
    zeros = ((k, np.broadcast_to(np.float32(0), tuple(v.shape))) for k, v in model.state_dict().items())
    convert(((fix_checkpoint_key(k), v) for k, v in zeros if fix_checkpoint_key(k) is not None), init_shapes(cfg))


def test_non_hybrid_and_unsupported_options_are_refused_by_name():
    hybrid = tiny_hybrid_config().to_dict()
    with pytest.raises(ValueError, match="is_hybrid"):
        DPTConfig.from_json({**hybrid, "is_hybrid": False})
    with pytest.raises(ValueError, match="use_batch_norm_in_fusion_residual"):
        DPTConfig.from_json({**hybrid, "use_batch_norm_in_fusion_residual": True})
    with pytest.raises(ValueError, match="layer_type"):
        DPTConfig.from_json({**hybrid, "backbone_config": {**hybrid["backbone_config"], "layer_type": "preactivation"}})
    with pytest.raises(ValueError, match="global_padding"):
        DPTConfig.from_json({**hybrid, "backbone_config": {**hybrid["backbone_config"], "global_padding": None}})


def test_the_model_refuses_pixels_not_at_image_size():
    cfg = DPTConfig.from_json(tiny_hybrid_config().to_dict())
    with pytest.raises(ValueError, match="resize with `preprocess`"):
        jax.eval_shape(lambda: DPTForDepthEstimation(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))


# SD 2 depth's feature_extractor/preprocessor_config.json (DPTFeatureExtractor as saved with the checkpoint).
SD2_DEPTH_PREPROCESSOR = {
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "DPTFeatureExtractor",
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "resample": 3,
    "size": 384,
    "keep_aspect_ratio": False,
    "ensure_multiple_of": 1,
}


def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    # Smooth content plus noise: resampling sees edges and flat regions both.
    ramp = np.linspace(0, 255, width)[None, :, None] * np.ones((height, 1, 3))
    noise = rng.normal(0, 40, (height, width, 3))
    return Image.fromarray(np.clip(ramp + noise, 0, 255).astype(np.uint8))


@pytest.mark.parametrize(
    "overrides",
    [{}, {"keep_aspect_ratio": True, "ensure_multiple_of": 32}],
    ids=["sd2-depth", "keep-aspect-multiple-of-32"],
)
@pytest.mark.parametrize(
    "processor",
    # Without torchvision (not a dependency here) DPTImageProcessor falls back to DPTImageProcessorPil, which is
    # what the depth2img pipeline then runs; the torchvision backend's own resize is not compared here.
    [transformers.DPTImageProcessorPil, transformers.DPTImageProcessor],
    ids=["pil", "default"],
)
def test_preprocessing_matches_the_dpt_image_processor(overrides, processor):
    config = {**SD2_DEPTH_PREPROCESSOR, **overrides}
    images = [random_image(300, 457, seed=0), random_image(300, 457, seed=1)]
    ours = preprocess(images, DPTPreprocessConfig.from_json(config))
    reference = processor(**config)(images, return_tensors="np").pixel_values.transpose(0, 2, 3, 1)  # NCHW → NHWC
    assert ours.shape == reference.shape
    np.testing.assert_allclose(ours, reference, atol=1e-5, rtol=0)
