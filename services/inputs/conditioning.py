"""What each image-conditioned diffusers pipeline does around its denoising loop, as pure functions.

One section per mode, each mirroring the diffusers code it names (parity-tested in
tests/test_conditioning.py). Arrays are NHWC; the UNet's extra input channels are appended
after the latents in the order the checkpoint was trained with.

    img2img (StableDiffusionImg2ImgPipeline; also depth2img):
        first, steps_run = img2img_start(steps, strength)     # run schedule indices [first, steps)
        x = add_noise(ᾱ, encode_image(...), noise, schedule.timesteps[first])
    inpainting (StableDiffusionInpaintPipeline):
        9-channel UNet: unet input = inpaint_unet_input(x, mask_latents(mask), masked_image_latents)
                        with masked_image_latents = encode_image(masked_image(image, mask))
        4-channel UNet: after every step x = blend_inpaint_latents(x, image_latents, noise, mask, ...)
    depth (StableDiffusionDepth2ImgPipeline, depth map given):
        unet input = depth_unet_input(x, depth_condition(depth, latent size))
    x4 upscaling (StableDiffusionUpscalePipeline):
        low_res = noise_low_res_image(image, noise, noise_level, low-res ᾱ)
        unet input = upscale_unet_input(x, low_res), class_labels = upscale_class_labels(noise_level, B)

Everything here is numpy (the JAX-free gateway prepares requests with it). The loop itself
(services/denoise.py) does the concatenation and the blend generically, per slot; the
in-loop functions here state what it must equal and are what the parity tests check.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from sdmesh.services.inputs.errors import InvalidRequest

# --------------------------------------------------------------------------- shared


def add_noise(alphas_cumprod: Any, x0: np.ndarray, noise: np.ndarray, timesteps: Any) -> np.ndarray:
    """Forward diffusion q(x_t | x_0) = √ᾱ_t·x0 + √(1−ᾱ_t)·noise: diffusers' `scheduler.add_noise`.

    `timesteps` is () or (B,) (one per sample); ᾱ is the scheduler's `alphas_cumprod` (T,) float32.
    """
    a = np.asarray(alphas_cumprod, np.float32)[np.asarray(timesteps)]  # () or (B,)
    a = a.reshape(a.shape + (1,) * (np.ndim(x0) - a.ndim))  # broadcast over H, W, C
    return np.sqrt(a) * x0 + np.sqrt(1.0 - a) * noise


# -------------------------------------------------------------------------- img2img


def img2img_start(steps: int, strength: float) -> tuple[int, int]:
    """(index of the first step to run, steps actually run) for a `steps`-step schedule at `strength`.

    StableDiffusionImg2ImgPipeline.get_timesteps: the run skips the first steps·(1 − strength) of
    the full schedule and starts from the image noised to the timestep it lands on, so the
    sampler keeps the full schedule's spacing (DDIM's step back is still T // steps).
    strength 1 runs every step (from the image noised to the first timestep, not from pure noise).
    """
    if not isinstance(strength, (int, float)) or not math.isfinite(strength) or not 0.0 <= strength <= 1.0:
        raise InvalidRequest(f"strength must be a number between 0 and 1, got {strength!r}")
    init_timestep = min(int(steps * strength), steps)  # int() truncates, as in diffusers
    first = max(steps - init_timestep, 0)
    if steps - first < 1:
        raise InvalidRequest(
            f"strength {strength} with {steps} steps runs no step (int(steps × strength) = 0); raise strength or steps"
        )
    return first, steps - first


# ----------------------------------------------------------------------- inpainting


def mask_latents(mask: np.ndarray, scale_factor: int) -> np.ndarray:
    """(N, H, W, 1) binarized mask → (N, H/f, W/f, 1): prepare_mask_latents' `F.interpolate(mask, size)`.

    torch's default "nearest" reads source index floor(dst · in/out) (float32 scale), clamped.
    """
    _, h, w, _ = mask.shape
    out_h, out_w = h // scale_factor, w // scale_factor

    def index(n_in: int, n_out: int) -> np.ndarray:
        scale = np.float32(n_in) / np.float32(n_out)
        return np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64), n_in - 1)

    return np.ascontiguousarray(mask[:, index(h, out_h)][:, :, index(w, out_w)])


def masked_image(images: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image with the area to repaint zeroed (grey in [-1, 1] space): `init_image * (mask_condition < 0.5)`.

    images (N, H, W, 3) in [-1, 1], mask (N, H, W, 1) in {0, 1}. VAE-encode the result for the
    9-channel UNet's masked-image latents.
    """
    return images * (mask < 0.5).astype(images.dtype)


def inpaint_unet_input(latents: np.ndarray, mask: np.ndarray, masked_image_latents: np.ndarray) -> np.ndarray:
    """9-channel UNet input: [latents (4), mask (1), masked-image latents (4)] along channels.

    The latents are the scheduler-scaled ones (`scale_model_input`, identity for DDIM); mask and
    masked-image latents are not scaled.
    """
    return np.concatenate([latents, mask.astype(latents.dtype), masked_image_latents.astype(latents.dtype)], axis=-1)


def inpaint_initial_latents(
    noise: np.ndarray, image_latents: np.ndarray | None, alphas_cumprod: Any, first_timestep: Any, strength: float
) -> np.ndarray:
    """StableDiffusionInpaintPipeline.prepare_latents: pure noise at strength 1 (init_noise_sigma is 1 for
    DDIM), else the image latents noised to the first timestep run. The same `noise` is reused by
    `blend_inpaint_latents`."""
    if strength == 1.0:
        return noise
    if image_latents is None:
        raise ValueError("strength < 1 starts from the image: image_latents are needed")
    return add_noise(alphas_cumprod, image_latents, noise, first_timestep)


def blend_inpaint_latents(
    latents: np.ndarray,
    image_latents: np.ndarray,
    noise: np.ndarray,
    mask: np.ndarray,
    alphas_cumprod: Any,
    next_timestep: np.ndarray,
    is_last: np.ndarray,
) -> np.ndarray:
    """4-channel (ordinary) checkpoints inpaint by overwriting the kept area after every step.

    The inpaint pipeline's loop, after `scheduler.step`: the known region becomes the image latents
    noised to the *next* step's timestep (un-noised after the last step), the repainted region
    (mask 1) keeps the sampler's latents: (1 − mask)·known + mask·latents.
    latents/image_latents/noise (B, h, w, 4), mask (B, h, w, 1) from `mask_latents`;
    next_timestep (B,) int, is_last (B,) bool: per slot, so slots may be at different steps.
    """
    noised = add_noise(alphas_cumprod, image_latents, noise, next_timestep)
    known = np.where(np.reshape(is_last, (-1, 1, 1, 1)), image_latents, noised)
    return (1 - mask) * known + mask * latents


# ---------------------------------------------------------------------------- depth


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """torch's `get_cubic_upsample_coefficients` (Keys' cubic convolution with A = −0.75): (n,) → (n, 4)."""

    def near(x):  # |x| ≤ 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def _bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float64 matrix of torch's bicubic resize along one axis (align_corners=False, no antialias)."""
    scale = np.float32(n_in) / np.float32(n_out)
    src = (scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)).astype(np.float32)
    floor = np.floor(src)
    weights = _cubic_weights((src - floor).astype(np.float32)).astype(np.float64)  # (n_out, 4)
    taps = np.clip(floor.astype(np.int64)[:, None] + np.arange(-1, 3), 0, n_in - 1)  # edge taps repeat the border
    matrix = np.zeros((n_out, n_in))
    np.add.at(matrix, (np.repeat(np.arange(n_out), 4), taps.ravel()), weights.ravel())
    return matrix


def bicubic_resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(N, H, W) → (N, h, w) float32, equal to `F.interpolate(x[:, None], size, mode="bicubic", align_corners=False)`.

    Separable: one (h, H) and one (w, W) matrix; within float32 rounding of torch (measured ≤ 2.5e-6
    abs on N(0,1) maps). Not `jax.image.resize("bicubic")`, which uses A = −0.5 and antialiases when
    shrinking: after the [-1, 1] normalisation it is 6e-4 off on a smooth 384² → 64² depth map, and
    O(1) off on a noisy one.
    """
    rows = _bicubic_matrix(x.shape[1], size[0])
    cols = _bicubic_matrix(x.shape[2], size[1])
    return np.einsum("ih,nhw,jw->nij", rows, np.asarray(x, np.float64), cols).astype(np.float32)


def depth_condition(depth: np.ndarray, latent_size: tuple[int, int]) -> np.ndarray:
    """Depth maps (N, H, W), any size and units → the depth UNet's extra channel (N, h, w, 1) in [-1, 1].

    StableDiffusionDepth2ImgPipeline.prepare_depth_map with `depth_map` given: bicubic resize to the
    latent size (height // f, width // f of the input image), then per map 2·(d − min)/(max − min) − 1.
    A flat map (max = min; diffusers would divide by zero) becomes 0 everywhere.
    """
    d = bicubic_resize(np.asarray(depth, np.float32), latent_size)
    lo = d.min(axis=(1, 2), keepdims=True)
    hi = d.max(axis=(1, 2), keepdims=True)
    span = np.where(hi > lo, hi - lo, np.float32(1))
    out = np.where(hi > lo, np.float32(2.0) * (d - lo) / span - np.float32(1.0), np.float32(0.0))
    return out.astype(np.float32)[..., None]


def depth_unet_input(latents: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """5-channel UNet input: [scheduler-scaled latents (4), depth (1)] along channels."""
    return np.concatenate([latents, depth.astype(latents.dtype)], axis=-1)


# ------------------------------------------------------------------------ upscaling

# The pipeline rewrites any other vae scaling_factor to this (with a deprecation warning).
UPSCALER_SCALING_FACTOR = 0.08333


def fix_upscaler_vae_config(config: dict[str, Any]) -> dict[str, Any]:
    """What StableDiffusionUpscalePipeline.__init__ does to the VAE config: scaling_factor is 0.08333."""
    return {**config, "scaling_factor": UPSCALER_SCALING_FACTOR}


def low_res_alphas_cumprod(low_res_scheduler_config: dict[str, Any]) -> np.ndarray:
    """ᾱ (T,) float32 of the checkpoint's `low_res_scheduler` (a DDPMScheduler): same betas → ᾱ rule as DDIM's."""
    from sdmesh.services.samplers import ddim  # numpy math; imported here so this module stays JAX-free (the gateway)

    return ddim.alphas_cumprod(ddim.DDIMConfig.from_json(low_res_scheduler_config))


def noise_low_res_image(images: np.ndarray, noise: np.ndarray, noise_level: Any, alphas_cumprod: Any) -> np.ndarray:
    """The low-res image (N, H, W, 3) in [-1, 1] noised to `noise_level`: `low_res_scheduler.add_noise`.

    The pipeline draws `noise` (shaped like the images) before the initial latents, once per input
    image; the noised image is then repeated for every image per prompt and both guidance halves.
    """
    return add_noise(alphas_cumprod, images, noise, noise_level)


def upscale_class_labels(noise_level: Any, batch: int) -> np.ndarray:
    """The UNet's class_labels: the integer noise level, one per sample (int32; diffusers: long)."""
    return np.broadcast_to(np.asarray(noise_level, np.int32), (batch,))


def upscale_unet_input(latents: np.ndarray, low_res: np.ndarray) -> np.ndarray:
    """7-channel UNet input: [scheduler-scaled latents (4), noised low-res image (3)]; both at the low-res size."""
    return np.concatenate([latents, low_res.astype(latents.dtype)], axis=-1)
