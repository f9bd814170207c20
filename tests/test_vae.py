"""The Flax VAE matches diffusers' AutoencoderKL (PyTorch) when loaded from its state dict.

Reference models are tiny and randomly initialised (every weight re-drawn so no
zero-initialised layer hides a bug); the Flax side is built only from the
reference's config.json and state dict, the way a real checkpoint is loaded.
"""

from __future__ import annotations

import functools

import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import assert_rel_close, rel_error

from sdmesh.services.checkpoints.weights import CheckpointError, convert
from sdmesh.services.models.vae import (
    AutoencoderKL,
    VAEConfig,
    encode_image,
    fix_checkpoint_key,
    fix_checkpoint_tensor,
    init_shapes,
    scale_latents,
    unscale_latents,
)

# name → diffusers.AutoencoderKL kwargs; all produce 32×32 images.
CONFIGS = {
    "two_blocks": dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8),
    "two_blocks_deeper": dict(block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=16),
    "three_blocks": dict(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8),
    "no_quant_convs": dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ),
    "no_mid_attention": dict(
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, mid_block_add_attention=False
    ),
    # stabilityai/stable-diffusion-x4-upscaler's VAE at toy widths: 3 levels (factor 4), 2 resnets per
    # level, its own scaling_factor.
    "x4_upscaler": dict(block_out_channels=(16, 32, 64), layers_per_block=2, norm_num_groups=8, scaling_factor=0.08333),
}
IMAGE_SIZE = 32


def to_nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def to_nchw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


@functools.cache
def reference(name: str) -> diffusers.AutoencoderKL:
    """A tiny diffusers VAE with every parameter re-drawn (norm scales near 1, the rest small)."""
    kwargs = CONFIGS[name]
    n = len(kwargs["block_out_channels"])
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        latent_channels=4,
        sample_size=IMAGE_SIZE,
        **kwargs,
    ).eval()
    with torch.no_grad():
        for key, p in vae.named_parameters():
            if "norm" in key and key.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    return vae


def state_dict_pairs(vae: diffusers.AutoencoderKL) -> list[tuple[str, np.ndarray]]:
    return [(k, v.detach().numpy()) for k, v in vae.state_dict().items()]


@functools.cache
def flax_model(name: str) -> tuple[VAEConfig, dict]:
    """Config from the reference's config.json, params through the checkpoint loader."""
    vae = reference(name)
    cfg = VAEConfig.from_json(dict(vae.config))
    return cfg, convert(state_dict_pairs(vae), init_shapes(cfg))


def random_images(batch: int = 2, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (batch, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)


def random_latents(cfg: VAEConfig, batch: int = 2, seed: int = 2) -> np.ndarray:
    side = IMAGE_SIZE // cfg.scale_factor
    return np.random.default_rng(seed).standard_normal((batch, side, side, cfg.latent_channels)).astype(np.float32)


def decode(params: dict, cfg: VAEConfig, latents: np.ndarray, dtype=jnp.float32) -> np.ndarray:
    out = AutoencoderKL(cfg, dtype=dtype).apply({"params": params}, jnp.asarray(latents), method=AutoencoderKL.decode)
    return np.asarray(out.astype(jnp.float32))


def encode(params: dict, cfg: VAEConfig, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, logvar = AutoencoderKL(cfg).apply({"params": params}, jnp.asarray(images), method=AutoencoderKL.encode)
    return np.asarray(mean), np.asarray(logvar)


# ------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", list(CONFIGS))
def test_decode_matches_diffusers(name):
    cfg, params = flax_model(name)
    z = random_latents(cfg)
    with torch.no_grad():
        expected = to_nhwc(reference(name).decode(to_nchw(z)).sample)
    actual = decode(params, cfg, z)
    assert actual.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert_rel_close(actual, expected)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_encode_moments_match_diffusers(name):
    cfg, params = flax_model(name)
    x = random_images()
    with torch.no_grad():
        dist = reference(name).encode(to_nchw(x)).latent_dist
    mean, logvar = encode(params, cfg, x)
    side = IMAGE_SIZE // cfg.scale_factor
    assert mean.shape == logvar.shape == (2, side, side, cfg.latent_channels)
    assert_rel_close(mean, to_nhwc(dist.mean))
    assert_rel_close(logvar, to_nhwc(dist.logvar))


def test_logvar_is_clipped_like_diffusers():
    cfg, params = flax_model("two_blocks")
    # Blow up the last conv so raw logvars leave [-30, 20]; diffusers clamps there.
    params = {**params, "quant_conv": {k: np.asarray(v) * 1e4 for k, v in params["quant_conv"].items()}}
    _, logvar = encode(params, cfg, random_images())
    assert logvar.min() >= -30.0 and logvar.max() <= 20.0
    assert logvar.min() == -30.0 or logvar.max() == 20.0


def test_bf16_activations_are_finite_and_close_to_fp32():
    cfg, params = flax_model("two_blocks")
    z = random_latents(cfg)
    fp32 = decode(params, cfg, z)
    bf16 = decode(params, cfg, z, dtype=jnp.bfloat16)
    assert np.isfinite(bf16).all()
    assert rel_error(bf16, fp32) < 5e-2


# -------------------------------------------------------------------- checkpoints


def test_wrong_shape_tensor_raises_checkpoint_error_naming_the_key():
    cfg, _ = flax_model("two_blocks")
    bad_key = "decoder.up_blocks.0.resnets.1.conv1.weight"
    pairs = [(k, v[: v.shape[0] // 2] if k == bad_key else v) for k, v in state_dict_pairs(reference("two_blocks"))]
    with pytest.raises(CheckpointError, match=bad_key.replace(".", r"\.")):
        convert(pairs, init_shapes(cfg))


def test_old_attention_names_and_conv_shaped_weights_load_to_the_same_model():
    vae = reference("two_blocks")
    cfg, params = flax_model("two_blocks")
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old_pairs = []
    for key, value in state_dict_pairs(vae):
        for new, old in old_names.items():
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        if ".attentions.0." in key and key.endswith("weight") and value.ndim == 2 and key.startswith("decoder"):
            value = value[:, :, None, None]  # some old checkpoints store them as 1×1 convs (decoder only: both forms)
        old_pairs.append((key, value))
    assert any(".query.weight" in k for k, _ in old_pairs)
    assert any(v.ndim == 4 and ".proj_attn." in k for k, v in old_pairs)

    fixed = [(fix_checkpoint_key(k), v) for k, v in old_pairs]
    fixed = [(k, fix_checkpoint_tensor(k, v)) for k, v in fixed if k is not None]
    old_params = convert(fixed, init_shapes(cfg))

    z = random_latents(cfg)
    np.testing.assert_array_equal(decode(old_params, cfg, z), decode(params, cfg, z))
    x = random_images()
    np.testing.assert_array_equal(encode(old_params, cfg, x)[0], encode(params, cfg, x)[0])


def test_fix_checkpoint_key_leaves_current_names_alone():
    for key in (
        "encoder.mid_block.attentions.0.to_q.weight",
        "decoder.mid_block.attentions.0.to_out.0.bias",
        "decoder.up_blocks.0.resnets.0.conv1.weight",
        "quant_conv.weight",
    ):
        assert fix_checkpoint_key(key) == key
    assert fix_checkpoint_key("decoder.mid_block.attentions.0.proj_attn.bias") == (
        "decoder.mid_block.attentions.0.to_out.0.bias"
    )
    # Convs that happen to be 1×1 elsewhere are not squeezed.
    shortcut = np.zeros((4, 4, 1, 1), np.float32)
    assert fix_checkpoint_tensor("post_quant_conv.weight", shortcut).shape == (4, 4, 1, 1)


# ------------------------------------------------------------------------- config


def test_config_from_json_reads_diffusers_config_with_defaults():
    cfg = VAEConfig.from_json(
        {
            "_class_name": "AutoencoderKL",
            "_diffusers_version": "0.8.0",
            "block_out_channels": [128, 256, 512, 512],
            "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4,
            "layers_per_block": 2,
            "sample_size": 768,
            "shift_factor": None,
            "latents_mean": None,
        }
    )
    assert cfg.block_out_channels == (128, 256, 512, 512)
    assert cfg.down_block_types == ("DownEncoderBlock2D",) * 4
    assert cfg.scale_factor == 8
    assert cfg.shift_factor == 0.0
    assert (cfg.latent_channels, cfg.norm_num_groups, cfg.act_fn) == (4, 32, "silu")
    assert cfg.scaling_factor == 0.18215 and cfg.force_upcast
    assert cfg.use_quant_conv and cfg.use_post_quant_conv and cfg.mid_block_add_attention
    hash(cfg)  # usable as a (static) module field


@pytest.mark.parametrize(
    "bad",
    [
        {"down_block_types": ["AttnDownEncoderBlock2D"], "up_block_types": ["UpDecoderBlock2D"]},
        {"down_block_types": ["DownEncoderBlock2D"], "up_block_types": ["AttnUpDecoderBlock2D"]},
    ],
)
def test_unsupported_block_types_raise_naming_them(bad):
    name = next(t for t in bad["down_block_types"] + bad["up_block_types"] if t.startswith("Attn"))
    with pytest.raises(ValueError, match=name):
        VAEConfig.from_json(bad)


def test_latent_scaling_helpers_invert_each_other():
    cfg = VAEConfig(scaling_factor=0.3611, shift_factor=0.1159)
    z = np.linspace(-3, 3, 12, dtype=np.float32)
    np.testing.assert_allclose(np.asarray(scale_latents(z, cfg)), (z - 0.1159) * 0.3611, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(unscale_latents(scale_latents(z, cfg), cfg)), z, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------- encode_image


@pytest.mark.parametrize("name", ["two_blocks", "x4_upscaler"])
def test_encode_image_samples_the_posterior_like_diffusers_with_the_same_noise(name):
    """img2img/inpaint: scaling_factor · vae.encode(x).latent_dist.sample(generator) = scaled (mean + std · noise)."""
    cfg, params = flax_model(name)
    x = random_images()
    with torch.no_grad():
        dist = reference(name).encode(to_nchw(x)).latent_dist
        generator = torch.Generator().manual_seed(0)
        expected = to_nhwc(dist.sample(generator) * reference(name).config.scaling_factor)
    noise = to_nhwc(torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(0)))  # the draw sample() made
    actual = encode_image(AutoencoderKL(cfg), params, jnp.asarray(x), jnp.asarray(noise))
    assert actual.shape == (2, IMAGE_SIZE // cfg.scale_factor, IMAGE_SIZE // cfg.scale_factor, 4)
    assert_rel_close(actual, expected)


def test_encode_image_without_noise_is_the_scaled_mean():
    """diffusers' retrieve_latents(..., sample_mode="argmax") = latent_dist.mode() = the mean."""
    cfg, params = flax_model("two_blocks")
    x = random_images()
    with torch.no_grad():
        expected = to_nhwc(reference("two_blocks").encode(to_nchw(x)).latent_dist.mode() * cfg.scaling_factor)
    assert_rel_close(encode_image(AutoencoderKL(cfg), params, jnp.asarray(x)), expected)


def test_x4_upscaler_vae_decodes_its_scaled_latents_like_the_upscale_pipeline():
    """StableDiffusionUpscalePipeline: vae.decode(latents / scaling_factor) with scaling_factor 0.08333,
    4× the latent size."""
    cfg, params = flax_model("x4_upscaler")
    assert cfg.scale_factor == 4 and cfg.scaling_factor == 0.08333
    latents = random_latents(cfg) * cfg.scaling_factor  # what the UNet hands over
    with torch.no_grad():
        expected = to_nhwc(reference("x4_upscaler").decode(to_nchw(latents) / 0.08333).sample)
    actual = decode(params, cfg, np.asarray(unscale_latents(latents, cfg)))
    assert actual.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert_rel_close(actual, expected)
