"""Image-conditioned generation: a validated job's images → the denoiser's per-image inputs (JAX-free).

    inputs = prepare(job, facts, encode)          → ImageInputs (init latents, extra channels, class labels, blend mask)

`contract.validate` has already decided the job's mode and checked its images; this builds the
arrays. `encode(images, stream)` is the VAE encoder (the decoder stage in process,
Decoder.EncodeImage over the wire), so everything else here is numpy. What each mode means
follows the diffusers pipeline it is tested against (conditioning.py has the per-step pieces):

    img2img          init latents, start part-way at strength          (StableDiffusionImg2ImgPipeline)
    inpainting       text checkpoint: init latents + blend mask        (StableDiffusionInpaintPipeline, latent blending)
                     9-channel checkpoint: mask + masked-image latents join the UNet input
    depth            init latents + the normalised depth map as an extra channel (StableDiffusionDepth2ImgPipeline)
    upscaling        the low-res image joins the UNet input; its noise level is the class label
                     (StableDiffusionUpscalePipeline; the denoiser noises the image, `noise_low_res`)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from sdmesh.services.inputs import conditioning, images
from sdmesh.services.inputs.contract import Job, ModelFacts

# Posterior-sample streams of a request's seed: the init image's, then the masked image's.
IMAGE_STREAM, MASKED_IMAGE_STREAM = 0, 1


@dataclasses.dataclass(frozen=True)
class ImageInputs:
    """The denoiser's inputs beyond text-to-image, one row per image (NHWC)."""

    init_latents: np.ndarray | None = None  # (N, h, w, C): start part-way from these
    strength: float = 1.0
    extra: np.ndarray | None = None  # (N, h, w, E): joins the UNet input
    class_labels: np.ndarray | None = None  # (N,)
    blend_mask: np.ndarray | None = None  # (N, h, w, 1): 1 repaints


def _rows(a: np.ndarray, n: int) -> np.ndarray:
    """One image's (1, …) array repeated for each of the n images, as the pipelines repeat per prompt."""
    return np.repeat(a, n, axis=0)


def prepare(job: Job, facts: ModelFacts, encode: Callable[[np.ndarray, int], np.ndarray]) -> ImageInputs:
    """The denoiser's image inputs for a validated job.

    `encode(images (1, H, W, 3) in [-1, 1], stream)` → scaled latents (1, h, w, C), drawing the posterior
    sample from `stream` of the job's seed.
    """
    rows = job.images
    if job.mode == "text-to-image":
        return ImageInputs()
    image = images.preprocess_image(job.init_image)  # (1, H, W, 3) in [-1, 1]
    if job.mode == "upscaling":
        return ImageInputs(extra=_rows(image, rows), class_labels=np.full((rows,), job.noise_level, np.float32))
    init_latents = _rows(encode(image, IMAGE_STREAM), rows)
    if job.mode == "img2img":
        return ImageInputs(init_latents=init_latents, strength=job.strength)
    if job.mode == "depth":
        depth = job.depth_map[None] if job.depth_map.ndim == 2 else job.depth_map
        extra = _rows(conditioning.depth_condition(depth[:1], job.latent_size), rows)
        return ImageInputs(init_latents=init_latents, strength=job.strength, extra=extra)
    mask = images.preprocess_mask(job.mask_image)  # (1, H, W, 1) in {0, 1}
    mask_latents = _rows(conditioning.mask_latents(mask, facts.vae_scale_factor), rows)
    if facts.kind == "inpainting":  # the 9-channel UNet sees the mask and what is left of the image
        masked = encode(conditioning.masked_image(image, mask), MASKED_IMAGE_STREAM)
        extra = np.concatenate([mask_latents, _rows(masked, rows)], axis=-1)
        return ImageInputs(init_latents=init_latents, strength=job.strength, extra=extra)
    return ImageInputs(init_latents=init_latents, strength=job.strength, blend_mask=mask_latents)


def starts_from_pure_noise(kind: str, blend_mask: np.ndarray | None, strength: float) -> bool:
    """Inpainting (a 9-channel UNet, or latent blending) at strength 1 starts from pure noise, as
    StableDiffusionInpaintPipeline does; img2img and depth always start from the noised init latents."""
    return (blend_mask is not None or kind == "inpainting") and strength >= 1.0


def noise_low_res(
    low: np.ndarray, level: int, seed: int, alphas: np.ndarray, given: np.ndarray | None = None
) -> np.ndarray:
    """The x4 upscaler's low-res images (N, h, w, 3) noised to `level` (its low_res_scheduler.add_noise).

    The noise is numpy from the seed, one draw shared by the N rows (the pipeline draws once per input
    image and repeats it per image), so every path that runs the denoiser agrees.
    """
    shape = (1,) + low.shape[1:]
    noise = given if given is not None else np.random.default_rng([seed, 5]).standard_normal(shape, np.float32)
    a = np.float32(alphas[level])
    return (np.sqrt(a) * low + np.sqrt(np.float32(1) - a) * noise.astype(np.float32)).astype(np.float32)
