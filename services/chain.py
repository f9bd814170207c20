"""The generation chain, written once: encode → (encode image) → denoise → decode, over a small stage protocol.

    for event in generate(stages, job, facts):   Progress after each stage (and each denoiser chunk), then Generated

`stages` is anything with the four calls of `Stages`: the in-process stages (`pipeline.StableDiffusion`)
and the gateway's replica pools (`serving.gateway`) are its two implementations, so a request and
seed give the same image in one process and through the services. What the chain fixes, and so
both paths share: the encoder sees the prompts and, when guided, the negatives in one call
(prompts first); each prompt's rows repeat num_images times; the init image's latents come from
the decoder's encoder with the request's seed (`modes.prepare`); the denoiser draws the initial
noise from the seed unless latents are given. JAX-free: arrays cross it as numpy, NHWC.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Generator, Iterator, Sequence
from typing import NamedTuple, Protocol

import numpy as np

from sdmesh.services.inputs import control, modes
from sdmesh.services.inputs.contract import DenoiseJob, Job, ModelFacts


class Progress(NamedTuple):
    stage: str  # "encode", "denoise", "decode"
    step: int  # steps done
    total_steps: int
    preview: bytes = b""  # denoise, when the job asked (preview_every): a JPEG of the first image's x̂₀


class Truncation(NamedTuple):
    prompt_index: int
    removed_text: str  # what the tokenizer cut off, which the model did not see
    negative: bool


@dataclasses.dataclass(frozen=True)
class Encoded:
    cond: np.ndarray  # (P, L, D) float32, one row per prompt
    uncond: np.ndarray | None  # (P, L, D), the negative prompts' rows; None when not guided
    truncations: list[Truncation]


@dataclasses.dataclass(frozen=True)
class Generated:
    images: np.ndarray  # (N, H, W, 3) uint8
    seed: int
    truncation_notes: list[str]  # one line per prompt cut at the text encoder's limit


class Stages(Protocol):
    """The four calls the chain makes; arrays are numpy, latents NHWC."""

    def encode(
        self, prompts: list[str], negative_prompts: list[str] | None, loras: Sequence[tuple[str, float]] = ()
    ) -> Encoded:
        """Prompts (and, when given, their negatives) in one encoder call, under `loras` (name, text-encoder weight)."""
        ...

    def encode_image(self, images: np.ndarray, seed: int, stream: int) -> np.ndarray:
        """Images (N, H, W, 3) float32 in [-1, 1] → scaled latents (N, h, w, C); the posterior sample from `stream`
        of `seed`."""
        ...

    def denoise(self, job: DenoiseJob) -> Generator[Progress, None, np.ndarray]:
        """Yields progress (with previews when job.preview_every asks; the stages bring the latent → RGB map);
        returns the final latents (N, h, w, C)."""
        ...

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents (N, h, w, C) → (N, H, W, 3) uint8 images."""
        ...


def generate(stages: Stages, job: Job, facts: ModelFacts) -> Iterator[Progress | Generated]:
    """Run a validated job through the stages: progress events, then the Generated result."""
    negatives = list(job.negative_prompts) if job.guided else None
    encoded = stages.encode(list(job.prompts), negatives, [(c.name, c.text_encoder_scale) for c in job.loras])
    yield Progress("encode", 1, 1)
    n = job.num_images
    cond = np.repeat(encoded.cond, n, axis=0)  # each prompt's row num_images times: (P·n, L, D)
    uncond = None if encoded.uncond is None else np.repeat(encoded.uncond, n, axis=0)

    def encode_image(images: np.ndarray, stream: int) -> np.ndarray:
        return stages.encode_image(images, job.seed, stream)

    image = modes.prepare(job, facts, encode_image)
    latents = None if job.latents is None else np.ascontiguousarray(job.latents.transpose(0, 2, 3, 1))  # NCHW → NHWC
    denoise_job = DenoiseJob(
        cond=cond, uncond=uncond, latents=latents, seed=job.seed, steps=job.steps, guidance_scale=job.guidance_scale,
        guidance_rescale=job.guidance_rescale, guidance_cutoff=job.guidance_cutoff, eta=job.eta, height=job.height,
        width=job.width, sampler=job.sampler,
        priority=job.priority, init_latents=image.init_latents, strength=image.strength, extra=image.extra,
        blend_mask=image.blend_mask, class_labels=image.class_labels, preview_every=job.preview_every,
        loras=tuple((c.name, c.unet_scale) for c in job.loras),
        controls=tuple(control.control_input(c, job.height, job.width) for c in job.controls),
    )  # fmt: skip
    final = yield from stages.denoise(denoise_job)
    images = stages.decode(final)
    yield Progress("decode", 1, 1)
    yield Generated(images=images, seed=job.seed, truncation_notes=truncation_notes(encoded.truncations))


def truncation_notes(truncations: list[Truncation]) -> list[str]:
    return [
        f"the {'negative ' if t.negative else ''}prompt{f' {t.prompt_index}' if t.prompt_index else ''} was cut at "
        f"the text encoder's limit (13 chunks of 75 tokens); dropped: {t.removed_text!r}"
        for t in truncations
    ]
