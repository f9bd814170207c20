"""Image-conditioned generation equals diffusers' pipelines, image for image, from the same draws.

img2img, inpainting (a 9-channel checkpoint, and latent blending on an ordinary one),
depth-conditioned generation with a given depth map, and x4 upscaling, each through
`StableDiffusion.generate` against the diffusers pipeline of that mode on a tiny
random-weight checkpoint, fp32, ≤ 2/255 per pixel. The reference draws its noise from a
torch generator; we replay that generator's draws in the pipeline's order and hand them to
ours (`latents`, and `noise=` for the VAE posterior samples and the low-res image's noise).
"""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from sdmesh.services.dev import reference
from sdmesh.services.inputs.contract import GenerationRequest
from sdmesh.services.inputs.errors import InvalidRequest
from sdmesh.services.pipeline import StableDiffusion

RNG = np.random.default_rng(0)
PROMPT, NEGATIVE = "a lighthouse on a cliff", "blurry"


@pytest.fixture(scope="module")
def folders(tiny_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("modes")
    built = {
        name: reference.build(root / name, reference.SPECS[f"tiny-sd2-{name}"], seed=3, perturb=0.02)
        for name in ("inpaint", "depth", "upscale")
    }
    return {"text": tiny_checkpoints["sd2"], **built}


@pytest.fixture(scope="module")
def loaded(folders):
    cache: dict[str, StableDiffusion] = {}

    def get(name: str) -> StableDiffusion:
        if name not in cache:
            cache[name] = StableDiffusion.load(str(folders[name]))
        return cache[name]

    return get


def draws(seed: int, *shapes: tuple[int, ...]) -> list[np.ndarray]:
    """The torch generator's successive draws (NCHW), as the reference pipeline makes them."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).numpy() for shape in shapes]


def nhwc(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1))


def reference_images(pipe, seed: int, **kwargs) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        PROMPT, negative_prompt=NEGATIVE, generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs
    ).images
    return (out * 255).round().astype(np.uint8)


def assert_images_close(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.shape == ref.shape, f"{ours.shape} != {ref.shape}"
    diff = np.abs(ours.astype(int) - ref.astype(int)).max()
    assert diff <= 2, f"max pixel difference {diff}/255"


def image(h: int, w: int) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    "sampler,scheduler", [("ddim", diffusers.DDIMScheduler), ("dpm++2m", diffusers.DPMSolverMultistepScheduler)]
)
def test_img2img_equals_diffusers(folders, loaded, sampler, scheduler):
    pixels, steps, strength, seed = image(32, 32), 6, 0.6, 7
    ref_pipe = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(
        folders["text"], safety_checker=None, requires_safety_checker=False
    )
    ref_pipe.scheduler = scheduler.from_config(ref_pipe.scheduler.config)
    ref = reference_images(
        ref_pipe, seed, image=Image.fromarray(pixels), strength=strength, num_inference_steps=steps, guidance_scale=7.5
    )
    posterior, noise = draws(seed, (1, 4, 16, 16), (1, 4, 16, 16))  # the image's posterior sample, then the noise
    ours = loaded("text").generate(
        GenerationRequest(
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            init_image=pixels,
            strength=strength,
            steps=steps,
            guidance_scale=7.5,
            sampler=sampler,
            latents=noise,
        ),
        noise={"image": nhwc(posterior)},
    )
    assert_images_close(ours.images, ref)


@pytest.mark.parametrize("strength", [1.0, 0.75])
def test_inpainting_an_ordinary_checkpoint_blends_as_diffusers_does(folders, loaded, strength):
    pixels, seed = image(32, 32), 9
    mask = np.zeros((32, 32), np.uint8)
    mask[4:20, 10:30] = 255
    ref_pipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(
        folders["text"], safety_checker=None, requires_safety_checker=False
    )
    ref = reference_images(
        ref_pipe,
        seed,
        image=Image.fromarray(pixels),
        mask_image=Image.fromarray(mask),
        strength=strength,
        num_inference_steps=5,
        guidance_scale=6.0,
        height=32,
        width=32,
    )
    # a 4-channel UNet: the image's posterior (for blending), the noise, then the masked image's (unused)
    posterior, noise, _ = draws(seed, (1, 4, 16, 16), (1, 4, 16, 16), (1, 4, 16, 16))
    ours = loaded("text").generate(
        GenerationRequest(
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            init_image=pixels,
            mask_image=mask,
            strength=strength,
            steps=5,
            guidance_scale=6.0,
            sampler="ddim",
            latents=noise,
        ),
        noise={"image": nhwc(posterior)},
    )
    assert_images_close(ours.images, ref)


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_inpainting_checkpoint_equals_diffusers_with_its_own_scheduler(folders, loaded, strength):
    pixels, seed = image(16, 16), 5
    mask = np.zeros((16, 16), np.uint8)
    mask[3:10, 5:15] = 255
    ref_pipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(
        folders["inpaint"], safety_checker=None, requires_safety_checker=False
    )
    ref = reference_images(
        ref_pipe,
        seed,
        image=Image.fromarray(pixels),
        mask_image=Image.fromarray(mask),
        strength=strength,
        num_inference_steps=4,
        guidance_scale=7.5,
    )
    shape = (1, 4, 8, 8)
    if strength == 1.0:  # pure noise, then the masked image's posterior
        noise, masked = draws(seed, shape, shape)
        given = {"masked_image": nhwc(masked)}
    else:  # the image's posterior, the noise, the masked image's posterior
        posterior, noise, masked = draws(seed, shape, shape, shape)
        given = {"image": nhwc(posterior), "masked_image": nhwc(masked)}
    pipe = loaded("inpaint")
    ours = pipe.generate(
        GenerationRequest(
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            init_image=pixels,
            mask_image=mask,
            strength=strength,
            steps=4,
            guidance_scale=7.5,
            latents=noise,
        ),
        noise=given,
    )
    assert_images_close(ours.images, ref)


def test_depth_checkpoint_with_a_given_depth_map_equals_diffusers(folders, loaded):
    pixels, seed = image(16, 12), 4
    depth = (RNG.random((1, 37, 29)) * 5).astype(np.float32)
    ref_pipe = diffusers.StableDiffusionDepth2ImgPipeline.from_pretrained(folders["depth"])
    ref = reference_images(
        ref_pipe,
        seed,
        image=Image.fromarray(pixels),
        depth_map=torch.from_numpy(depth),
        strength=0.7,
        num_inference_steps=6,
        guidance_scale=7.5,
    )
    posterior, noise = draws(seed, (1, 4, 8, 6), (1, 4, 8, 6))
    ours = loaded("depth").generate(
        GenerationRequest(
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            init_image=pixels,
            depth_map=depth[0],
            strength=0.7,
            steps=6,
            guidance_scale=7.5,
            latents=noise,
        ),
        noise={"image": nhwc(posterior)},
    )
    assert_images_close(ours.images, ref)


def test_x4_upscaler_equals_diffusers(folders, loaded):
    pixels, seed = image(12, 20), 2
    ref_pipe = diffusers.StableDiffusionUpscalePipeline.from_pretrained(folders["upscale"])
    ref = reference_images(
        ref_pipe, seed, image=Image.fromarray(pixels), noise_level=30, num_inference_steps=4, guidance_scale=7.5
    )
    low_res_noise, noise = draws(seed, (1, 3, 12, 20), (1, 4, 12, 20))  # the low-res image's noise, then the latents
    ours = loaded("upscale").generate(
        GenerationRequest(
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            init_image=pixels,
            noise_level=30,
            steps=4,
            guidance_scale=7.5,
            latents=noise,
        ),
        noise={"low_res": nhwc(low_res_noise)},
    )
    assert ours.images.shape == (1, 48, 80, 3)  # 4× the low-res image
    assert_images_close(ours.images, ref)


@pytest.mark.parametrize(
    "checkpoint,fields,message",
    [
        ("inpaint", dict(), "give init_image and mask_image"),
        ("inpaint", dict(init_image=np.zeros((16, 16, 3), np.uint8)), "give mask_image"),
        ("text", dict(init_image=np.zeros((16, 16, 3), np.uint8), mask_image=np.zeros((8, 8), np.uint8)), "same size"),
        ("text", dict(mask_image=np.zeros((16, 16), np.uint8)), "needs an init image"),
        ("text", dict(init_image=np.zeros((15, 16, 3), np.uint8)), "multiple of 2"),
        ("text", dict(init_image=np.zeros((16, 16, 3), np.uint8), strength=1.5), "strength"),
        ("text", dict(init_image=np.zeros((16, 16, 3), np.uint8), depth_map=np.zeros((4, 4))), "depth checkpoints"),
        ("text", dict(init_image=np.zeros((16, 16, 4), np.uint8)), "(H, W, 3) uint8"),
        ("depth", dict(init_image=np.zeros((16, 16, 3), np.uint8)), "give depth_map"),
        ("upscale", dict(), "low-resolution image"),
        ("upscale", dict(init_image=np.zeros((8, 8, 3), np.uint8), noise_level=351), "noise_level"),
        ("text", dict(noise_level=20), "x4 upscaler"),
    ],
)
def test_bad_image_requests_are_refused_with_the_fix(loaded, checkpoint, fields, message):
    with pytest.raises(InvalidRequest, match=message.replace("(", r"\(").replace(")", r"\)")):
        loaded(checkpoint).validate(GenerationRequest(prompt="a cat", steps=2, **fields))


# --- the same through the services: the gateway equals the in-process pipeline, pixel for pixel -----


class Served:
    """The three stages of a loaded pipeline behind in-process servers, and a gateway in front."""

    def __init__(self, pipe: StableDiffusion, folder):
        from sdmesh.services.serving import decoder_service, denoiser_service, gateway, server, text_encoder_service

        facts = denoiser_service.denoiser_facts(pipe.denoiser, folder)
        shapes = [(1, 16, 16)]
        services = [
            text_encoder_service.stage_service(text_encoder_service.TextEncoderService(pipe.text_encoder, "m"), shapes),
            denoiser_service.stage_service(
                denoiser_service.DenoiserService(pipe.denoiser, facts, "m", max_batch=2), shapes
            ),
            decoder_service.stage_service(decoder_service.DecoderService(pipe.decoder, "m"), shapes),
        ]
        self.stages = [server.StageServer(s).start() for s in services]
        pools = [
            gateway.ReplicaPool(name, [s.address]) for name, s in zip(("encoder", "denoiser", "decoder"), self.stages)
        ]
        for s in self.stages:
            s._set(1)  # SERVING without a warm-up: compiling on first use is fine here
        self.service = gateway.GatewayService(*pools)
        self.server, port = gateway.build_server(self.service, "127.0.0.1:0")
        self.server.start()
        self.address = f"127.0.0.1:{port}"

    def close(self) -> None:
        self.server.stop(0)
        for s in self.stages:
            s.stop(grace=0)


def png(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


GATEWAY_CASES = {
    "img2img": ("text", lambda: dict(init_image=image(32, 32), strength=0.7, sampler="euler")),
    "inpaint-blend": ("text", lambda: dict(init_image=image(32, 32), mask_image=np.tile(np.uint8([0, 255]), (32, 16)))),
    "inpaint": (
        "inpaint",
        lambda: dict(init_image=image(16, 16), mask_image=np.tile(np.uint8([0, 255]), (16, 8)), strength=0.8),
    ),
    "depth": ("depth", lambda: dict(init_image=image(16, 12), depth_map=RNG.random((20, 15)).astype(np.float32))),
    "upscale": ("upscale", lambda: dict(init_image=image(8, 12), noise_level=40)),
}


@pytest.mark.parametrize("case", list(GATEWAY_CASES))
def test_every_mode_through_the_gateway_equals_the_pipeline(folders, loaded, case):
    from sdmesh.client import Client

    checkpoint, make = GATEWAY_CASES[case]
    fields = make()
    pipe = loaded(checkpoint)
    expected = pipe.generate(
        GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, steps=3, seed=21, num_images=2, **fields)
    ).images
    served = Served(pipe, folders[checkpoint])
    try:
        wire = {k: png(v) if isinstance(v, np.ndarray) and v.dtype == np.uint8 else v for k, v in fields.items()}
        with Client(served.address) as client:
            result = client.generate(
                PROMPT, negative_prompt=NEGATIVE, steps=3, seed=21, num_images=2, timeout=120, **wire
            )
        got = np.stack([np.asarray(im) for im in result.images])
        np.testing.assert_array_equal(got, expected)
    finally:
        served.close()


def test_a_bad_image_through_the_gateway_is_invalid_argument(folders, loaded):
    import grpc

    from sdmesh.client import Client, GatewayError

    served = Served(loaded("inpaint"), folders["inpaint"])
    try:
        with Client(served.address) as client:
            for fields, message in (
                (dict(init_image=b"not a png"), "init_image"),
                (dict(init_image=png(image(16, 16))), "mask_image"),
            ):
                with pytest.raises(GatewayError) as caught:
                    client.generate(PROMPT, steps=2, timeout=60, **fields)
                assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and message in caught.value.message
    finally:
        served.close()
