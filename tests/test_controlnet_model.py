"""The Flax ControlNet matches diffusers' ControlNetModel (PyTorch, fp32) when loaded from its state dict.

Reference models are tiny with every weight re-drawn, the zero convs included, so no residual is
trivially zero. diffusers takes one conditioning_scale per call; ours takes one per batch row, so
the reference runs each row on its own with that row's scale.
"""

from __future__ import annotations

import functools
import json
import re

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import assert_rel_close
from safetensors.numpy import load_file, save_file

from sdmesh.services.checkpoints import checkpoint
from sdmesh.services.checkpoints.weights import CheckpointError, convert
from sdmesh.services.dev import reference
from sdmesh.services.engine.stages import load_params
from sdmesh.services.models.controlnet import (
    ControlNetConfig,
    ControlNetModel,
    check_matches_unet,
    fix_checkpoint_key,
    init_shapes,
)
from sdmesh.services.models.unet import UNetConfig

SD2_LIKE = dict(  # per-block head counts, linear projections, upcast attention
    block_out_channels=(32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    layers_per_block=1,
    attention_head_dim=(2, 4, 4),
    use_linear_projection=True,
    upcast_attention=True,
    cross_attention_dim=32,
    norm_num_groups=8,
    conditioning_embedding_out_channels=(8, 16),  # image 2× the latents
)
SD1_LIKE = dict(  # one head count for every block, 1×1-conv projections
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    layers_per_block=2,
    attention_head_dim=4,
    cross_attention_dim=24,
    norm_num_groups=8,
    conditioning_embedding_out_channels=(8, 16, 32),  # image 4× the latents
)
CASES = {
    "sd2": SD2_LIKE,
    "sd1": SD1_LIKE,
    "global_pool": dict(SD1_LIKE, global_pool_conditions=True),  # shuffle-style: residuals averaged over the grid
    "bgr": dict(SD2_LIKE, controlnet_conditioning_channel_order="bgr"),
    # Less common options, all at once: a mid block without attention, scale-shift resnets,
    # explicit head counts, deeper transformers, the other timestep convention, one-channel hints.
    "options": dict(
        SD1_LIKE,
        mid_block_type="UNetMidBlock2D",
        resnet_time_scale_shift="scale_shift",
        only_cross_attention=(True, False),
        attention_head_dim=8,
        num_attention_heads=(2, 4),
        transformer_layers_per_block=(2, 1),
        flip_sin_to_cos=False,
        freq_shift=1,
        downsample_padding=0,
        mid_block_scale_factor=1.5,
        norm_eps=1e-6,
        conditioning_channels=1,
    ),
}
LATENT = 8
TOKENS = 7
SCALES = np.array([1.0, 0.45, 0.0], np.float32)  # one row per request; the last one has its ControlNet off
TIMESTEPS = np.array([10, 500, 981])


def to_nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def randomize_(model: torch.nn.Module) -> None:
    """Re-draw every parameter: norm scales near 1, biases small, weights ~ 1/sqrt(fan_in)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / np.sqrt(p[0].numel()))


@functools.cache
def torch_model(name: str) -> diffusers.ControlNetModel:
    torch.manual_seed(0)
    model = diffusers.ControlNetModel(**CASES[name]).eval()
    randomize_(model)
    return model


@functools.cache
def inputs(name: str) -> dict[str, np.ndarray]:
    config = ControlNetConfig.from_json(CASES[name])
    rng = np.random.default_rng(0)
    size = LATENT * config.conditioning_downscale
    batch = len(SCALES)
    return {
        "sample": rng.standard_normal((batch, LATENT, LATENT, config.in_channels), dtype=np.float32),
        "context": rng.standard_normal((batch, TOKENS, config.cross_attention_dim), dtype=np.float32),
        "image": rng.random((batch, size, size, config.conditioning_channels), dtype=np.float32),
    }


def run_torch(model: diffusers.ControlNetModel, x: dict, scales, guess_mode: bool) -> list[np.ndarray]:
    """[down residuals..., mid residual], each (B, h, w, c): every row run alone with its own scale."""
    rows = []
    for i, scale in enumerate(scales):
        with torch.no_grad():
            down, mid = model(
                torch.from_numpy(x["sample"][i : i + 1].transpose(0, 3, 1, 2).copy()),
                torch.tensor([TIMESTEPS[i]]),
                torch.from_numpy(x["context"][i : i + 1]),
                torch.from_numpy(x["image"][i : i + 1].transpose(0, 3, 1, 2).copy()),
                conditioning_scale=float(scale),
                guess_mode=guess_mode,
                return_dict=False,
            )
        rows.append([to_nhwc(r) for r in (*down, mid)])
    return [np.concatenate(parts) for parts in zip(*rows, strict=True)]


def run_flax(config: ControlNetConfig, params, x: dict, scales, guess_mode: bool) -> list[np.ndarray]:
    model = ControlNetModel(config)
    apply = jax.jit(functools.partial(model.apply, guess_mode=guess_mode))
    down, mid = apply({"params": params}, x["sample"], TIMESTEPS, x["context"], x["image"], jnp.asarray(scales))
    return [np.asarray(r) for r in (*down, mid)]


def state_dict_pairs(model: torch.nn.Module) -> list[tuple[str, np.ndarray]]:
    pairs = ((fix_checkpoint_key(k), v.detach().numpy()) for k, v in model.state_dict().items())
    return [(k, v) for k, v in pairs if k is not None]


@functools.cache
def outputs(name: str, guess_mode: bool) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(ours, diffusers') residuals for one case."""
    model = torch_model(name)
    config = ControlNetConfig.from_json(dict(model.config))
    params = convert(state_dict_pairs(model), init_shapes(config))
    x = inputs(name)
    return run_flax(config, params, x, SCALES, guess_mode), run_torch(model, x, SCALES, guess_mode)


PARITY = [("sd2", False), ("sd2", True), ("sd1", False), ("global_pool", True), ("bgr", False), ("options", False)]


@pytest.mark.parametrize(("name", "guess_mode"), PARITY)
def test_every_residual_matches_diffusers_with_a_scale_per_row(name, guess_mode):
    ours, theirs = outputs(name, guess_mode)
    assert len(ours) == len(theirs) == ControlNetConfig.from_json(CASES[name]).num_down_residuals + 1
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert a.shape == b.shape, f"residual {i}"
        assert np.abs(b[0]).max() > 1e-2, f"residual {i} of the reference is ~0: the test would prove nothing"
        assert_rel_close(a, b)  # fp32 on both sides: relative L2 ≤ 1e-4


@pytest.mark.parametrize(("name", "guess_mode"), [("sd2", False), ("sd2", True)])
def test_a_row_with_scale_zero_gets_exactly_zero_residuals(name, guess_mode):
    ours, _ = outputs(name, guess_mode)
    assert all(np.all(r[SCALES == 0] == 0) for r in ours)


def test_global_pool_residuals_are_one_value_per_channel():
    ours, _ = outputs("global_pool", True)
    assert all(r.shape[1:3] == (1, 1) for r in ours)


def test_guess_mode_ramps_the_scales_from_a_tenth_at_the_first_skip_to_one_at_the_mid_block():
    plain, _ = outputs("sd2", False)
    guessed, _ = outputs("sd2", True)
    ramp = np.logspace(-1, 0, len(plain))
    for a, b, s in zip(guessed, plain, ramp, strict=True):
        np.testing.assert_allclose(a, b * s, rtol=1e-5, atol=1e-6)


def test_guess_mode_per_row_gives_each_row_what_guess_mode_per_call_gives_it():
    plain, _ = outputs("sd2", False)
    guessed, _ = outputs("sd2", True)
    model = torch_model("sd2")
    config = ControlNetConfig.from_json(dict(model.config))
    params = convert(state_dict_pairs(model), init_shapes(config))
    x = inputs("sd2")
    rows = np.array([1.0, 0.0, 1.0], np.float32)  # a batch mixing requests with and without guess mode
    down, mid = ControlNetModel(config).apply(
        {"params": params}, x["sample"], TIMESTEPS, x["context"], x["image"], SCALES, rows
    )
    for ours, p, g in zip((*down, mid), plain, guessed, strict=True):
        expected = np.where(rows[:, None, None, None] > 0, g, p)
        np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-5, atol=1e-5)


def test_a_conditioning_image_of_the_wrong_size_is_refused_naming_the_size_it_needs():
    config = ControlNetConfig.from_json(SD2_LIKE)
    shapes = init_shapes(config)
    x = inputs("sd2")
    with pytest.raises(ValueError, match="need a 16×16 image"):
        jax.eval_shape(
            lambda p: ControlNetModel(config).apply(
                {"params": p}, x["sample"], 1, x["context"], x["image"][:, :8], 1.0
            ),
            shapes,
        )


# --- a saved diffusers folder, through load_params


@pytest.fixture(scope="module")
def saved_controlnet(tmp_path_factory):
    return reference.make_tiny_controlnet(tmp_path_factory.mktemp("controlnet"), reference.TINY["sd2"]["unet"])


def load(folder, files=None):
    config = ControlNetConfig.from_json(json.loads((folder / "config.json").read_text()))
    files = files or checkpoint.weight_files(folder, "diffusion_pytorch_model")
    params = load_params(files, init_shapes(config), dtype=jnp.float32, fix_key=fix_checkpoint_key, source=str(folder))
    return config, params


def test_a_saved_diffusers_controlnet_loads_and_matches(saved_controlnet):
    config, params = load(saved_controlnet)
    model = diffusers.ControlNetModel.from_pretrained(saved_controlnet).eval()
    x = inputs("sd2")  # the tiny SD 2 UNet's shapes: 4 channels, cross_attention_dim 32, a 2× image
    ours = run_flax(config, params, x, SCALES, False)
    theirs = run_torch(model, x, SCALES, False)
    for a, b in zip(ours, theirs, strict=True):
        assert np.abs(b[0]).max() > 1e-3
        assert_rel_close(a, b)


def rewrite(folder, tmp_path, change) -> list:
    tensors = load_file(folder / "diffusion_pytorch_model.safetensors")
    change(tensors)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file(tensors, path)
    return [path]


def test_a_missing_tensor_is_refused_naming_it(saved_controlnet, tmp_path):
    files = rewrite(saved_controlnet, tmp_path, lambda t: t.pop("controlnet_down_blocks.2.bias"))
    with pytest.raises(CheckpointError, match=re.escape("controlnet_down_blocks_2/bias")):
        load(saved_controlnet, files)


def test_an_extra_tensor_is_refused_naming_it(saved_controlnet, tmp_path):
    def add(t):
        t["controlnet_down_blocks.99.weight"] = t["controlnet_down_blocks.0.weight"]

    files = rewrite(saved_controlnet, tmp_path, add)
    with pytest.raises(CheckpointError, match=re.escape("'controlnet_down_blocks.99.weight'")):
        load(saved_controlnet, files)


def test_a_tensor_of_the_wrong_shape_is_refused_naming_it(saved_controlnet, tmp_path):
    def widen(t):
        t["controlnet_cond_embedding.conv_out.weight"] = np.zeros((32, 17, 3, 3), np.float32)

    files = rewrite(saved_controlnet, tmp_path, widen)
    with pytest.raises(CheckpointError, match=re.escape("'controlnet_cond_embedding.conv_out.weight'")):
        load(saved_controlnet, files)


# --- real configs

# lllyasviel/control_v11p_sd15_canny's config.json
CONTROL_V11_SD15 = {
    "_class_name": "ControlNetModel",
    "_diffusers_version": "0.16.0.dev0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "class_embed_type": None,
    "conditioning_embedding_out_channels": [16, 32, 96, 256],
    "controlnet_conditioning_channel_order": "rgb",
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "global_pool_conditions": False,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "projection_class_embeddings_input_dim": None,
    "resnet_time_scale_shift": "default",
    "upcast_attention": False,
    "use_linear_projection": False,
}
SD15_UNET = UNetConfig(cross_attention_dim=768, attention_head_dim=8)
SD21_UNET = UNetConfig(
    cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True, upcast_attention=True
)


def test_the_control_v11_config_reads_as_diffusers_reads_it():
    config = ControlNetConfig.from_json(CONTROL_V11_SD15)
    assert config.conditioning_embedding_out_channels == (16, 32, 96, 256)
    assert config.conditioning_downscale == 8  # the image at the output resolution, as SD's VAE shrinks it
    assert config.num_down_residuals == 12  # as many as the UNet's skips
    assert config.unet_config.heads_per_block == (8, 8, 8, 8)
    assert hash(config) == hash(ControlNetConfig.from_json(CONTROL_V11_SD15))


def test_full_size_sd15_controlnet_matches_diffusers_names_and_shapes():
    kwargs = {k: v for k, v in CONTROL_V11_SD15.items() if not k.startswith("_")}
    with torch.device("meta"):
        model = diffusers.ControlNetModel(**kwargs)
    shapes = init_shapes(ControlNetConfig.from_json(CONTROL_V11_SD15))
    num_params = sum(p.numel() for p in model.parameters())
    assert sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes)) == num_params
    zero = np.zeros((), np.float32)
    convert(((k, np.broadcast_to(zero, tuple(v.shape))) for k, v in model.state_dict().items()), shapes)


def test_a_controlnet_for_its_own_base_model_is_accepted():
    check_matches_unet(ControlNetConfig.from_json(CONTROL_V11_SD15), SD15_UNET, "control_v11p_sd15_canny")


def test_an_sd1_controlnet_for_an_sd2_unet_is_refused_naming_both_cross_attention_dims():
    with pytest.raises(CheckpointError, match=r"cross_attention_dim is 768 but the UNet's is 1024"):
        check_matches_unet(ControlNetConfig.from_json(CONTROL_V11_SD15), SD21_UNET, "control_v11p_sd15_canny")


def test_a_controlnet_with_other_widths_is_refused_naming_both():
    unet = UNetConfig(cross_attention_dim=768, attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280 * 2))
    with pytest.raises(
        CheckpointError, match=re.escape("(320, 640, 1280, 1280) but the UNet's is (320, 640, 1280, 2560)")
    ):
        check_matches_unet(ControlNetConfig.from_json(CONTROL_V11_SD15), unet, "cn")


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("class_embed_type", "timestep"),
        ("num_class_embeds", 1000),
        ("addition_embed_type", "text_time"),
        ("projection_class_embeddings_input_dim", 2816),
        ("encoder_hid_dim", 64),
        ("controlnet_conditioning_channel_order", "rbg"),
        ("mid_block_type", None),
        ("layers_per_block", [2, 2, 2, 2]),
        ("conditioning_embedding_out_channels", None),
        ("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["SimpleCrossAttnDownBlock2D"]),
        ("resnet_time_scale_shift", "spatial"),
    ],
)
def test_unsupported_options_are_refused_naming_the_option(option, value):
    with pytest.raises(CheckpointError, match=option):
        ControlNetConfig.from_json(dict(CONTROL_V11_SD15, **{option: value}))
