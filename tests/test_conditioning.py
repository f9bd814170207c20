"""The work around the loop equals what diffusers' image-conditioned pipelines do before and inside theirs.

Two levels: each function against the diffusers/torch lines it mirrors, on small arrays; then
each pipeline end to end up to its first UNet call (a forward hook records what the UNet got),
rebuilt from our functions with the same noise the pipeline's generator drew, in the same order.
"""

from __future__ import annotations

import functools
import json
import types
from pathlib import Path

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_rel_close, rel_error
from PIL import Image

from sdmesh.services.checkpoints.weights import convert
from sdmesh.services.dev import reference
from sdmesh.services.inputs import conditioning as cond
from sdmesh.services.inputs import contract, images
from sdmesh.services.inputs.errors import InvalidRequest
from sdmesh.services.models import vae as va
from sdmesh.services.samplers import ddim

RNG = np.random.default_rng(0)
SD2_SCHEDULER = reference.TINY["sd2"]["scheduler"]


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def nchw(a) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


# ----------------------------------------------------------------- img2img / add_noise


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_img2img_start_matches_get_timesteps(spacing):
    """The first step index and step count equal get_timesteps', and the timesteps it runs are the
    tail of our full schedule, for every spacing and a grid of steps × strengths."""
    config = dict(SD2_SCHEDULER, timestep_spacing=spacing)
    scheduler = diffusers.DDIMScheduler(**config)
    ours = ddim.DDIMConfig.from_json(config)
    for steps in (1, 2, 7, 10, 50, 999):
        scheduler.set_timesteps(steps)
        for strength in (0.05, 0.29, 0.3, 0.5, 0.7, 0.75, 0.999, 1.0):
            fake = types.SimpleNamespace(scheduler=scheduler)
            expected_ts, expected_n = diffusers.StableDiffusionImg2ImgPipeline.get_timesteps(
                fake, steps, strength, "cpu"
            )
            if expected_n < 1:
                with pytest.raises(InvalidRequest, match="runs no step"):
                    cond.img2img_start(steps, strength)
                continue
            first, n = cond.img2img_start(steps, strength)
            assert n == expected_n
            np.testing.assert_array_equal(ddim.timesteps(ours, steps)[first:], expected_ts.numpy())


@pytest.mark.parametrize("strength", [-0.1, 1.5, float("nan"), "0.5"])
def test_strength_outside_0_1_is_refused(strength):
    with pytest.raises(InvalidRequest, match="strength must be a number between 0 and 1"):
        cond.img2img_start(50, strength)


@pytest.mark.parametrize("scheduler_class", [diffusers.DDIMScheduler, diffusers.DDPMScheduler])
def test_add_noise_matches_the_schedulers(scheduler_class):
    config = (
        SD2_SCHEDULER
        if scheduler_class is diffusers.DDIMScheduler
        else reference.TINY["sd2-upscale"]["low_res_scheduler"]
    )
    scheduler = scheduler_class(**config)
    x0 = RNG.standard_normal((3, 4, 5, 4)).astype(np.float32)
    noise = RNG.standard_normal(x0.shape).astype(np.float32)
    t = np.array([0, 350, 999])
    expected = nhwc(scheduler.add_noise(nchw(x0), nchw(noise), torch.from_numpy(t)))
    ac = ddim.alphas_cumprod(ddim.DDIMConfig.from_json(config))
    np.testing.assert_allclose(np.asarray(cond.add_noise(ac, x0, noise, t)), expected, rtol=1e-6, atol=1e-6)
    # one timestep for the whole batch, as the pipelines pass it
    expected = nhwc(scheduler.add_noise(nchw(x0), nchw(noise), torch.tensor([500])))
    np.testing.assert_allclose(np.asarray(cond.add_noise(ac, x0, noise, 500)), expected, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------ inpainting


@pytest.mark.parametrize(("h", "w", "factor"), [(64, 48, 8), (30, 52, 8), (24, 24, 4)])
def test_mask_latents_match_interpolate_nearest(h, w, factor):
    mask = (RNG.random((2, h, w, 1)) > 0.5).astype(np.float32)
    expected = nhwc(F.interpolate(nchw(mask), size=(h // factor, w // factor)))
    np.testing.assert_array_equal(cond.mask_latents(mask, factor), expected)


def test_masked_image_zeroes_the_area_to_repaint():
    image = RNG.uniform(-1, 1, (1, 8, 8, 3)).astype(np.float32)
    mask = (RNG.random((1, 8, 8, 1)) > 0.5).astype(np.float32)
    expected = nhwc(nchw(image) * (nchw(mask) < 0.5))
    np.testing.assert_array_equal(cond.masked_image(image, mask), expected)


def test_inpaint_unet_input_order_is_latents_mask_masked_image_latents():
    latents, mask, masked = (np.full((1, 2, 2, c), v, np.float32) for c, v in ((4, 1.0), (1, 2.0), (4, 3.0)))
    x = np.asarray(cond.inpaint_unet_input(latents, mask, masked))
    assert x.shape == (1, 2, 2, 9)
    np.testing.assert_array_equal(x[0, 0, 0], [1, 1, 1, 1, 2, 3, 3, 3, 3])


def test_blend_matches_the_inpaint_loop_lines_per_slot():
    """Slot 0 is mid-run (known area noised to the next timestep), slot 1 just took its last step (un-noised)."""
    scheduler = diffusers.DDIMScheduler(**SD2_SCHEDULER)
    ac = ddim.alphas_cumprod(ddim.DDIMConfig.from_json(SD2_SCHEDULER))
    latents, image_latents, noise = (RNG.standard_normal((2, 4, 4, 4)).astype(np.float32) for _ in range(3))
    mask = (RNG.random((2, 4, 4, 1)) > 0.5).astype(np.float32)
    next_t = np.array([481, 0])  # slot 1's is ignored
    out = np.asarray(
        cond.blend_inpaint_latents(latents, image_latents, noise, mask, ac, next_t, np.array([False, True]))
    )
    for slot, last in ((0, False), (1, True)):
        # the diffusers lines, verbatim but for the batch slicing
        init_latents_proper = nchw(image_latents[slot : slot + 1])
        if not last:
            init_latents_proper = scheduler.add_noise(
                init_latents_proper, nchw(noise[slot : slot + 1]), torch.tensor([481])
            )
        init_mask = nchw(mask[slot : slot + 1])
        expected = (1 - init_mask) * init_latents_proper + init_mask * nchw(latents[slot : slot + 1])
        np.testing.assert_allclose(out[slot : slot + 1], nhwc(expected), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- depth


@pytest.mark.parametrize(
    ("src", "dst"), [((37, 53), (8, 12)), ((8, 8), (21, 13)), ((64, 64), (64, 64)), ((5, 96), (3, 7))]
)
def test_bicubic_resize_matches_torch_interpolate(src, dst):
    x = RNG.standard_normal((2, *src)).astype(np.float32) * 100
    expected = F.interpolate(torch.from_numpy(x)[:, None], size=dst, mode="bicubic", align_corners=False)[:, 0].numpy()
    actual = cond.bicubic_resize(x, dst)
    assert actual.dtype == np.float32
    np.testing.assert_allclose(actual, expected, rtol=0, atol=2e-4)  # float32 rounding of values ~±300
    assert rel_error(actual, expected) < 1e-6


def test_jax_image_resize_is_not_torch_bicubic():
    """Why we carry our own resize: jax's "bicubic" is Keys A=−0.5 and antialiases when shrinking.
    On a 384² map (the DPT estimator's output) shrunk to 64² latents, it misses torch by several %."""
    x = RNG.standard_normal((1, 384, 384)).astype(np.float32)
    expected = F.interpolate(torch.from_numpy(x)[:, None], size=(64, 64), mode="bicubic", align_corners=False)[
        :, 0
    ].numpy()
    assert rel_error(cond.bicubic_resize(x, (64, 64)), expected) < 1e-6
    assert rel_error(np.asarray(jax.image.resize(x, (1, 64, 64), "bicubic")), expected) > 0.1


def test_depth_condition_matches_prepare_depth_map():
    depth = (RNG.random((2, 50, 70)) * 10).astype(np.float32)
    fake = types.SimpleNamespace(vae_scale_factor=8)
    image = Image.new("RGB", (64, 48))  # the image fixes the latent size: 48/8 × 64/8
    expected = diffusers.StableDiffusionDepth2ImgPipeline.prepare_depth_map(
        fake, image, torch.from_numpy(depth), 2, False, torch.float32, torch.device("cpu")
    )
    actual = cond.depth_condition(depth, (6, 8))
    assert actual.shape == (2, 6, 8, 1) and actual.min() == -1 and actual.max() == 1
    # torch resizes in float32, we in float64: a few float32 ulps of the depth range
    np.testing.assert_allclose(actual, nhwc(expected), rtol=0, atol=4e-6)


def test_flat_depth_becomes_zero_not_nan():
    assert np.array_equal(cond.depth_condition(np.full((1, 16, 16), 3.0, np.float32), (2, 2)), np.zeros((1, 2, 2, 1)))


# -------------------------------------------------------------------------- upscaler


def test_noise_level_limits():
    assert contract.check_noise_level(350, 350) == 350
    for bad in (-1, 351, 2.5, True, None):
        with pytest.raises(InvalidRequest, match="noise_level must be an integer from 0 to 350"):
            contract.check_noise_level(bad, 350)


def test_upscaler_vae_config_gets_the_pipelines_scaling_factor():
    assert cond.fix_upscaler_vae_config({"scaling_factor": 0.18215, "latent_channels": 4}) == {
        "scaling_factor": 0.08333,
        "latent_channels": 4,
    }


def test_upscale_unet_input_and_class_labels():
    latents, low_res = np.zeros((2, 3, 3, 4), np.float32), np.ones((2, 3, 3, 3), np.float32)
    x = np.asarray(cond.upscale_unet_input(latents, low_res))
    np.testing.assert_array_equal(x[0, 0, 0], [0, 0, 0, 0, 1, 1, 1])
    labels = cond.upscale_class_labels(20, 2)
    assert labels.dtype == jnp.int32 and labels.tolist() == [20, 20]


# ----------------------------------------------- whole pipelines, up to the first UNet call


@functools.cache
def checkpoint(name: str, tmp_root: str) -> str:
    return str(reference.build(Path(tmp_root) / name, reference.SPECS[name], seed=3, perturb=0.02))


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("conditioning_checkpoints"))
    return lambda name: checkpoint(name, root)


def flax_vae(pipe) -> tuple[va.AutoencoderKL, dict]:
    config = va.VAEConfig.from_json(dict(pipe.vae.config))
    pairs = [(k, v.detach().numpy()) for k, v in pipe.vae.state_dict().items()]
    return va.AutoencoderKL(config), convert(pairs, va.init_shapes(config))


def record_unet_calls(pipe) -> list[dict]:
    """Every UNet call's sample (NHWC), timestep, class_labels and output, in order."""
    calls: list[dict] = []

    def hook(module, args, kwargs, output):
        sample = args[0] if args else kwargs["sample"]
        labels = kwargs.get("class_labels")
        calls.append(
            dict(
                sample=nhwc(sample),
                t=int(args[1] if len(args) > 1 else kwargs["timestep"]),
                class_labels=None if labels is None else labels.numpy(),
                out=output[0] if isinstance(output, tuple) else output.sample,
            )
        )

    pipe.unet.register_forward_hook(hook, with_kwargs=True)
    return calls


def draws(seed: int, *shapes: tuple[int, ...]) -> list[np.ndarray]:
    """The generator's successive standard-normal draws (NCHW shapes), as the pipeline made them, in NHWC."""
    g = torch.Generator().manual_seed(seed)
    return [nhwc(torch.randn(shape, generator=g)) for shape in shapes]


def alphas(pipe) -> np.ndarray:
    return ddim.alphas_cumprod(ddim.DDIMConfig.from_json(dict(pipe.scheduler.config)))


def test_img2img_first_unet_input_matches_the_pipeline(build):
    pipe = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(build("tiny-sd2"))
    calls = record_unet_calls(pipe)
    pixels = RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8)  # the tiny VAE's factor is 2: 8×8 latents
    steps, strength = 10, 0.55
    pipe(
        "a cat",
        image=Image.fromarray(pixels),
        strength=strength,
        num_inference_steps=steps,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(7),
        output_type="latent",
    )

    first, n = cond.img2img_start(steps, strength)
    assert (
        len(calls) == n
        and calls[0]["t"]
        == ddim.make_schedule(ddim.DDIMConfig.from_json(dict(pipe.scheduler.config)), steps).timesteps[first]
    )
    posterior, noise = draws(7, (1, 4, 8, 8), (1, 4, 8, 8))  # retrieve_latents' sample, then prepare_latents' noise
    vae, params = flax_vae(pipe)
    image_latents = va.encode_image(vae, params, jnp.asarray(images.preprocess_image(pixels)), jnp.asarray(posterior))
    x = cond.add_noise(alphas(pipe), image_latents, noise, calls[0]["t"])
    assert_rel_close(x, calls[0]["sample"])


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_inpaint_9_channel_first_unet_input_matches_the_pipeline(build, strength):
    pipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(build("tiny-sd2-inpaint"))
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)  # what sdmesh samples with
    calls = record_unet_calls(pipe)
    pixels = RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8)  # the default size: unet sample_size × VAE factor 2
    mask_pixels = np.zeros((16, 16), np.uint8)
    mask_pixels[3:10, 5:15] = 255
    steps = 4
    pipe(
        "a cat",
        image=Image.fromarray(pixels),
        mask_image=Image.fromarray(mask_pixels),
        strength=strength,
        num_inference_steps=steps,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(5),
        output_type="latent",
    )

    first, _ = cond.img2img_start(steps, strength)
    image = images.preprocess_image(pixels)
    mask = images.preprocess_mask(mask_pixels)
    vae, params = flax_vae(pipe)
    if strength == 1.0:  # pure noise, then the masked image's posterior draw
        noise, masked_posterior = draws(5, (1, 4, 8, 8), (1, 4, 8, 8))
        x = cond.inpaint_initial_latents(jnp.asarray(noise), None, alphas(pipe), calls[0]["t"], strength)
    else:  # the image's posterior draw, the noise, then the masked image's
        posterior, noise, masked_posterior = draws(5, (1, 4, 8, 8), (1, 4, 8, 8), (1, 4, 8, 8))
        image_latents = va.encode_image(vae, params, jnp.asarray(image), jnp.asarray(posterior))
        x = cond.inpaint_initial_latents(jnp.asarray(noise), image_latents, alphas(pipe), calls[0]["t"], strength)
    masked_latents = va.encode_image(
        vae, params, jnp.asarray(cond.masked_image(image, mask)), jnp.asarray(masked_posterior)
    )
    unet_input = cond.inpaint_unet_input(x, cond.mask_latents(mask, pipe.vae_scale_factor), masked_latents)
    assert_rel_close(unet_input, calls[0]["sample"])
    assert calls[0]["t"] == ddim.timesteps(ddim.DDIMConfig.from_json(dict(pipe.scheduler.config)), steps)[first]


def test_inpaint_4_channel_blending_matches_the_pipeline_at_every_step(build):
    """An ordinary checkpoint inpaints by blending after each step; rebuild every step's latents from the
    UNet outputs the pipeline got, diffusers' DDIM step, and our blend."""
    pipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(build("tiny-sd2"))
    calls = record_unet_calls(pipe)
    after: list[np.ndarray] = []
    pixels = RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    mask_pixels = np.zeros((16, 16), np.uint8)
    mask_pixels[:, 7:] = 200
    steps, strength = 5, 0.8
    pipe(
        "a cat",
        image=Image.fromarray(pixels),
        mask_image=Image.fromarray(mask_pixels),
        strength=strength,
        num_inference_steps=steps,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(9),
        output_type="latent",
        callback_on_step_end=lambda p, i, t, kw: after.append(nhwc(kw["latents"])) or {},
    )

    first, n = cond.img2img_start(steps, strength)
    assert (
        len(calls) == n
        and calls[0]["t"] == ddim.timesteps(ddim.DDIMConfig.from_json(dict(pipe.scheduler.config)), steps)[first]
    )
    posterior, noise = draws(9, (1, 4, 8, 8), (1, 4, 8, 8))
    vae, params = flax_vae(pipe)
    image_latents = va.encode_image(vae, params, jnp.asarray(images.preprocess_image(pixels)), jnp.asarray(posterior))
    mask = cond.mask_latents(images.preprocess_mask(mask_pixels), pipe.vae_scale_factor)
    ts = [c["t"] for c in calls]
    assert_rel_close(cond.add_noise(alphas(pipe), image_latents, noise, ts[0]), calls[0]["sample"])
    stepper = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    stepper.set_timesteps(steps)
    for i in range(n):
        stepped = stepper.step(calls[i]["out"], ts[i], nchw(calls[i]["sample"])).prev_sample
        last = i == n - 1
        blended = cond.blend_inpaint_latents(
            nhwc(stepped),
            image_latents,
            noise,
            mask,
            alphas(pipe),
            np.array([0 if last else ts[i + 1]]),
            np.array([last]),
        )
        assert_rel_close(blended, after[i])


def test_depth_first_unet_input_matches_the_pipeline(build):
    pipe = diffusers.StableDiffusionDepth2ImgPipeline.from_pretrained(build("tiny-sd2-depth"))
    calls = record_unet_calls(pipe)
    pixels = RNG.integers(0, 256, (16, 12, 3), dtype=np.uint8)
    depth = (RNG.random((1, 37, 29)) * 5).astype(np.float32)
    steps, strength = 6, 0.7
    pipe(
        "a cat",
        image=Image.fromarray(pixels),
        depth_map=torch.from_numpy(depth),
        strength=strength,
        num_inference_steps=steps,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(4),
        output_type="latent",
    )

    posterior, noise = draws(4, (1, 4, 8, 6), (1, 4, 8, 6))
    vae, params = flax_vae(pipe)
    image_latents = va.encode_image(vae, params, jnp.asarray(images.preprocess_image(pixels)), jnp.asarray(posterior))
    x = cond.add_noise(alphas(pipe), image_latents, noise, calls[0]["t"])
    unet_input = np.asarray(cond.depth_unet_input(x, cond.depth_condition(depth, (16 // 2, 12 // 2))))
    assert unet_input.shape == calls[0]["sample"].shape == (1, 8, 6, 5)
    np.testing.assert_allclose(unet_input[..., 4:], calls[0]["sample"][..., 4:], rtol=0, atol=4e-6)
    assert_rel_close(unet_input, calls[0]["sample"])


def test_upscale_first_unet_input_and_class_labels_match_the_pipeline(build):
    folder = build("tiny-sd2-upscale")
    pipe = diffusers.StableDiffusionUpscalePipeline.from_pretrained(folder)
    calls = record_unet_calls(pipe)
    pixels = RNG.integers(0, 256, (12, 20, 3), dtype=np.uint8)  # low-res image; a multiple of the VAE's 4
    noise_level = 20
    pipe(
        "a cat",
        image=Image.fromarray(pixels),
        noise_level=noise_level,
        num_inference_steps=3,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(2),
        output_type="latent",
    )

    image_noise, latents = draws(2, (1, 3, 12, 20), (1, 4, 12, 20))  # the low-res image's noise first, then the latents
    ac_low = cond.low_res_alphas_cumprod(
        json.loads((Path(folder) / "low_res_scheduler" / "scheduler_config.json").read_text())
    )
    assert json.loads((Path(folder) / "model_index.json").read_text())["max_noise_level"] == 350
    low_res = cond.noise_low_res_image(
        jnp.asarray(images.preprocess_image(pixels)), jnp.asarray(image_noise), noise_level, ac_low
    )
    unet_input = cond.upscale_unet_input(jnp.asarray(latents), low_res)  # init_noise_sigma is 1 for DDIM
    np.testing.assert_allclose(np.asarray(unet_input), calls[0]["sample"], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(cond.upscale_class_labels(noise_level, 1)), calls[0]["class_labels"])
