"""Stable Diffusion in one process: the three stages (services/engine/stages.py) run by the one chain.

    pipe = StableDiffusion.load("models/tiny-sd2")
    result = pipe.generate(GenerationRequest(prompt="a cat", steps=20, seed=0))
    result.images      # (N, H, W, 3) uint8;  result.timings: compile / encode / encode_image / denoise / decode / total
    pipe.generate(GenerationRequest(..., preview_every=5), preview=lambda step, total, jpeg: ...)   live previews

Requests are checked by `contract.validate` and run by `chain.generate`, as the gateway runs them
over gRPC; here the chain's stage calls are direct calls of the loaded stages.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from sdmesh.services import chain
from sdmesh.services.checkpoints import checkpoint
from sdmesh.services.checkpoints.weights import CheckpointError
from sdmesh.services.engine.stages import (
    DecoderStage,
    DenoiserStage,
    LoadOptions,
    RuntimeOptions,
    TextEncoderStage,
    enable_compilation_cache,
    preview_jpeg,
)
from sdmesh.services.inputs import contract, modes
from sdmesh.services.inputs.contract import DenoiseJob, GenerationRequest, Job, ModelFacts
from sdmesh.services.inputs.errors import InvalidRequest
from sdmesh.services.models import unet as un

__all__ = ["GenerationRequest", "GenerationResult", "RuntimeOptions", "StableDiffusion"]


@dataclasses.dataclass
class GenerationResult:
    images: np.ndarray  # (N, H, W, 3) uint8
    seed: int
    truncation_notes: list[str]  # one line per prompt cut at the tokenizer's limit
    timings: dict[str, float]  # seconds: compile, encode, encode_image, denoise, decode, total


class StableDiffusion:
    """The three stages in one process."""

    def __init__(self, text_encoder: TextEncoderStage, denoiser: DenoiserStage, decoder: DecoderStage):
        if text_encoder.hidden_size != denoiser.unet.config.context_dim:
            raise CheckpointError(
                f"the text encoder's hidden_size ({text_encoder.hidden_size}) differs from the UNet's "
                f"cross_attention_dim ({denoiser.unet.config.context_dim}); "
                "the UNet does not belong with this text encoder"
            )
        self.text_encoder, self.denoiser, self.decoder = text_encoder, denoiser, decoder
        self.facts: ModelFacts = denoiser.facts(
            vae_scale_factor=decoder.scale_factor, max_length=text_encoder.tokenizer.max_length
        )

    @classmethod
    def load(
        cls,
        model: str,
        *,
        revision: str | None = None,
        variant: str | None = None,
        unet_checkpoint: str | None = None,
        allow_pickle: bool = False,
        config: str | None = None,
        tokenizer: str | None = None,
        prediction_type: str | None = None,
        original_config: str | None = None,
        lora_dir: str | Path | None = None,
        max_adapters: int = LoadOptions.max_adapters,
        embeddings_dir: str | Path | None = None,
        controlnets: Sequence[tuple[str, str | Path]] = (),
        options: RuntimeOptions = RuntimeOptions(),
    ) -> StableDiffusion:
        """`model`: a diffusers folder, a Hub id, or a single-file checkpoint (.safetensors; .ckpt with
        `allow_pickle`), which `config` (a diffusers folder or Hub id), `original_config` (a latent-diffusion
        inference YAML such as v2-inference-v.yaml), `tokenizer` and `prediction_type` can pin.
        `lora_dir`: LoRA files requests name by stem (`GenerationRequest.loras`, `<lora:NAME:W>`), at most
        `max_adapters` on the device at once; `embeddings_dir`: textual-inversion embeddings prompts name;
        `controlnets`: (name, diffusers ControlNet folder or Hub id) pairs, which requests name in
        `GenerationRequest.controls`."""
        if options.jax_cache_dir:
            enable_compilation_cache(options.jax_cache_dir)
        folder = checkpoint.resolve(
            model, revision=revision, variant=variant, config=config, tokenizer=tokenizer,
            prediction_type=prediction_type, original_config=original_config, allow_pickle=allow_pickle,
        )  # fmt: skip
        load = LoadOptions(
            variant=variant, allow_pickle=allow_pickle, unet_checkpoint=unet_checkpoint,
            lora_dir=None if lora_dir is None else Path(lora_dir), max_adapters=max_adapters,
            embeddings_dir=None if embeddings_dir is None else Path(embeddings_dir),
            controlnets=tuple((name, Path(path)) for name, path in controlnets),
        )  # fmt: skip
        return cls(
            TextEncoderStage.load(folder, options, load),
            DenoiserStage.load(folder, options, load),
            DecoderStage.load(folder, options, load),
        )

    @property
    def unet(self) -> un.UNet2DConditionModel:
        return self.denoiser.unet

    @property
    def vae_scale_factor(self) -> int:
        return self.decoder.scale_factor

    @property
    def default_size(self) -> tuple[int, int]:
        """(height, width) from the UNet's sample_size, as diffusers' pipeline defaults them."""
        if self.facts.default_size is None:
            raise InvalidRequest(
                "this UNet's config names no sample_size, so there is no default size: give height and width"
            )
        return self.facts.default_size

    def validate(self, request: GenerationRequest) -> Job:
        """Check a request before any work (the contract, then the sampler's plan); raises InvalidRequest."""
        job = contract.validate(request, self.facts)
        self.denoiser.check_plan(job.steps, sampler=job.sampler, eta=job.eta, strength=job.strength)
        return job

    def generate(
        self,
        request: GenerationRequest,
        progress: Callable[[int, int], None] | None = None,
        chunk: int | None = None,
        noise: dict[str, np.ndarray] | None = None,
        preview: Callable[[int, int, bytes], None] | None = None,
    ) -> GenerationResult:
        """Text (and images) → images. `progress(step, total)` is called between compiled chunks of `chunk` steps.

        With `request.preview_every` k > 0, `preview(step, total, JPEG bytes)` gets the first image's preview after
        each chunk that passed a multiple of k steps, as the Denoiser service sends them (the same bytes for the
        same chunking; `chunk` defaults to the service's DEFAULT_CHUNK_STEPS then).

        `noise` supplies draws that otherwise come from the seed, to reproduce another implementation's:
        "image" / "masked_image" (posterior samples, NHWC like the latents) and "low_res" (the x4 upscaler's).
        """
        job = self.validate(request)
        t0 = time.perf_counter()
        stages = InProcessStages(self, chunk=chunk, noise=noise or {})
        result = None
        for event in chain.generate(stages, job, self.facts):
            if isinstance(event, chain.Generated):
                result = event
            elif event.stage == "denoise":
                if progress is not None:
                    progress(event.step, event.total_steps)
                if preview is not None and event.preview:
                    preview(event.step, event.total_steps, event.preview)
        assert result is not None, "the chain ended without a result"
        timings = {name: stages.seconds[name] - stages.compile_seconds[name] for name in stages.seconds}
        timings["compile"] = sum(stages.compile_seconds.values())
        timings["total"] = time.perf_counter() - t0
        return GenerationResult(images=result.images, seed=result.seed, truncation_notes=result.truncation_notes,
                                timings=timings)  # fmt: skip


class InProcessStages:
    """`chain.Stages` over the loaded stages: direct calls, each timed (wall and compile seconds)."""

    STAGES = ("encode", "encode_image", "denoise", "decode")

    def __init__(self, pipe: StableDiffusion, *, chunk: int | None, noise: dict[str, np.ndarray]):
        self.pipe, self.chunk, self.noise = pipe, chunk, noise
        self.seconds = dict.fromkeys(self.STAGES, 0.0)
        self.compile_seconds = dict.fromkeys(self.STAGES, 0.0)

    def _took(self, stage: str, t0: float, compile_s: float) -> None:
        self.seconds[stage] += time.perf_counter() - t0
        self.compile_seconds[stage] += compile_s

    def encode(
        self, prompts: list[str], negative_prompts: list[str] | None, loras: Sequence[tuple[str, float]] = ()
    ) -> chain.Encoded:
        t0 = time.perf_counter()
        hidden, removed, compile_s = self.pipe.text_encoder.encode(prompts + (negative_prompts or []), loras)
        hidden = np.asarray(hidden, np.float32)
        self._took("encode", t0, compile_s)
        p = len(prompts)
        truncations = [chain.Truncation(row % p, text, row >= p) for row, text in enumerate(removed) if text]
        return chain.Encoded(cond=hidden[:p], uncond=hidden[p:] if negative_prompts is not None else None,
                             truncations=truncations)  # fmt: skip

    def encode_image(self, images: np.ndarray, seed: int, stream: int) -> np.ndarray:
        t0 = time.perf_counter()
        given = self.noise.get("image" if stream == modes.IMAGE_STREAM else "masked_image")
        latents, compile_s = self.pipe.decoder.encode_image(images, seed=seed, stream=stream, noise=given)
        self._took("encode_image", t0, compile_s)
        return latents

    def denoise(self, job: DenoiseJob) -> Generator[chain.Progress, None, np.ndarray]:
        denoiser, facts = self.pipe.denoiser, self.pipe.facts
        chunk, previews = self.chunk, []
        if job.preview_every:
            job = dataclasses.replace(job, preview_projection=self.latent_preview())
            chunk = chunk or contract.DEFAULT_CHUNK_STEPS  # as the Denoiser service chunks: the same previews
        t0, compile_total = time.perf_counter(), 0.0
        denoiser.check(job, facts)
        slots = denoiser.job_slots(job, facts, low_res_noise=self.noise.get("low_res"))
        projection = job.preview_projection or contract.LatentPreview.fallback(facts.latent_channels)
        final: Any = None
        for done, latents, compile_s in denoiser.run_slots(
            slots, chunk=chunk, preview_every=job.preview_every,
            preview=lambda _, x0: previews.append(preview_jpeg(x0, projection)),
        ):  # fmt: skip
            compile_total += compile_s
            final = latents if latents is not None else final
            yield chain.Progress("denoise", done, slots[0].steps, previews.pop() if previews else b"")
        self._took("denoise", t0, compile_total)
        return final

    def latent_preview(self) -> contract.LatentPreview:
        """The decoder's preview map: fitted on the first call (a few decodes), counted as decode compile time."""
        t0 = time.perf_counter()
        projection = self.pipe.decoder.latent_preview()
        self._took("decode", t0, time.perf_counter() - t0)
        return projection

    def decode(self, latents: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        images, compile_s = self.pipe.decoder.decode(jnp.asarray(latents))
        self._took("decode", t0, compile_s)
        return images
