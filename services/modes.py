"""Image-conditioned generation: turn a request's images into the denoiser's per-image inputs (JAX-free).

    kind = model_kind(unet_in_channels, latent_channels, has_class_labels)   text | inpaint | depth | upscale
    inputs = prepare(kind, ..., encode=...)                                   → ModeInputs

The same function serves the in-process pipeline and the gateway: `encode(images, stream)`
is the VAE encoder (DecoderStage.encode_image in process, Decoder.EncodeImage over the wire),
so everything else here is numpy. What each mode means follows the diffusers pipeline it
is tested against (services/conditioning.py has the per-step pieces):

    text checkpoint + init image            img2img   (StableDiffusionImg2ImgPipeline), strength 0.8
    text checkpoint + init image + mask     inpaint by latent blending (StableDiffusionInpaintPipeline), strength 1
    9-channel checkpoint + image + mask     inpaint: mask + masked-image latents join the UNet input
    5-channel checkpoint + image + depth    depth2img (StableDiffusionDepth2ImgPipeline, depth map given), strength 0.8
    x4 upscaler + low-res image             noised low-res image joins the UNet input; noise level as class label
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from sdmesh.services import conditioning, images
from sdmesh.services.errors import InvalidRequest

DEFAULT_STRENGTH = {"img2img": 0.8, "inpaint": 1.0, "depth": 0.8}
DEFAULT_NOISE_LEVEL = 20  # StableDiffusionUpscalePipeline's default
UPSCALE_FACTOR = 4
# Posterior-sample streams of a request's seed: the init image's, then the masked image's.
IMAGE_STREAM, MASKED_IMAGE_STREAM = 0, 1


@dataclasses.dataclass(frozen=True)
class ModeInputs:
    """The denoiser's inputs beyond text-to-image, one row per image (NHWC), and the output size."""

    mode: str  # "text-to-image" | "img2img" | "inpaint" | "depth" | "upscale"
    height: int  # output pixels
    width: int
    latent_size: tuple[int, int]  # (h, w) of the latents the denoiser runs on
    init_latents: np.ndarray | None = None  # (N, h, w, C): start part-way from these
    strength: float = 1.0
    noise_at_full_strength: bool = False  # inpainting: strength 1 starts from pure noise
    extra: np.ndarray | None = None  # (N, h, w, E): joins the UNet input
    class_labels: np.ndarray | None = None  # (N,)
    blend_mask: np.ndarray | None = None  # (N, h, w, 1): 1 repaints


def model_kind(in_channels: int, latent_channels: int, has_class_labels: bool) -> str:
    """What a UNet is for, from its input channels: text (4), inpaint (9), depth (5), upscale (7 + noise level)."""
    if has_class_labels and in_channels == latent_channels + 3:
        return "upscale"
    if in_channels == latent_channels:
        return "text"
    if in_channels == 2 * latent_channels + 1:
        return "inpaint"
    if in_channels == latent_channels + 1:
        return "depth"
    raise InvalidRequest(f"a UNet with {in_channels} input channels for {latent_channels} latent channels is none of "
                         "text-to-image, inpainting, depth or x4 upscaling")


def _rows(a: np.ndarray, n: int) -> np.ndarray:
    """One image's (1, …) array repeated for each of the n images, as the pipelines repeat per prompt."""
    return np.repeat(a, n, axis=0)


def prepare(
    kind: str,
    *,
    rows: int,
    init_image: np.ndarray | None,
    mask_image: np.ndarray | None,
    depth_map: np.ndarray | None,
    strength: float | None,
    noise_level: int | None,
    scale_factor: int,
    encode: Callable[[np.ndarray, int], np.ndarray],
    seed: int,
    height: int | None = None,
    width: int | None = None,
    low_res_alphas: np.ndarray | None = None,
    max_noise_level: int = conditioning.DEFAULT_MAX_NOISE_LEVEL,
    low_res_noise: np.ndarray | None = None,
) -> ModeInputs:
    """Check the request's images against the model and build its ModeInputs.

    init_image (H, W, 3) uint8, mask_image (H, W) uint8 (white repaints), depth_map (H, W) float.
    `encode(images (1, H, W, 3) in [-1, 1], stream)` → scaled latents (1, h, w, C), drawing the
    posterior sample from `stream` of the request's seed. Raises InvalidRequest saying what to fix.
    """
    f = scale_factor
    if kind == "upscale":
        return _upscale(rows, init_image, mask_image, depth_map, strength, noise_level, seed, low_res_alphas,
                        max_noise_level, low_res_noise)
    if noise_level is not None:
        raise InvalidRequest("noise_level is for the x4 upscaler; this checkpoint is not one")
    if kind == "text" and init_image is None:
        for name, value in (("mask_image", mask_image), ("depth_map", depth_map), ("strength", strength)):
            if value is not None:
                raise InvalidRequest(f"{name} needs an init image (img2img/inpainting); give init_image too or drop it")
        return ModeInputs("text-to-image", height or 0, width or 0, (0, 0))
    if init_image is None:
        raise InvalidRequest(f"this is {'an inpainting' if kind == 'inpaint' else 'a depth'} checkpoint: give init_image"
                             f"{' and mask_image' if kind == 'inpaint' else ' and depth_map'}")
    h_img, w_img = init_image.shape[:2]
    images.check_size(h_img, w_img, multiple=f, what="init_image")
    for name, asked, got in (("height", height, h_img), ("width", width, w_img)):
        if asked and asked != got:
            raise InvalidRequest(f"{name} {asked} disagrees with init_image's {got}; the output has the init image's size")
    latent = (h_img // f, w_img // f)
    image = images.preprocess_image(init_image)  # (1, H, W, 3) in [-1, 1]
    inpainting = mask_image is not None or kind == "inpaint"
    mode = "inpaint" if inpainting else ("depth" if kind == "depth" else "img2img")
    strength = DEFAULT_STRENGTH[mode] if strength is None else float(strength)
    if not 0.0 < strength <= 1.0:
        raise InvalidRequest(f"strength must be in (0, 1], got {strength}")
    if kind == "depth" and depth_map is None:
        raise InvalidRequest("this is a depth checkpoint: give depth_map (a grayscale PNG or .npy), with init_image")
    if kind != "depth" and depth_map is not None:
        raise InvalidRequest("depth_map is for depth checkpoints (a 5-channel UNet); this one is not")
    if kind == "inpaint" and mask_image is None:
        raise InvalidRequest("this is an inpainting checkpoint: give mask_image (white repaints, black keeps)")
    if kind == "depth" and mask_image is not None:
        raise InvalidRequest("mask_image is for inpainting; a depth checkpoint takes init_image and depth_map")

    init_latents = _rows(encode(image, IMAGE_STREAM), rows)
    common = dict(height=h_img, width=w_img, latent_size=latent, init_latents=init_latents, strength=strength)
    if not inpainting:
        if kind == "depth":
            depth = np.asarray(depth_map, np.float32)
            depth = depth[None] if depth.ndim == 2 else depth
            extra = _rows(conditioning.depth_condition(depth[:1], latent), rows)
            return ModeInputs("depth", extra=extra, **common)
        return ModeInputs("img2img", **common)

    if mask_image.shape[:2] != (h_img, w_img):
        raise InvalidRequest(f"mask_image is {mask_image.shape[1]}×{mask_image.shape[0]} but init_image is {w_img}×{h_img}; "
                             "they must be the same size")
    mask = images.preprocess_mask(mask_image)  # (1, H, W, 1) in {0, 1}
    mask_lat = _rows(conditioning.mask_latents(mask, f), rows)
    if kind == "inpaint":  # the 9-channel UNet sees the mask and what is left of the image
        masked = encode(conditioning.masked_image(image, mask), MASKED_IMAGE_STREAM)
        extra = np.concatenate([mask_lat, _rows(masked, rows)], axis=-1)
        return ModeInputs("inpaint", noise_at_full_strength=True, extra=extra, **common)
    return ModeInputs("inpaint", noise_at_full_strength=True, blend_mask=mask_lat, **common)


def _upscale(rows, init_image, mask_image, depth_map, strength, noise_level, seed, alphas, max_level, given_noise) -> ModeInputs:
    if init_image is None:
        raise InvalidRequest("this is the x4 upscaler: give init_image, the low-resolution image to upscale")
    for name, value in (("mask_image", mask_image), ("depth_map", depth_map), ("strength", strength)):
        if value is not None:
            raise InvalidRequest(f"{name} does not apply to the x4 upscaler; drop it")
    level = conditioning.check_noise_level(DEFAULT_NOISE_LEVEL if noise_level is None else noise_level, max_level)
    h, w = init_image.shape[:2]
    if max(h, w) * UPSCALE_FACTOR > images.MAX_SIDE:
        raise InvalidRequest(f"init_image is {w}×{h}: upscaled 4× it would pass {images.MAX_SIDE} pixels; send a smaller one")
    low = images.preprocess_image(init_image)  # (1, h, w, 3) in [-1, 1]
    if alphas is not None:  # in process; over the wire the denoiser noises it (it has the low-res schedule)
        low = noise_low_res(low, level, seed, alphas, given_noise)
    return ModeInputs("upscale", height=h * UPSCALE_FACTOR, width=w * UPSCALE_FACTOR, latent_size=(h, w),
                      extra=_rows(low, rows), class_labels=np.full((rows,), level, np.float32))


def noise_low_res(low: np.ndarray, level: int, seed: int, alphas: np.ndarray, given: np.ndarray | None = None) -> np.ndarray:
    """The x4 upscaler's low-res images (N, h, w, 3) noised to `level` (its low_res_scheduler.add_noise).

    The noise is numpy from the seed, one draw shared by the N rows (the pipeline draws once per input
    image and repeats it per image), so the gateway's path and the in-process pipeline agree.
    """
    shape = (1,) + low.shape[1:]
    noise = given if given is not None else np.random.default_rng([seed, 5]).standard_normal(shape, np.float32)
    a = np.float32(alphas[level])
    return (np.sqrt(a) * low + np.sqrt(np.float32(1) - a) * noise.astype(np.float32)).astype(np.float32)
