"""ControlNets per request through the whole pipeline equal diffusers' StableDiffusionControlNetPipeline.

Two random-weight ControlNets are made from the tiny SD2 checkpoint's UNet (as training starts them, with the zero
convolutions re-drawn so they do something); diffusers loads the same folders. From the same initial latents and
control images, each image is within 2/255 of diffusers': one ControlNet, two at once (MultiControlNet) at
different scales, guess mode, and a start/end window. In a running batch each slot carries its own ControlNets,
images and scales: requests with different controls, and some with none, share chunks and equal their solo runs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_rel_close
from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline
from PIL import Image

from sdmesh.services.checkpoints.weights import CheckpointError
from sdmesh.services.dev import reference as ref
from sdmesh.services.engine.stages import DenoiserStage
from sdmesh.services.inputs.contract import ControlChoice, GenerationRequest, check_controls
from sdmesh.services.inputs.control import control_input
from sdmesh.services.inputs.errors import InvalidRequest
from sdmesh.services.pipeline import InProcessStages, StableDiffusion

PROMPT = "a photograph of an astronaut riding a horse"
SIZE, STEPS = 32, 5  # the tiny VAE halves: latents are 16×16; the ControlNet's hint embedding halves too


@pytest.fixture(scope="module")
def setup(tiny_checkpoints, tmp_path_factory):
    folder = tiny_checkpoints["sd2"]
    root = tmp_path_factory.mktemp("controlnets")
    paths = {
        name: ref.make_tiny_controlnet(root / name, folder, seed=seed) for seed, name in enumerate(("edges", "depth"))
    }
    ours = StableDiffusion.load(str(folder), controlnets=list(paths.items()))
    nets = {name: ControlNetModel.from_pretrained(path).eval() for name, path in paths.items()}
    return folder, nets, ours


def control_image(seed: int, size: int = SIZE) -> np.ndarray:
    """A blocky RGB map (as edge or depth maps are), at `size`: resized to the output size on both sides."""
    blocks = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(blocks).resize((size, size), Image.Resampling.NEAREST))


def latents(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 4, SIZE // 2, SIZE // 2), dtype=np.float32)


def reference_image(setup, x: np.ndarray, controls: list[ControlChoice], **kwargs) -> np.ndarray:
    folder, nets, _ = setup
    many = len(controls) > 1
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        folder, controlnet=[nets[c.name] for c in controls] if many else nets[controls[0].name],
        safety_checker=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pick = (lambda f: [f(c) for c in controls]) if many else (lambda f: f(controls[0]))
    out = pipe(
        PROMPT, image=pick(lambda c: Image.fromarray(c.image)), latents=torch.from_numpy(x),
        num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="np",
        controlnet_conditioning_scale=pick(lambda c: c.scale), control_guidance_start=pick(lambda c: c.start),
        control_guidance_end=pick(lambda c: c.end), guess_mode=any(c.guess_mode for c in controls), **kwargs,
    ).images  # fmt: skip
    return (out * 255).round().astype(np.uint8)


def our_image(ours: StableDiffusion, x: np.ndarray | None, controls, **fields) -> np.ndarray:
    request = GenerationRequest(
        **{"prompt": PROMPT, "steps": STEPS, "height": SIZE, "width": SIZE, "sampler": "ddim", **fields},
        latents=x, controls=controls,
    )  # fmt: skip
    return ours.generate(request).images


CASES = {
    "one": [ControlChoice("edges", control_image(1), scale=0.8)],
    "two-scales": [
        ControlChoice("edges", control_image(1), scale=1.0),
        ControlChoice("depth", control_image(2, 24), 0.5),
    ],
    "guess-mode": [ControlChoice("edges", control_image(3), scale=1.0, guess_mode=True)],
    "window": [ControlChoice("depth", control_image(4, 48), scale=1.2, start=0.2, end=0.6)],
}


@pytest.mark.parametrize("case", list(CASES))
def test_images_equal_diffusers_controlnet_pipeline(setup, case):
    x = latents(7)
    expected = reference_image(setup, x, CASES[case])
    got = our_image(setup[2], x, CASES[case])
    diff = np.abs(got.astype(int) - expected.astype(int))
    assert diff.max() <= 2, f"max pixel difference {diff.max()}/255"
    plain = our_image(setup[2], x, [])
    assert np.abs(plain.astype(int) - expected).max() > 2  # the control changed the image


def test_batched_requests_with_different_controls_each_equal_their_solo_run(setup):
    """Four requests in one running batch: one ControlNet, none, two at different scales, a window; each slot at
    its own rows' scales, the plain one joined first. Each one's latents equal its solo run's (≤ 1e-5 relative)."""
    ours = setup[2]
    encoded = InProcessStages(ours, chunk=None, noise={}).encode([PROMPT], [""])
    cases = [CASES["one"], [], CASES["two-scales"], CASES["window"]]

    def slots(k: int) -> list:
        inputs = [control_input(c, SIZE, SIZE) for c in check_controls(cases[k], ours.facts)]
        return ours.denoiser.slots(
            latents(10 + k).transpose(0, 2, 3, 1), encoded.cond, encoded.uncond, steps=STEPS, guidance_scale=7.5,
            sampler="ddim", controls=inputs, owner=k,
        )  # fmt: skip

    solo = [list(ours.denoiser.run_slots(slots(k)))[-1][1] for k in range(len(cases))]
    batch = ours.denoiser.new_batch([4])
    together = [s for k in range(len(cases)) for s in slots(k)]
    batch.join(together[1:2])  # the request without control starts alone, the others join after its first chunk
    batch.run_chunk(2)
    batch.join([together[0], *together[2:]])
    assert batch.control_layout == ("depth", "edges")  # one entry per ControlNet: no slot uses one twice
    while not all(s.done for s in together):
        batch.run_chunk(2)
    finished = {s.owner: x for s, x in batch.leave(lambda s: False)}
    for k, expected in enumerate(solo):
        assert_rel_close(finished[k][None], expected, tol=1e-5)


def test_an_unknown_controlnet_is_refused_listing_the_loaded_ones(setup):
    with pytest.raises(InvalidRequest, match="'pose' is not loaded; the denoiser has: edges, depth"):
        our_image(setup[2], None, [ControlChoice("pose", control_image(1))])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(scale=float("nan")), "scale must be a finite number"),
        (dict(scale=-1.0), "scale must be a finite number from 0"),
        (dict(start=0.6, end=0.5), "start \\(0.6\\) must be before end \\(0.5\\)"),
        (dict(image=np.zeros((8, 8), np.uint8)), "must be a \\(H, W, 3\\) uint8 RGB array"),
        (dict(preprocessor="pose"), "preprocessor 'pose' is not one of none, canny"),
    ],
)
def test_bad_control_values_are_refused_naming_the_fix(setup, change, message):
    with pytest.raises(InvalidRequest, match=message):
        our_image(setup[2], None, [ControlChoice("edges", control_image(1))._replace(**change)])


def image_pipeline(setup, cls, controls: list[ControlChoice]):
    folder, nets, _ = setup
    pipe = cls.from_pretrained(
        folder, controlnet=nets[controls[0].name], safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("mode", ["img2img", "inpainting"])
def test_image_modes_with_control_equal_diffusers_controlnet_image_pipelines(setup, mode):
    """img2img and inpainting (latent blending on the ordinary checkpoint) with a ControlNet, against diffusers'
    ControlNet img2img / inpaint pipelines; their draws (the init image's posterior, the noise, the masked image's
    posterior) are replayed as in tests/test_modes.py."""
    from diffusers import StableDiffusionControlNetImg2ImgPipeline, StableDiffusionControlNetInpaintPipeline
    from test_modes import draws, nhwc

    controls = [ControlChoice("edges", control_image(5), scale=0.9, start=0.0, end=0.8)]
    pixels = np.random.default_rng(8).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[4:20, 10:30] = 255
    strength, seed, shape = 0.75, 11, (1, 4, SIZE // 2, SIZE // 2)
    c = controls[0]
    kwargs = dict(
        prompt=PROMPT, image=Image.fromarray(pixels), control_image=Image.fromarray(c.image), strength=strength,
        num_inference_steps=STEPS, controlnet_conditioning_scale=c.scale, control_guidance_start=c.start,
        control_guidance_end=c.end, generator=torch.Generator().manual_seed(seed), output_type="np",
    )  # fmt: skip
    fields = dict(init_image=pixels, strength=strength)
    if mode == "img2img":
        pipe = image_pipeline(setup, StableDiffusionControlNetImg2ImgPipeline, controls)
        posterior, noise = draws(seed, shape, shape)
    else:
        pipe = image_pipeline(setup, StableDiffusionControlNetInpaintPipeline, controls)
        kwargs.update(mask_image=Image.fromarray(mask), height=SIZE, width=SIZE)
        fields.update(mask_image=mask)
        posterior, noise, _ = draws(seed, shape, shape, shape)  # the masked image's posterior goes unused
    expected = (pipe(**kwargs).images * 255).round().astype(np.uint8)
    request = GenerationRequest(prompt=PROMPT, steps=STEPS, sampler="ddim", latents=noise, controls=controls, **fields)
    got = setup[2].generate(request, noise={"image": nhwc(posterior)}).images
    diff = np.abs(got.astype(int) - expected.astype(int))
    assert diff.max() <= 2, f"max pixel difference {diff.max()}/255"


def test_a_controlnet_for_another_base_model_is_refused_at_start_up_naming_both(setup, tiny_checkpoints, tmp_path):
    other = ref.make_tiny_controlnet(tmp_path / "sd1", tiny_checkpoints["sd1"])
    with pytest.raises(CheckpointError, match=r"ControlNet 'sd1-edges' .* was made for another base model: its "):
        setup[2].denoiser.use_controlnet("sd1-edges", other)
    assert "sd1-edges" not in setup[2].denoiser.controlnets


def test_a_controlnet_whose_maps_do_not_fit_the_vae_is_refused_at_start_up(setup, tmp_path):
    folder = setup[0]
    wrong = ref.make_tiny_controlnet(tmp_path / "x4", folder, conditioning_embedding_out_channels=(8, 8, 16))
    stage = DenoiserStage.load(folder)
    stage.use_controlnet("x4", wrong)
    with pytest.raises(CheckpointError, match="takes maps at 4× the latents but this checkpoint's VAE scales by 2"):
        stage.facts(vae_scale_factor=2, max_length=77)


def test_through_the_gateway_concurrent_requests_with_different_controls_each_equal_the_pipeline(setup):
    """The three stage services on the loaded stages (the denoiser batching up to 2 images), a gateway in front:
    requests with different ControlNets, maps and scales, and one without, sent at once through the client,
    each get the in-process image; the gateway's ModelInfo lists the ControlNets."""
    from concurrent.futures import ThreadPoolExecutor

    from test_modes import Served

    from sdmesh.client import Client, Control

    ours = setup[2]
    cases = [CASES["one"], [], CASES["two-scales"]]
    expected = [our_image(ours, None, c, seed=40 + k) for k, c in enumerate(cases)]
    served = Served(ours, setup[0])
    try:
        with Client(served.address) as client:
            assert set(client.model_info().model_facts.controlnets) == {"edges", "depth"}

            def generate(k: int) -> np.ndarray:
                controls = [Control(c.name, c.image, scale=c.scale, start=c.start, end=c.end) for c in cases[k]]
                result = client.generate(
                    PROMPT, steps=STEPS, height=SIZE, width=SIZE, sampler="ddim", seed=40 + k, controls=controls,
                    timeout=300,
                )  # fmt: skip
                return np.stack([np.asarray(im) for im in result.images])

            with ThreadPoolExecutor(len(cases)) as pool:
                got = list(pool.map(generate, range(len(cases))))
    finally:
        served.close()
    for k, (g, e) in enumerate(zip(got, expected, strict=True)):  # batch-mates may flip a rounding, not more
        assert np.abs(g.astype(int) - e).max() <= 1, f"request {k}"
