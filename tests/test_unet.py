"""The Flax UNet matches diffusers' UNet2DConditionModel (PyTorch) when loaded from its state dict.

Reference models are tiny and randomly initialised (every weight re-drawn, so no
zero-initialised layer such as conv_out or proj_out hides a bug); the Flax side is
built only from the reference's config and state dict, the way a real checkpoint
is loaded.
"""

from __future__ import annotations

import functools
import re

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import assert_rel_close, rel_error

from sdmesh.services.checkpoints.weights import CheckpointError, convert
from sdmesh.services.models.unet import UNet2DConditionModel, UNetConfig, fix_checkpoint_key, init_shapes

SD_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
SD_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
TINY = dict(block_out_channels=(32, 64, 64), down_block_types=SD_DOWN, up_block_types=SD_UP, norm_num_groups=8)
TWO_LEVELS = dict(
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=8,
    layers_per_block=1,
    attention_head_dim=4,
    cross_attention_dim=32,
)

# name → (diffusers.UNet2DConditionModel kwargs, latent size, timesteps for a batch of 2)
CASES = {
    # SD 1.x: 8 heads everywhere, 1×1-conv projections, no upcast.
    "sd1": (
        dict(TINY, layers_per_block=1, attention_head_dim=8, cross_attention_dim=32),
        16,
        np.array([10, 500]),
    ),
    # SD 2.x: per-block head counts, linear projections, upcast attention; uneven
    # layers and transformer depths; 18×18 is not divisible by the ×4 of the
    # upsamplers, so upsampling must target the skip sizes (9 → 5 → 9 → 18).
    "sd2": (
        dict(
            TINY,
            layers_per_block=(1, 2, 1),
            transformer_layers_per_block=(1, 2, 1),
            attention_head_dim=(2, 4, 4),
            use_linear_projection=True,
            upcast_attention=True,
            flip_sin_to_cos=True,
            freq_shift=0,
            cross_attention_dim=24,
        ),
        18,
        981,
    ),
    # Inpainting: 9 input channels (latents + mask + masked latents), 4 out; two
    # blocks; the other timestep-embedding convention; right/bottom-padded downsampling.
    "inpaint": (
        dict(
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            norm_num_groups=8,
            layers_per_block=2,
            in_channels=9,
            out_channels=4,
            attention_head_dim=4,
            cross_attention_dim=16,
            flip_sin_to_cos=False,
            freq_shift=1,
            downsample_padding=0,
        ),
        16,
        np.float32(250.5),
    ),
    # Less common options, all at once.
    "options": (
        dict(
            TINY,
            layers_per_block=1,
            attention_head_dim=(2, 2, 4),
            cross_attention_dim=32,
            only_cross_attention=(True, False, False),
            resnet_time_scale_shift="scale_shift",
            mid_block_scale_factor=1.5,
            center_input_sample=True,
            time_embedding_dim=96,
            timestep_post_act="silu",
            time_embedding_act_fn="silu",
            time_cond_proj_dim=8,
            conv_in_kernel=1,
            conv_out_kernel=5,
            norm_eps=1e-6,
        ),
        16,
        np.array([3.5, 999.0]),
    ),
    # No mid block at all.
    "no_mid": (
        dict(TINY, layers_per_block=1, attention_head_dim=4, cross_attention_dim=32, mid_block_type=None),
        16,
        np.array([0, 1]),
    ),
    # stabilityai/stable-diffusion-x4-upscaler's unet/config.json at toy widths: 7 input channels
    # (latents + noised low-res RGB), a learned noise-level table (class_labels), attention only
    # in the last three levels, self-attention replaced by cross-attention (only_cross_attention)
    # in all but the innermost, 8 heads everywhere, linear projections.
    "upscale": (
        dict(
            block_out_channels=(32, 32, 64, 64),
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
            up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",),
            norm_num_groups=8,
            layers_per_block=2,
            in_channels=7,
            out_channels=4,
            attention_head_dim=8,
            cross_attention_dim=32,
            num_class_embeds=1000,
            only_cross_attention=(True, True, True, False),
            use_linear_projection=True,
        ),
        16,
        np.array([1, 981]),
    ),
    # SD 2 depth: 5 input channels (latents + normalised depth), otherwise SD 2-shaped.
    "depth": (
        dict(
            TINY,
            layers_per_block=1,
            in_channels=5,
            out_channels=4,
            attention_head_dim=(2, 4, 4),
            use_linear_projection=True,
            cross_attention_dim=32,
        ),
        16,
        np.array([500, 20]),
    ),
    # The other class-embedding types (cheap to carry; no SD 2 checkpoint uses them), on two levels.
    "class_timestep": (
        dict(TWO_LEVELS, class_embed_type="timestep"),
        8,
        np.array([10, 700]),
    ),
    "class_projection_concat": (
        dict(
            TWO_LEVELS,
            class_embed_type="projection",
            projection_class_embeddings_input_dim=12,
            class_embeddings_concat=True,
            time_embedding_act_fn="silu",
        ),
        8,
        np.array([10, 700]),
    ),
    "class_identity": (
        dict(TWO_LEVELS, class_embed_type="identity"),
        8,
        np.array([10, 700]),
    ),
    "class_simple_projection": (
        dict(TWO_LEVELS, class_embed_type="simple_projection", projection_class_embeddings_input_dim=6),
        8,
        np.array([10, 700]),
    ),
}
BATCH = 2
TEXT_TOKENS = 7


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
def reference(name: str) -> diffusers.UNet2DConditionModel:
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**CASES[name][0]).eval()
    randomize_(unet)
    return unet


def state_dict_pairs(unet: torch.nn.Module) -> list[tuple[str, np.ndarray]]:
    pairs = ((fix_checkpoint_key(k), v.detach().numpy()) for k, v in unet.state_dict().items())
    return [(k, v) for k, v in pairs if k is not None]


@functools.cache
def inputs(name: str) -> dict[str, np.ndarray]:
    kwargs, size, _ = CASES[name]
    rng = np.random.default_rng(0)
    out = {
        "sample": rng.standard_normal((BATCH, kwargs.get("in_channels", 4), size, size), dtype=np.float32),
        "context": rng.standard_normal((BATCH, TEXT_TOKENS, kwargs["cross_attention_dim"]), dtype=np.float32),
    }
    if kwargs.get("time_cond_proj_dim"):
        out["timestep_cond"] = rng.standard_normal((BATCH, kwargs["time_cond_proj_dim"]), dtype=np.float32)
    shape = UNetConfig.from_json(kwargs).class_labels_shape
    if kwargs.get("num_class_embeds") and kwargs.get("class_embed_type") is None:
        out["class_labels"] = np.array([20, 350], np.int64)  # the upscaler's noise levels: an index into the table
    elif shape == ():
        out["class_labels"] = np.array([3.0, 640.5], np.float32)
    elif shape is not None:
        out["class_labels"] = rng.standard_normal((BATCH, *shape), dtype=np.float32)
    return out


@functools.cache
def reference_output(name: str) -> np.ndarray:
    x = inputs(name)
    t = CASES[name][2]
    t_ref = t if isinstance(t, int) else torch.from_numpy(np.asarray(t))  # python int, 0-d or (B,) tensor
    cond = torch.from_numpy(x["timestep_cond"]) if "timestep_cond" in x else None
    labels = torch.from_numpy(x["class_labels"]) if "class_labels" in x else None
    with torch.no_grad():
        out = reference(name)(
            torch.from_numpy(x["sample"]),
            t_ref,
            torch.from_numpy(x["context"]),
            timestep_cond=cond,
            class_labels=labels,
        )
    return to_nhwc(out.sample)


def run_flax(name: str, *, dtype=jnp.float32, param_dtype=None) -> np.ndarray:
    unet = reference(name)
    config = UNetConfig.from_json(dict(unet.config))
    params = convert(state_dict_pairs(unet), init_shapes(config), dtype=param_dtype)
    model = UNet2DConditionModel(config, dtype=dtype)
    x = inputs(name)
    cond = jnp.asarray(x["timestep_cond"]) if "timestep_cond" in x else None
    labels = jnp.asarray(x["class_labels"]) if "class_labels" in x else None
    apply = jax.jit(lambda p, s, t, c, tc, cl: model.apply({"params": p}, s, t, c, tc, cl))
    out = apply(params, x["sample"].transpose(0, 2, 3, 1), jnp.asarray(CASES[name][2]), x["context"], cond, labels)
    return np.asarray(out.astype(jnp.float32))


@pytest.mark.parametrize("name", list(CASES))
def test_matches_diffusers(name):
    assert_rel_close(run_flax(name), reference_output(name))


def random_residuals(config: UNetConfig, size: int, rng) -> tuple[list[np.ndarray], np.ndarray]:
    """Residuals shaped as the UNet's skips (conv_in's, each resnet's, each downsampler's) and its mid block."""
    shapes = [(size, config.block_out_channels[0])]
    for i, channels in enumerate(config.block_out_channels):
        shapes += [(size, channels)] * config.layers_per_block_list[i]
        if i < config.num_blocks - 1:
            size = (size + 1) // 2  # a stride-2 3×3 conv with padding 1
            shapes.append((size, channels))
    down = [rng.standard_normal((BATCH, s, s, c), dtype=np.float32) for s, c in shapes]
    return down, rng.standard_normal((BATCH, size, size, config.block_out_channels[-1]), dtype=np.float32)


@pytest.mark.parametrize("name", ["sd2", "no_mid"])
def test_control_residuals_are_added_to_the_skips_and_the_mid_block_as_in_diffusers(name):
    unet = reference(name)
    config = UNetConfig.from_json(dict(unet.config))
    params = convert(state_dict_pairs(unet), init_shapes(config))
    model = UNet2DConditionModel(config)
    x = inputs(name)
    sample = x["sample"].transpose(0, 2, 3, 1)
    down, mid = random_residuals(config, x["sample"].shape[2], np.random.default_rng(1))
    t = jnp.asarray(CASES[name][2])
    ours = model.apply({"params": params}, sample, t, x["context"], down_residuals=down, mid_residual=mid)
    nchw = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        theirs = unet(
            torch.from_numpy(x["sample"]),
            torch.from_numpy(np.asarray(CASES[name][2])),
            torch.from_numpy(x["context"]),
            down_block_additional_residuals=[nchw(d) for d in down],
            mid_block_additional_residual=nchw(mid),
        ).sample
    assert_rel_close(np.asarray(ours), to_nhwc(theirs))
    assert rel_error(np.asarray(ours), run_flax(name)) > 1e-2  # the residuals changed the output


def test_bfloat16_activations_stay_close():
    out = run_flax("sd1", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert np.isfinite(out).all()
    assert rel_error(out, reference_output("sd1")) < 5e-2


def test_num_attention_heads_overrides_attention_head_dim():
    """`num_attention_heads`, when set, is the head count; `attention_head_dim` is then ignored.
    diffusers refuses the option, so the reference spells the same heads the old way."""
    unet = reference("sd2")
    config = UNetConfig.from_json(dict(unet.config, num_attention_heads=[2, 4, 4], attention_head_dim=[64, 64, 64]))
    assert config.heads_per_block == (2, 4, 4)
    params = convert(state_dict_pairs(unet), init_shapes(config))
    x = inputs("sd2")
    out = UNet2DConditionModel(config).apply({"params": params}, x["sample"].transpose(0, 2, 3, 1), 981, x["context"])
    assert_rel_close(out, reference_output("sd2"))


def test_wrong_shape_tensor_is_named():
    unet = reference("sd1")
    config = UNetConfig.from_json(dict(unet.config))
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    pairs = [(k, np.zeros((v.shape[0], v.shape[1] + 1), v.dtype) if k == key else v) for k, v in state_dict_pairs(unet)]
    with pytest.raises(CheckpointError, match=re.escape(key)):
        convert(pairs, init_shapes(config))


def test_weights_of_another_config_are_rejected():
    """SD 2.x weights (linear proj_in) do not load under an SD 1.x-style config (1×1 conv proj_in)."""
    unet = reference("sd2")
    config = UNetConfig.from_json(dict(unet.config, use_linear_projection=False))
    with pytest.raises(CheckpointError, match="proj_in"):
        convert(state_dict_pairs(unet), init_shapes(config))


# Real configs: names and shapes must line up with diffusers at full size too.
# Checked on a meta-device model (no memory) against zero-stride numpy stand-ins.
SD15_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD21_CONFIG = dict(
    SD15_CONFIG,
    _diffusers_version="0.10.0.dev0",
    attention_head_dim=[5, 10, 20, 20],
    cross_attention_dim=1024,
    dual_cross_attention=False,
    num_class_embeds=None,
    only_cross_attention=False,
    sample_size=96,
    upcast_attention=True,
    use_linear_projection=True,
)


def test_config_from_json():
    config = UNetConfig.from_json(SD21_CONFIG)
    assert config.attention_head_dim == (5, 10, 20, 20)  # lists become tuples
    assert config.down_block_types[-1] == "DownBlock2D"
    assert config.heads_per_block == (5, 10, 20, 20)
    assert config.time_embed_dim == 1280
    assert config.transformer_layers_per_block == 1  # diffusers' default
    assert hash(config) == hash(UNetConfig.from_json(SD21_CONFIG))


@pytest.mark.parametrize(("config", "num_params"), [(SD15_CONFIG, 859_520_964), (SD21_CONFIG, 865_910_724)])
def test_full_size_configs_match_diffusers_names_and_shapes(config, num_params):
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**kwargs)
    shapes = init_shapes(UNetConfig.from_json(config))
    assert sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes)) == num_params
    zero = np.zeros((), np.float32)
    convert(((k, np.broadcast_to(zero, tuple(v.shape))) for k, v in unet.state_dict().items()), shapes)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("down_block_types", ["AttnDownBlock2D", "DownBlock2D"]),
        ("up_block_types", ["UpBlock2D", "SimpleCrossAttnUpBlock2D"]),
        ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
        ("class_embed_type", "learned"),
        ("class_embed_type", "projection"),  # without projection_class_embeddings_input_dim
        ("addition_embed_type", "text_time"),
        ("encoder_hid_dim", 64),
        ("dual_cross_attention", True),
        ("time_embedding_type", "fourier"),
        ("resnet_time_scale_shift", "ada_group"),
        ("attention_type", "gated"),
        ("act_fn", "tanh"),
    ],
)
def test_unsupported_options_raise_naming_the_option(option, value):
    base = dict(
        block_out_channels=[32, 64],
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    )
    with pytest.raises(ValueError, match=option):
        UNetConfig.from_json(dict(base, **{option: value}))


# stabilityai/stable-diffusion-x4-upscaler's unet/config.json (diffusers 0.8.0 era keys).
X4_UPSCALER_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.8.0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [256, 512, 512, 1024],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 7,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": 1000,
    "only_cross_attention": [True, True, True, False],
    "out_channels": 4,
    "sample_size": 128,
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}


def test_x4_upscaler_config_matches_diffusers_names_and_shapes():
    kwargs = {k: v for k, v in X4_UPSCALER_CONFIG.items() if not k.startswith("_")}
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**kwargs)
    config = UNetConfig.from_json(X4_UPSCALER_CONFIG)
    assert config.class_labels_shape == ()  # one integer noise level per sample
    shapes = init_shapes(config)
    assert shapes["class_embedding"]["embedding"].shape == (1000, 1024)
    assert sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes)) == sum(
        p.numel() for p in unet.parameters()
    )
    zero = np.zeros((), np.float32)
    convert(((k, np.broadcast_to(zero, tuple(v.shape))) for k, v in unet.state_dict().items()), shapes)


def test_class_labels_are_required_where_the_config_has_a_class_embedding_and_refused_elsewhere():
    unet = reference("upscale")
    config = UNetConfig.from_json(dict(unet.config))
    params = convert(state_dict_pairs(unet), init_shapes(config))
    x = inputs("upscale")
    sample = x["sample"].transpose(0, 2, 3, 1)
    with pytest.raises(ValueError, match="class_labels must be given"):
        UNet2DConditionModel(config).apply({"params": params}, sample, 1, x["context"])
    # the noise level is an input that matters: another level, another output
    apply = jax.jit(
        lambda labels: UNet2DConditionModel(config).apply(
            {"params": params}, sample, 1, x["context"], class_labels=labels
        )
    )
    a, b = apply(np.array([20, 20])), apply(np.array([20, 21]))
    assert np.array_equal(a[0], b[0]) and not np.allclose(a[1], b[1])

    sd2 = reference("sd2")
    sd2_config = UNetConfig.from_json(dict(sd2.config))
    sd2_params = convert(state_dict_pairs(sd2), init_shapes(sd2_config))
    x2 = inputs("sd2")
    with pytest.raises(ValueError, match="no class embedding"):
        UNet2DConditionModel(sd2_config).apply(
            {"params": sd2_params}, x2["sample"].transpose(0, 2, 3, 1), 1, x2["context"], class_labels=np.array([1, 2])
        )
