"""The whole text-to-image pipeline equals diffusers' StableDiffusionPipeline from the same latents,
under every sampler."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
)

from sdmesh.services.inputs.contract import GenerationRequest
from sdmesh.services.inputs.errors import InvalidRequest
from sdmesh.services.pipeline import StableDiffusion


@pytest.fixture(scope="module")
def loaded(tiny_checkpoints):
    """One loaded pipeline per tiny checkpoint, shared by this module's tests (loading is not under test here)."""
    pipes: dict[str, StableDiffusion] = {}

    def get(flavor: str) -> StableDiffusion:
        if flavor not in pipes:
            pipes[flavor] = StableDiffusion.load(str(tiny_checkpoints[flavor]))
        return pipes[flavor]

    return get


def reference_images(folder, prompt, latents, scheduler=DDIMScheduler, scheduler_options=None, **kwargs) -> np.ndarray:
    """diffusers' images; `scheduler` None keeps the checkpoint's own."""
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    if scheduler is not None:
        pipe.scheduler = scheduler.from_config(pipe.scheduler.config, **(scheduler_options or {}))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt, latents=torch.from_numpy(latents), output_type="np", **kwargs).images
    return (out * 255).round().astype(np.uint8)  # diffusers' own PIL conversion


def random_latents(pipe: StableDiffusion, n: int, size: int, seed: int = 0) -> np.ndarray:
    f = pipe.vae_scale_factor
    return np.random.default_rng(seed).standard_normal(
        (n, pipe.unet.config.out_channels, size // f, size // f), dtype=np.float32
    )


@pytest.mark.parametrize("flavor", ["sd2", "sd1"])
@pytest.mark.parametrize(
    "options",
    [
        dict(guidance_scale=7.5),
        dict(guidance_scale=5.0, negative_prompt="blurry, low quality", guidance_rescale=0.7),
        dict(guidance_scale=1.0),  # no unconditional pass, as in diffusers
    ],
    ids=["cfg", "negative+rescale", "no-cfg"],
)
def test_images_equal_diffusers_from_same_latents(tiny_checkpoints, loaded, flavor, options):
    folder = tiny_checkpoints[flavor]
    pipe = loaded(flavor)
    latents = random_latents(pipe, 2, 32, seed=zlib.crc32(flavor.encode()) % 1000)  # the same in every process
    prompt = "a photograph of an astronaut riding a horse"
    ours = pipe.generate(
        GenerationRequest(
            prompt=prompt, num_images=2, steps=4, height=32, width=32, latents=latents, sampler="ddim", **options
        )
    )
    ref = reference_images(
        folder, prompt, latents, num_images_per_prompt=2, num_inference_steps=4, height=32, width=32, **options
    )
    diff = np.abs(ours.images.astype(int) - ref.astype(int))
    assert diff.max() <= 2, f"max pixel difference {diff.max()}/255"


# our name → the diffusers scheduler (and options) it must equal; euler-ancestral draws its noise inside diffusers'
# step, so it is compared step by step with supplied noise in test_samplers.py instead
SAMPLERS = {
    "euler": (EulerDiscreteScheduler, {}),
    "dpm++2m": (DPMSolverMultistepScheduler, {"use_karras_sigmas": False}),
    "dpm++2m-karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "plms": (PNDMScheduler, {"skip_prk_steps": True}),
}


@pytest.mark.parametrize("flavor", ["sd2", "sd1"])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_equals_its_diffusers_scheduler_in_the_whole_pipeline(tiny_checkpoints, loaded, flavor, sampler):
    folder, pipe = tiny_checkpoints[flavor], loaded(flavor)
    latents = random_latents(pipe, 1, 32, seed=5)
    options = dict(guidance_scale=6.0, negative_prompt="dark")
    ours = pipe.generate(
        GenerationRequest(
            prompt="a red bicycle", steps=6, height=32, width=32, latents=latents, sampler=sampler, **options
        )
    )
    scheduler, scheduler_options = SAMPLERS[sampler]
    ref = reference_images(
        folder,
        "a red bicycle",
        latents,
        scheduler=scheduler,
        scheduler_options=scheduler_options,
        num_inference_steps=6,
        height=32,
        width=32,
        **options,
    )
    diff = np.abs(ours.images.astype(int) - ref.astype(int))
    assert diff.max() <= 2, f"max pixel difference {diff.max()}/255"


def test_the_checkpoints_own_sampler_is_the_default(tiny_checkpoints, loaded):
    """SD 1.x ships PNDM (PLMS): with no sampler named we sample as diffusers' pipeline does
    with the checkpoint as is."""
    folder, pipe = tiny_checkpoints["sd1"], loaded("sd1")
    assert pipe.denoiser.default_sampler == "plms"
    latents = random_latents(pipe, 1, 32, seed=6)
    ours = pipe.generate(GenerationRequest(prompt="a cat", steps=5, height=32, width=32, latents=latents))
    ref = reference_images(folder, "a cat", latents, scheduler=None, num_inference_steps=5, height=32, width=32)
    assert np.abs(ours.images.astype(int) - ref.astype(int)).max() <= 2


def test_chunked_run_equals_one_program_run(loaded):
    pipe = loaded("sd2")
    request = GenerationRequest(prompt="a cat", steps=5, height=32, width=32, seed=3)
    seen = []
    chunked = pipe.generate(request, progress=lambda i, n: seen.append((i, n)), chunk=2)
    whole = pipe.generate(request)
    assert seen == [(2, 5), (4, 5), (5, 5)]
    np.testing.assert_array_equal(chunked.images, whole.images)


def test_new_prompts_seeds_and_guidance_do_not_recompile(tiny_checkpoints):
    pipe = StableDiffusion.load(str(tiny_checkpoints["sd2"]))  # fresh: nothing compiled yet
    first = pipe.generate(GenerationRequest(prompt="a cat", steps=3, height=32, width=32, seed=1))
    assert first.timings["compile"] > 0
    again = pipe.generate(
        GenerationRequest(
            prompt="a dog on a hill", steps=7, guidance_scale=3.0, guidance_rescale=0.5, height=32, width=32, seed=2
        )
    )
    assert again.timings["compile"] == 0
    assert not np.array_equal(first.images, again.images)


def test_same_seed_same_image(loaded):
    pipe = loaded("sd2")
    request = GenerationRequest(prompt="a cat", steps=2, height=32, width=32, seed=42)
    np.testing.assert_array_equal(pipe.generate(request).images, pipe.generate(request).images)


def test_long_prompt_is_truncated_and_reported(loaded):
    pipe = loaded("sd2")
    # one token a word: 13 chunks of 75 hold 975 of them, the other 15 are dropped
    result = pipe.generate(GenerationRequest(prompt="horse " * 990, steps=1, height=32, width=32, seed=0))
    assert result.truncation_notes == [
        "the prompt was cut at the text encoder's limit (13 chunks of 75 tokens); dropped: "
        + repr(" ".join(["horse"] * 15))
    ]


@pytest.mark.parametrize(
    "bad,message",
    [
        (dict(height=31), "multiple of"),
        (dict(width=0), "multiple of"),
        (dict(steps=0), "steps"),
        (dict(steps=5000), "steps"),
        (dict(guidance_scale=float("nan")), "finite"),
        (dict(guidance_scale=float("inf")), "finite"),
        (dict(num_images=-1), "num_images"),
        (dict(num_images=0), "num_images"),
        (dict(guidance_rescale=2.0), "guidance_rescale"),
        (dict(seed=-5), "seed"),
        (dict(latents=np.zeros((1, 4, 8, 8), np.float32)), "latents must be"),
        (dict(latents=np.zeros((1, 4, 16, 16), np.float64)), "latents must be"),
        (dict(prompt=""), None),  # an empty prompt is fine: it is the unconditional prompt
    ],
)
def test_bad_requests_are_refused_with_a_reason(loaded, bad, message):
    pipe = loaded("sd2")
    request = GenerationRequest(**{"prompt": "a cat", "height": 32, "width": 32, "steps": 2, **bad})
    if message is None:
        pipe.validate(request)
        return
    with pytest.raises(InvalidRequest, match=message):
        pipe.validate(request)


# A config no shipped checkpoint has, still SD-shaped: four levels, two transformer layers per block,
# three VAE levels (factor 4), a zero-terminal-SNR trailing v-prediction schedule, a non-square image.
ODD = {
    "unet": dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32, 32, 48),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24,
        attention_head_dim=(2, 2, 4, 4),
        transformer_layers_per_block=2,
        use_linear_projection=True,
        norm_num_groups=8,
        flip_sin_to_cos=False,
        freq_shift=1,
    ),
    "vae": dict(
        block_out_channels=(8, 16, 16),
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=2,
        sample_size=32,
        scaling_factor=0.13025,
    ),
    "text_encoder": dict(
        hidden_size=24,
        intermediate_size=50,
        num_hidden_layers=3,
        num_attention_heads=3,
        max_position_embeddings=77,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        projection_dim=24,
    ),
    "scheduler": dict(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
        prediction_type="v_prediction",
        clip_sample=False,
    ),
    "pad_token": "!",
}


OLD_SCHEDULER = dict(beta_schedule="linear", steps_offset=0, clip_sample=True, prediction_type="epsilon")


@pytest.mark.parametrize("scheduler", [ODD["scheduler"], OLD_SCHEDULER], ids=["zero-snr-trailing", "old-config"])
def test_an_unusual_sd_shaped_config_matches_too(tmp_path, scheduler):
    """Includes an old scheduler config that diffusers' pipeline rewrites (steps_offset → 1, clip_sample → False)."""
    from sdmesh.services.dev import reference

    folder = reference.build(tmp_path / "odd", {**ODD, "scheduler": scheduler}, seed=11, perturb=0.02)
    pipe = StableDiffusion.load(str(folder))
    latents = np.random.default_rng(3).standard_normal((1, 4, 24 // 4, 40 // 4), dtype=np.float32)
    options = dict(guidance_scale=6.0, guidance_rescale=0.3, negative_prompt="dark")
    ours = pipe.generate(
        GenerationRequest(
            prompt="a red bicycle", steps=3, height=24, width=40, latents=latents, sampler="ddim", **options
        )
    )
    ref = reference_images(folder, "a red bicycle", latents, num_inference_steps=3, height=24, width=40, **options)
    assert np.abs(ours.images.astype(int) - ref.astype(int)).max() <= 2
