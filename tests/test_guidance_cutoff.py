"""A guidance cutoff: the first ⌈cutoff · steps⌉ steps are guided, the rest take the conditional output alone and skip
the unconditional pass. It equals diffusers run with the `callback_on_step_end` that drops guidance after the same
step (diffusers' "dynamic CFG" recipe); slots past their cutoff share a running batch with guided and unguided ones,
each getting its solo result; a batch whose slots are all past their cutoff runs the program without the
unconditional half."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_rel_close
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

from sdmesh.client.client import generate_request
from sdmesh.services.engine import denoise
from sdmesh.services.inputs.contract import DenoiseJob, GenerationRequest
from sdmesh.services.inputs.errors import InvalidRequest
from sdmesh.services.pipeline import InProcessStages, StableDiffusion
from sdmesh.services.serving import gateway, wire

PROMPT, SIZE, STEPS = "a lighthouse on a cliff at dusk", 32, 6


@pytest.fixture(scope="module")
def sd2(tiny_checkpoints):
    return tiny_checkpoints["sd2"], StableDiffusion.load(str(tiny_checkpoints["sd2"]))


def latents(pipe: StableDiffusion, seed: int) -> np.ndarray:
    f = pipe.vae_scale_factor
    shape = (1, pipe.unet.config.out_channels, SIZE // f, SIZE // f)
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def diffusers_image(folder, x: np.ndarray, scheduler, guided_steps: int) -> np.ndarray:
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    def drop_guidance(pipe, step_index, timestep, kwargs):
        if step_index == guided_steps - 1:  # the last guided step has run
            pipe._guidance_scale = 0.0
            kwargs["prompt_embeds"] = kwargs["prompt_embeds"].chunk(2)[-1]
        return kwargs

    out = pipe(
        PROMPT, latents=torch.from_numpy(x), num_inference_steps=STEPS, height=SIZE, width=SIZE, guidance_scale=7.5,
        output_type="np", callback_on_step_end=drop_guidance, callback_on_step_end_tensor_inputs=["prompt_embeds"],
    ).images  # fmt: skip
    return (out * 255).round().astype(np.uint8)


@pytest.mark.parametrize(("sampler", "scheduler"), [("ddim", DDIMScheduler), ("euler", EulerDiscreteScheduler)])
@pytest.mark.parametrize("cutoff", [0.5, 0.2])
def test_images_equal_diffusers_dropping_guidance_after_the_same_step(sd2, sampler, scheduler, cutoff):
    folder, ours = sd2
    x = latents(ours, 3)
    guided = denoise.guided_rows(STEPS, cutoff)
    assert guided == {0.5: 3, 0.2: 2}[cutoff]  # ⌈cutoff · steps⌉
    request = dict(prompt=PROMPT, steps=STEPS, height=SIZE, width=SIZE, sampler=sampler, latents=x)
    got = ours.generate(GenerationRequest(**request, guidance_cutoff=cutoff)).images
    expected = diffusers_image(folder, x, scheduler, guided)
    assert np.abs(got.astype(int) - expected).max() <= 2
    full = ours.generate(GenerationRequest(**request)).images
    assert np.abs(full.astype(int) - expected).max() > 2  # the cutoff changed the image


def test_slots_past_their_cutoff_share_a_batch_and_each_equals_its_solo_run(sd2):
    """Four slots in one batch: fully guided, cut at 1/3 and 2/3, unguided. Each one's latents equal its solo
    run's (≤ 1e-5 relative); once every guided slot is past its cutoff the batch drops the unconditional pass."""
    _, ours = sd2
    encoded = InProcessStages(ours, chunk=None, noise={}).encode([PROMPT], [""])
    cases = [(7.5, 1.0), (7.5, 1 / 3), (7.5, 2 / 3), (1.0, 1.0)]

    def slots(k: int) -> list[denoise.Slot]:
        scale, cutoff = cases[k]
        return ours.denoiser.slots(
            latents(ours, 10 + k).transpose(0, 2, 3, 1), encoded.cond, encoded.uncond if scale > 1 else None,
            steps=STEPS, guidance_scale=scale, guidance_cutoff=cutoff, sampler="ddim", owner=k,
        )  # fmt: skip

    solo = [list(ours.denoiser.run_slots(slots(k)))[-1][1] for k in range(len(cases))]
    batch = ours.denoiser.new_batch([4])
    together = [s for k in range(len(cases)) for s in slots(k)]
    batch.join(together)
    uses_uncond = []
    while not all(s.done for s in together):
        uses_uncond.append(batch.with_uncond)
        batch.run_chunk(2)
    assert uses_uncond == [True, True, True]  # the fully guided slot needs it to the end
    finished = {s.owner: x for s, x in batch.leave(lambda s: False)}
    for k, expected in enumerate(solo):
        assert_rel_close(finished[k][None], expected, tol=1e-5)

    cut = ours.denoiser.new_batch([4])
    early = slots(1) + slots(2)
    cut.join(early)
    uses_uncond = []
    while not all(s.done for s in early):
        uses_uncond.append(cut.with_uncond)
        cut.run_chunk(2)
    assert uses_uncond == [True, True, False]  # past both cutoffs (rows 2 and 4): the cheaper program


@pytest.mark.parametrize("cutoff", [0.0, -0.5, 1.5, float("nan")])
def test_a_cutoff_outside_0_to_1_is_refused(sd2, cutoff):
    with pytest.raises(InvalidRequest, match="guidance_cutoff"):
        sd2[1].validate(GenerationRequest(prompt=PROMPT, steps=STEPS, guidance_cutoff=cutoff))


def test_the_cutoff_travels_from_the_client_through_the_gateway_to_the_denoiser(sd2):
    request = gateway.request_from_proto(generate_request(PROMPT, steps=STEPS, guidance_cutoff=0.4))
    assert request.guidance_cutoff == pytest.approx(0.4)
    assert gateway.request_from_proto(generate_request(PROMPT)).guidance_cutoff == 1.0
    ours = sd2[1]
    job = InProcessStages(ours, chunk=None, noise={}).encode([PROMPT], [""])
    validated = ours.validate(GenerationRequest(prompt=PROMPT, steps=STEPS, height=SIZE, width=SIZE,
                                                  guidance_cutoff=0.4))  # fmt: skip
    assert validated.guidance_cutoff == 0.4
    message = wire.denoise_job_to_proto(
        DenoiseJob(cond=job.cond, uncond=job.uncond, latents=None, seed=1, steps=STEPS, guidance_scale=7.5,
                   guidance_rescale=0.0, eta=0.0, height=SIZE, width=SIZE, guidance_cutoff=0.4)
    )  # fmt: skip
    assert wire.denoise_job_from_proto(message, ours.facts).guidance_cutoff == pytest.approx(0.4)
