"""Denoiser.Denoise over gRPC: conditioning + initial noise → final latents, around `pipeline.DenoiserStage`.

The loop runs in compiled chunks of `chunk` steps (one program for every chunk, step
count and guidance value); after each chunk the stream carries Progress(step i of N),
and a cancelled call or one past its deadline stops at that boundary. Initial noise
from a seed is `DenoiserStage.noise(seed, …)`, and that seed also seeds the η stream,
as `StableDiffusion.generate` does; with given latents, `noise_seed` seeds it.
Latents are NCHW on the wire and NHWC inside.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from sdmesh.client.tensors import from_proto, to_proto
from sdmesh.services import checkpoint, server
from sdmesh.services.models.vae import VAEConfig
from sdmesh.services.pipeline import MAX_IMAGES, DenoiserStage, InvalidRequest
from sdmesh.services.weights import CheckpointError
from sdmesh.v1 import common_pb2, denoiser_pb2, denoiser_pb2_grpc

MAX_SIDE = 4096  # pixels, as StableDiffusion.validate
MAX_CONTEXT_LENGTH = 1024  # tokens per conditioning row; CLIP gives 77
GUIDED, UNGUIDED = "denoise", "denoise-unguided"  # the two programs: with and without an unconditional pass


@dataclasses.dataclass(frozen=True)
class DenoiserFacts:
    """What a request is checked against: the UNet's, the scheduler's and the VAE's numbers."""

    latent_channels: int
    context_dim: int  # the UNet's cross_attention_dim: D of the conditioning
    context_length: int  # L the text encoder gives (for warm-up; requests may differ)
    scale_factor: int  # image pixels per latent pixel (the VAE's)
    max_steps: int
    default_size: tuple[int, int] | None  # (height, width) from the UNet's sample_size
    prediction_type: str


def denoiser_facts(stage: DenoiserStage, folder: Path) -> DenoiserFacts:
    """Facts from the loaded UNet plus the VAE's and text encoder's config.json (their weights stay unread)."""
    f = VAEConfig.from_json(checkpoint.read_config(folder, "vae")).scale_factor
    try:
        length = int(checkpoint.read_config(folder, "text_encoder").get("max_position_embeddings", 77))
    except CheckpointError:  # a UNet-only folder: CLIP's length is the usual one
        length = 77
    sample = stage.unet.config.sample_size
    size = None if sample is None else ((sample, sample) if isinstance(sample, int) else tuple(sample))
    return DenoiserFacts(
        latent_channels=stage.latent_channels, context_dim=stage.unet.config.context_dim, context_length=length,
        scale_factor=f, max_steps=stage.max_steps,
        default_size=None if size is None else (size[0] * f, size[1] * f),
        prediction_type=stage.scheduler.prediction_type,
    )


@dataclasses.dataclass(frozen=True)
class DenoiseJob:
    cond: np.ndarray  # (N, L, D) float32
    uncond: np.ndarray | None  # (N, L, D) float32, or None: no classifier-free guidance
    latents: np.ndarray | None  # (N, h, w, C) float32 NHWC, or None: drawn from `seed`
    seed: int  # initial noise (when latents is None) and the η stream
    steps: int
    guidance_scale: float
    guidance_rescale: float
    eta: float
    height: int  # pixels
    width: int

    @property
    def program(self) -> str:
        return UNGUIDED if self.uncond is None else GUIDED


def _finite_tensor(t, name: str, ndim: int) -> np.ndarray:
    array = from_proto(t, name=name, dtype="float32", ndim=ndim)
    if not np.isfinite(array).all():
        raise InvalidRequest(f"{name} contains NaN or infinity")
    return array


def _finite_number(name: str, value: float, low: float, high: float) -> float:
    if not math.isfinite(value) or not low <= value <= high:
        raise InvalidRequest(f"{name} must be a finite number from {low:g} to {high:g}, got {value}")
    return float(value)


def denoise_job_from_proto(request: denoiser_pb2.DenoiseRequest, facts: DenoiserFacts) -> DenoiseJob:
    """Check a DenoiseRequest against the model; raises InvalidRequest (or TensorError) saying what to fix."""
    if not request.HasField("cond"):
        raise InvalidRequest("cond is missing: send the text encoder's conditioning, (N, L, D) float32")
    cond = _finite_tensor(request.cond, "cond", 3)
    n, length, dim = cond.shape
    if not 1 <= n <= MAX_IMAGES:
        raise InvalidRequest(f"cond has {n} rows (images); give 1 to {MAX_IMAGES}")
    if dim != facts.context_dim or not 1 <= length <= MAX_CONTEXT_LENGTH:
        raise InvalidRequest(f"cond has shape {list(cond.shape)}; this UNet needs (N, L, {facts.context_dim}) with L ≤ "
                             f"{MAX_CONTEXT_LENGTH} (is the text encoder from the same model?)")
    uncond = None
    if request.HasField("uncond"):
        uncond = _finite_tensor(request.uncond, "uncond", 3)
        if uncond.shape != cond.shape:
            raise InvalidRequest(f"uncond has shape {list(uncond.shape)} but cond has {list(cond.shape)}; they must match")

    steps = request.num_inference_steps
    if not 1 <= steps <= facts.max_steps:
        raise InvalidRequest(f"num_inference_steps must be from 1 to {facts.max_steps}, got {steps}")
    guidance_scale = _finite_number("guidance_scale", request.guidance_scale, -1000.0, 1000.0)
    guidance_rescale = _finite_number("guidance_rescale", request.guidance_rescale, 0.0, 1.0)
    eta = _finite_number("eta", request.eta, 0.0, 1000.0)

    f, c = facts.scale_factor, facts.latent_channels
    if request.WhichOneof("init") == "latents":
        given = _finite_tensor(request.latents, "latents", 4)  # (N, C, h, w)
        if given.shape[0] != n or given.shape[1] != c or min(given.shape[2:]) < 1 or max(given.shape[2:]) * f > MAX_SIDE:
            raise InvalidRequest(f"latents have shape {list(given.shape)}; need NCHW ({n}, {c}, h, w) with h, w from 1 to "
                                 f"{MAX_SIDE // f} ({n} rows as cond, {c} latent channels)")
        height, width = given.shape[2] * f, given.shape[3] * f
        for name, asked, got in (("height", request.height, height), ("width", request.width, width)):
            if asked and asked != got:
                raise InvalidRequest(f"{name} {asked} disagrees with the latents' {got // f} × {f} = {got} pixels; send 0 or {got}")
        latents = np.ascontiguousarray(given.transpose(0, 2, 3, 1))  # NCHW → NHWC
        return DenoiseJob(cond, uncond, latents, request.noise_seed, steps, guidance_scale, guidance_rescale, eta, height, width)
    if request.WhichOneof("init") != "seed":
        raise InvalidRequest("give the initial noise: a seed, or latents (N, C, H/f, W/f)")
    height, width = request.height, request.width
    if not height or not width:
        if facts.default_size is None:
            raise InvalidRequest("this UNet's config names no sample_size, so there is no default size: give height and width")
        height, width = height or facts.default_size[0], width or facts.default_size[1]
    for name, v in (("height", height), ("width", width)):
        if v % f or not f <= v <= MAX_SIDE:
            raise InvalidRequest(f"{name} must be a multiple of {f} from {f} to {MAX_SIDE} for this model, got {v}")
    return DenoiseJob(cond, uncond, None, request.seed, steps, guidance_scale, guidance_rescale, eta, height, width)


def progress_to_proto(done: int, total: int) -> denoiser_pb2.DenoiseEvent:
    return denoiser_pb2.DenoiseEvent(progress=common_pb2.Progress(stage="denoise", step=done, total_steps=total))


def latents_to_proto(latents_nhwc: Any) -> denoiser_pb2.DenoiseEvent:
    return denoiser_pb2.DenoiseEvent(latents=to_proto(np.asarray(latents_nhwc, np.float32).transpose(0, 3, 1, 2)))


class DenoiserService(denoiser_pb2_grpc.DenoiserServicer):
    def __init__(self, stage: DenoiserStage, facts: DenoiserFacts, model: str, chunk: int | None = None):
        self.stage, self.facts, self.model, self.chunk = stage, facts, model, chunk
        self.compiled: set[tuple[str, int, int, int]] = set()  # (program, batch, height, width)

    def run(self, job: DenoiseJob, active: Callable[[], bool] = lambda: True) -> Iterator[tuple[int, Any]]:
        """(steps done, latents NHWC) after each chunk; stops before the next chunk once `active()` is false."""
        f = self.facts.scale_factor
        if job.latents is None:
            latents = self.stage.noise(job.seed, (job.cond.shape[0], job.height // f, job.width // f, self.facts.latent_channels))
        else:
            latents = jnp.asarray(job.latents)
        uncond = None if job.uncond is None else jnp.asarray(job.uncond)
        chunks = self.stage.run(latents, jnp.asarray(job.cond), uncond, steps=job.steps, guidance_scale=job.guidance_scale,
                                guidance_rescale=job.guidance_rescale, eta=job.eta, seed=job.seed, chunk=self.chunk)
        for done, latents, _ in chunks:
            self.compiled.add((job.program, job.cond.shape[0], job.height, job.width))
            yield done, latents
            if done < job.steps and not active():
                chunks.close()
                return

    def Denoise(self, request, context):
        job = denoise_job_from_proto(request, self.facts)
        latents = None
        for done, latents in self.run(job, context.is_active):
            yield progress_to_proto(done, job.steps)
        if context.is_active():
            yield latents_to_proto(latents)

    def ModelInfo(self, request, context):
        devices, mesh = server.device_facts(self.stage.mesh)
        facts = self.facts
        info = {"latent_channels": facts.latent_channels, "vae_scale_factor": facts.scale_factor,
                "hidden_size": facts.context_dim, "max_length": facts.context_length, "max_steps": facts.max_steps,
                "prediction_type": facts.prediction_type, "chunk_steps": self.chunk or 0, "max_images": MAX_IMAGES}
        if facts.default_size is not None:
            info["default_height"], info["default_width"] = facts.default_size
        return common_pb2.ModelInfo(
            service="Denoiser", model=self.model, weights_dtype=self.stage.options.weights_dtype,
            activations_dtype=self.stage.options.activations_dtype, devices=devices, mesh=mesh,
            compiled_shapes=[common_pb2.CompiledShape(program=p, batch=b, height=h, width=w)
                             for p, b, h, w in sorted(self.compiled)],
            facts={k: str(v) for k, v in info.items()},
        )

    def warm_up(self, shapes: list[tuple[int, int, int]]) -> None:
        """Compile the guided program (and the noise draw) for each (batch, height, width): one step each."""
        for batch, height, width in shapes:
            cond = np.zeros((batch, self.facts.context_length, self.facts.context_dim), np.float32)
            job = DenoiseJob(cond, cond, None, 0, 1, 7.5, 0.0, 0.0, height, width)
            for _ in self.run(job):
                pass


def default_shapes(facts: DenoiserFacts) -> list[tuple[int, int, int]]:
    if facts.default_size is None:
        raise InvalidRequest("this UNet's config names no sample_size: give --shapes BATCHxHEIGHTxWIDTH")
    return [(1, *facts.default_size)]


def message_bytes(facts: DenoiserFacts, shapes: list[tuple[int, int, int]]) -> int:
    """The largest Denoise request at these sizes: cond + uncond + latents, float32, for the most images any
    request may carry (MAX_IMAGES), so a valid request is never refused for its size by gRPC."""
    f = facts.scale_factor
    return max(MAX_IMAGES * (2 * facts.context_length * facts.context_dim + facts.latent_channels * (h // f) * (w // f)) * 4
               for _, h, w in shapes)


def stage_service(service: DenoiserService, shapes: list[tuple[int, int, int]]) -> server.StageService:
    f = service.facts.scale_factor
    for b, h, w in shapes:
        if h % f or w % f or max(h, w) > MAX_SIDE or b > MAX_IMAGES:
            raise InvalidRequest(f"--shapes {b}x{h}x{w}: height and width must be multiples of {f} up to {MAX_SIDE}, batch ≤ {MAX_IMAGES}")
    return server.StageService(
        name="sdmesh.v1.Denoiser", servicer=service, add_to_server=denoiser_pb2_grpc.add_DenoiserServicer_to_server,
        device_methods=frozenset({"Denoise"}), warm_up=lambda: service.warm_up(shapes),
        max_message_bytes=message_bytes(service.facts, shapes),
    )


def main(args: Any) -> int:
    shapes = server.parse_shapes(args.shapes)  # before loading: a typo should not cost a model load
    folder, options, load = server.load_setup(args)
    stage = DenoiserStage.load(folder, options, load)
    facts = denoiser_facts(stage, folder)
    shapes = shapes or default_shapes(facts)
    service = DenoiserService(stage, facts, args.model, chunk=args.chunk_steps)
    return server.serve(stage_service(service, shapes), host=args.host, port=args.port, max_queue=args.max_queue)
