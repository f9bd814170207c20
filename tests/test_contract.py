"""The request contract: one validation, the same for the in-process pipeline, the gateway and the stages."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from sdmesh.services import chain
from sdmesh.services.inputs import contract
from sdmesh.services.inputs.contract import DenoiseJob, GenerationRequest, ModelFacts
from sdmesh.services.inputs.errors import InvalidRequest
from sdmesh.services.serving import gateway, wire
from sdmesh.v1 import gateway_pb2

FACTS = ModelFacts(
    kind="text-to-image", vae_scale_factor=8, latent_channels=4, default_size=(512, 512), max_steps=999,
    samplers=("ddim", "euler", "plms"), default_sampler="ddim", hidden_size=16, max_length=77,
    prediction_type="epsilon", extra_channels=0, class_labels_shape=None, max_noise_level=0,
)  # fmt: skip
UPSCALER = dataclasses.replace(FACTS, kind="upscaling", vae_scale_factor=4, extra_channels=3, class_labels_shape=(),
                               max_noise_level=350)  # fmt: skip
INPAINTING = dataclasses.replace(FACTS, kind="inpainting", extra_channels=5)


def rgb(h: int, w: int) -> np.ndarray:
    return np.zeros((h, w, 3), np.uint8)


def test_defaults_are_diffusers_pipelines_defaults():
    job = contract.validate(GenerationRequest(prompt="a cat"), FACTS, draw_seed=lambda: 7)
    assert (job.steps, job.guidance_scale, job.num_images, job.height, job.width, job.seed) == (50, 7.5, 1, 512, 512, 7)
    assert job.mode == "text-to-image" and job.sampler is None and job.negative_prompts == ("",) and job.guided


def test_each_image_mode_gets_its_default_strength_and_size():
    img2img = contract.validate(GenerationRequest(prompt="", init_image=rgb(64, 32)), FACTS)
    assert (img2img.mode, img2img.strength, img2img.height, img2img.width, img2img.latent_size) == (
        "img2img",
        0.8,
        64,
        32,
        (8, 4),
    )
    blend = contract.validate(
        GenerationRequest(prompt="", init_image=rgb(64, 32), mask_image=np.zeros((64, 32), np.uint8)), FACTS
    )
    assert (blend.mode, blend.strength) == ("inpainting", 1.0)
    up = contract.validate(GenerationRequest(prompt="", init_image=rgb(16, 8)), UPSCALER)
    assert (up.mode, up.noise_level, up.height, up.width, up.latent_size) == ("upscaling", 20, 64, 32, (16, 8))


@pytest.mark.parametrize(
    "facts,fields,message",
    [
        (FACTS, dict(steps=1000), "steps must be an integer from 1 to 999"),
        (FACTS, dict(steps=2.5), "steps must be an integer"),
        (FACTS, dict(guidance_scale=float("nan")), "guidance_scale must be a finite number"),
        (FACTS, dict(eta=-0.1), "eta must be a finite number from 0"),
        (FACTS, dict(sampler="lms"), "sampler 'lms' is not one of ddim, euler, plms"),
        (FACTS, dict(seed=2**64), "seed must be an integer between 0 and 2^64"),
        (FACTS, dict(priority=2**40), "priority must be an integer"),
        (FACTS, dict(num_images=65), "at most 64 in all"),
        (FACTS, dict(prompt=["a"] * 65), "at most 64"),
        (FACTS, dict(negative_prompt="x" * 10_001), "at most 10000"),
        (FACTS, dict(height=500), "height must be a multiple of 8 between 8 and 4096"),
        (dataclasses.replace(FACTS, default_size=None), dict(), "give height and width"),
        (FACTS, dict(mask_image=np.zeros((8, 8), np.uint8)), "needs an init image"),
        (FACTS, dict(init_image=rgb(60, 64)), "init_image height is 60; it must be a multiple of 8"),
        (FACTS, dict(init_image=rgb(64, 64), height=128), "disagrees with init_image's 64"),
        (FACTS, dict(init_image=rgb(64, 64), strength=0.0), "strength must be in (0, 1]"),
        (FACTS, dict(init_image=rgb(64, 64), strength=0.01, steps=10), "runs no step"),
        (FACTS, dict(init_image=rgb(64, 64), depth_map=np.zeros((8, 8))), "depth_map is for depth checkpoints"),
        (INPAINTING, dict(init_image=rgb(64, 64)), "give mask_image"),
        (UPSCALER, dict(init_image=rgb(16, 16), noise_level=351), "noise_level must be an integer from 0 to 350"),
        (UPSCALER, dict(init_image=rgb(2048, 16)), "upscaled 4× it would pass 4096"),
        (FACTS, dict(noise_level=20), "noise_level is for the x4 upscaler"),
        (
            FACTS,
            dict(latents=np.zeros((1, 4, 8, 8), np.float32)),
            "latents must be float32 NCHW of shape (1, 4, 64, 64)",
        ),
    ],
)
def test_a_bad_request_is_refused_naming_the_fix(facts, fields, message):
    with pytest.raises(InvalidRequest) as e:
        contract.validate(GenerationRequest(**{"prompt": "a cat", **fields}), facts)
    assert message in str(e.value)


def test_a_long_sampler_name_is_quoted_cut_short():
    """A status message past ~8 kB (after gRPC's percent-encoding, 3 bytes a byte of UTF-8) never reaches the
    caller, who would get RESOURCE_EXHAUSTED instead of the refusal."""
    with pytest.raises(InvalidRequest, match=r"sampler '🙂+'… \(10000 characters\) is not one of ddim") as e:
        contract.validate(GenerationRequest("a cat", sampler="🙂" * 10_000), FACTS)
    assert len(str(e.value)) < 200


def test_the_gateway_refuses_with_the_pipelines_words():
    """A GenerateRequest is converted and validated by the same contract, so the messages are the same."""
    wire_request = gateway_pb2.GenerateRequest(prompt="a cat", height=500, width=512)
    with pytest.raises(InvalidRequest) as over_the_wire:
        contract.validate(gateway.request_from_proto(wire_request), FACTS)
    with pytest.raises(InvalidRequest) as in_process:
        contract.validate(GenerationRequest(prompt="a cat", height=500, width=512), FACTS)
    assert str(over_the_wire.value) == str(in_process.value)


def test_model_facts_survive_the_wire():
    for facts in (FACTS, UPSCALER, dataclasses.replace(FACTS, default_size=None)):
        assert wire.facts_from_proto(wire.facts_to_proto(facts), source="test") == facts


def denoise_job(**changes) -> DenoiseJob:
    cond = np.zeros((2, 77, 16), np.float32)
    return dataclasses.replace(DenoiseJob(cond, cond, None, 0, 10, 7.5, 0.0, 0.0, 64, 64), **changes)


def test_a_denoise_job_survives_the_wire():
    rng = np.random.default_rng(0)
    job = denoise_job(latents=rng.standard_normal((2, 8, 8, 4), dtype=np.float32), seed=5,
                      init_latents=rng.standard_normal((2, 8, 8, 4), dtype=np.float32), strength=0.5,
                      blend_mask=np.ones((2, 8, 8, 1), np.float32), sampler="euler", priority=3)  # fmt: skip
    back = wire.denoise_job_from_proto(wire.denoise_job_to_proto(job), FACTS)
    for field in dataclasses.fields(DenoiseJob):
        a, b = getattr(job, field.name), getattr(back, field.name)
        assert np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b, field.name


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(cond=np.zeros((2, 77, 8), np.float32), uncond=None), "this UNet needs (N, L, 16)"),
        (dict(uncond=np.zeros((1, 77, 16), np.float32)), "uncond has shape [1, 77, 16] but cond has [2, 77, 16]"),
        (dict(latents=np.zeros((2, 4, 8, 8), np.float32)), "latents have shape [2, 8, 4, 8]"),
        (dict(extra=np.zeros((2, 8, 8, 1), np.float32)), "this UNet takes only the latents"),
        (dict(blend_mask=np.ones((2, 8, 8, 1), np.float32)), "blend_mask needs init_latents"),
        (dict(init_latents=np.zeros((2, 8, 8, 4), np.float32), strength=0.05), "runs no step"),
        (dict(cond=np.full((2, 77, 16), np.nan, np.float32), uncond=None), "cond contains NaN"),
    ],
)
def test_a_bad_denoise_job_is_refused(changes, message):
    with pytest.raises(InvalidRequest) as e:
        contract.check_denoise_job(denoise_job(**changes), FACTS)
    assert message in str(e.value)


class Recording:
    """chain.Stages that record what the chain asks of them (numbers chosen to be told apart)."""

    def __init__(self):
        self.calls: list[tuple] = []

    def encode(self, prompts, negative_prompts, loras=()):
        self.calls.append(("encode", prompts, negative_prompts))
        p = len(prompts)
        rows = np.arange(p, dtype=np.float32)[:, None, None] * np.ones((p, 77, 16), np.float32)
        return chain.Encoded(rows, None if negative_prompts is None else -rows, [chain.Truncation(0, "tail", False)])

    def encode_image(self, images, seed, stream):
        self.calls.append(("encode_image", images.shape, seed, stream))
        return np.zeros((1, images.shape[1] // 8, images.shape[2] // 8, 4), np.float32)

    def denoise(self, job):
        self.calls.append(("denoise", job))
        yield chain.Progress("denoise", 1, job.steps)
        return np.zeros((job.images, job.height // 8, job.width // 8, 4), np.float32)

    def decode(self, latents):
        self.calls.append(("decode", latents.shape))
        return np.zeros((latents.shape[0], latents.shape[1] * 8, latents.shape[2] * 8, 3), np.uint8)


def test_the_chain_encodes_once_repeats_rows_then_denoises_and_decodes():
    stages = Recording()
    job = contract.validate(
        GenerationRequest(prompt=["a", "b"], num_images=2, steps=4, seed=9, height=64, width=64), FACTS
    )
    events = list(chain.generate(stages, job, FACTS))
    assert [c[0] for c in stages.calls] == ["encode", "denoise", "decode"]
    assert stages.calls[0][1:] == (["a", "b"], ["", ""])  # prompts and negatives in one call, prompts first
    denoise = stages.calls[1][1]
    assert denoise.cond[:, 0, 0].tolist() == [0, 0, 1, 1] and denoise.seed == 9  # each prompt's row num_images times
    assert [e.stage for e in events[:-1]] == ["encode", "denoise", "decode"]
    result = events[-1]
    assert (
        result.images.shape == (4, 64, 64, 3) and result.seed == 9 and "dropped: 'tail'" in result.truncation_notes[0]
    )


def test_unguided_requests_skip_the_negatives_and_image_modes_encode_the_image():
    stages = Recording()
    job = contract.validate(GenerationRequest(prompt="a", guidance_scale=1.0, init_image=rgb(32, 32), seed=3), FACTS)
    list(chain.generate(stages, job, FACTS))
    assert stages.calls[0] == ("encode", ["a"], None)
    assert stages.calls[1] == ("encode_image", (1, 32, 32, 3), 3, 0)
    denoise = stages.calls[2][1]
    assert denoise.uncond is None and denoise.init_latents.shape == (1, 4, 4, 4) and denoise.strength == 0.8
