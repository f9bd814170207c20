"""Denoiser.Denoise over gRPC: conditioning + initial noise → final latents, with step-level continuous batching.

Each call is decoded (`wire.denoise_job_from_proto`), checked against the model
(`DenoiserStage.check`: the contract's rules, then the sampler's plan) and handed to the
`ContinuousBatcher`, which runs it in a shared running batch; after each chunk its stream
carries Progress(step i of N), then the final latents. At most `max_queue` requests wait;
the next gets RESOURCE_EXHAUSTED at once. With preview_every, some progress events carry a JPEG of
the first image's x̂₀ under the request's latent → RGB map (`stages.preview_jpeg`), encoded here,
on the call's own thread, not on the device thread.

Initial noise from a seed is `DenoiserStage.noise(seed, …)`, and that seed also seeds the
η stream, as the in-process pipeline does; with given latents, `noise_seed` seeds it.
Latents are NCHW on the wire and NHWC inside.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from sdmesh.services.checkpoints import checkpoint
from sdmesh.services.checkpoints.weights import CheckpointError
from sdmesh.services.engine.stages import DenoiserStage, LoadOptions, _unet_source, preview_jpeg
from sdmesh.services.inputs import contract
from sdmesh.services.inputs.contract import DenoiseJob, ModelFacts
from sdmesh.services.inputs.errors import InvalidRequest
from sdmesh.services.inputs.tokenizer import max_chunks
from sdmesh.services.models.vae import VAEConfig
from sdmesh.services.serving import server, wire
from sdmesh.services.serving.continuous_batching import ContinuousBatcher
from sdmesh.services.serving.metrics import StageMetrics
from sdmesh.v1 import common_pb2, denoiser_pb2, denoiser_pb2_grpc
from sdmesh.v1.tensors import to_proto


def denoiser_facts(stage: DenoiserStage, folder: Path) -> ModelFacts:
    """The stage's facts, with the VAE factor and text length from their config.json (their weights stay unread)."""
    f = VAEConfig.from_json(checkpoint.read_config(folder, "vae")).scale_factor
    try:
        length = int(checkpoint.read_config(folder, "text_encoder").get("max_position_embeddings", 77))
    except CheckpointError:  # a UNet-only folder: CLIP's length is the usual one
        length = 77
    return stage.facts(vae_scale_factor=f, max_length=length)


def hashed_files(folder: Path, load: LoadOptions) -> list[Path]:
    """What ModelInfo.model_hash hashes: the single file the model was converted from (A1111 hashes the file it
    loads, so the hash is the one A1111 users know), else the UNet's weight files as `DenoiserStage.load` reads
    them (--unet-checkpoint's when given)."""
    original = checkpoint.converted_from(folder)
    if load.unet_checkpoint is None and original is not None and original.is_file():
        return [original]
    return _unet_source(folder, load.unet_checkpoint, load.variant, load.allow_pickle)[1]


def progress_to_proto(done: int, total: int, preview: bytes = b"") -> denoiser_pb2.DenoiseEvent:
    return denoiser_pb2.DenoiseEvent(
        progress=common_pb2.Progress(stage="denoise", step=done, total_steps=total, preview=preview)
    )


def latents_to_proto(latents_nhwc: Any) -> denoiser_pb2.DenoiseEvent:
    return denoiser_pb2.DenoiseEvent(latents=to_proto(wire.nchw(latents_nhwc)))


class DenoiserService(denoiser_pb2_grpc.DenoiserServicer):
    def __init__(self, stage: DenoiserStage, facts: ModelFacts, model: str, chunk: int | None = None, *,
                 max_batch: int = contract.DEFAULT_MAX_BATCH, max_queue: int = contract.DEFAULT_MAX_QUEUE,
                 buckets: tuple[int, ...] | None = None, metrics: Any = None, policy: str = "continuous",
                 sizes: set[tuple[int, int]] | None = None, budget: contract.WorkBudget | None = None,
                 hashed_files: list[Path] | None = None):  # fmt: skip
        """sizes: with --strict-shapes, the only (height, width) served; None compiles any other size on first use.
        budget: what one request may ask for (--max-work, --max-side); None: the model's defaults.
        hashed_files: what `hashed_files` says, hashed once here for ModelInfo.model_hash
        (cached on disk, so a restart does not reread them); None: no hash."""
        self.stage, self.facts, self.model, self.sizes = stage, facts, model, sizes
        self.model_hash = checkpoint.model_hash(hashed_files) if hashed_files else ""
        self.budget = budget or contract.WorkBudget.for_model(facts)
        self.chunk = chunk or contract.DEFAULT_CHUNK_STEPS
        powers = {b for b in (1, 2, 4, 8, 16, 32, 64) if b <= max_batch}
        buckets = tuple(sorted(set(buckets or ()) | powers | {max_batch}))
        self.batcher = ContinuousBatcher(stage, facts, chunk=self.chunk, max_batch=max_batch, max_queue=max_queue,
                                         buckets=buckets, metrics=metrics, policy=policy)  # fmt: skip

    @property
    def compiled(self) -> set[tuple[str, int, int, int]]:
        return self.batcher.compiled

    def run(
        self, job: DenoiseJob, active: Callable[[], bool] = lambda: True
    ) -> Iterator[tuple[int, int, np.ndarray | None, bytes]]:
        """(steps done, steps in all, None, preview JPEG or b"") after each chunk, then (total, total, final latents
        NHWC, b""); cancels the request once `active()` is false."""
        projection = job.preview_projection or contract.LatentPreview.fallback(self.facts.latent_channels)
        ticket = self.batcher.submit(job)
        try:
            while True:
                try:
                    event = ticket.events.get(timeout=0.05)
                except queue.Empty:
                    if not active():
                        return
                    continue
                if event[0] == "latents":
                    yield ticket.total, ticket.total, event[1], b""
                    return
                if event[0] == "error":
                    raise event[1]
                done, total, x0 = event
                yield done, total, None, b"" if x0 is None else preview_jpeg(x0, projection)
                if not active():
                    return
        finally:
            self.batcher.cancel(ticket)  # a no-op once finished; frees the slots of a call that went away

    def Denoise(self, request, context):
        job = wire.denoise_job_from_proto(request, self.facts)
        self.stage.check(job, self.facts)  # before it joins a batch: a bad call must not fail its batch-mates
        server.check_size(job.height, job.width, self.sizes)
        f = self.facts.vae_scale_factor
        contract.check_work(
            job.images, job.steps, job.height, job.width, (job.height // f, job.width // f), self.budget
        )
        latents = None
        for done, total, latents, preview in self.run(job, context.is_active):
            if latents is None:
                yield progress_to_proto(done, total, preview)
        if context.is_active() and latents is not None:
            yield latents_to_proto(latents)

    def ModelInfo(self, request, context):
        devices, mesh = server.device_facts(self.stage.mesh)
        batcher = self.batcher
        return common_pb2.ModelInfo(
            service="Denoiser", model=self.model, weights_dtype=self.stage.options.weights_dtype,
            activations_dtype=self.stage.options.activations_dtype, devices=devices, mesh=mesh,
            compiled_shapes=[common_pb2.CompiledShape(program=p, batch=b, height=h, width=w)
                             for p, b, h, w in sorted(self.compiled)],
            model_facts=wire.facts_to_proto(self.facts),
            batching=common_pb2.Batching(policy=batcher.policy, max_batch=batcher.max_batch,
                                         buckets=list(batcher.buckets), chunk_steps=self.chunk),
            denoiser_load=common_pb2.DenoiserLoad(running_slots=batcher.running_slots,
                                                  waiting_requests=batcher.waiting_requests, **batcher.stats),
            adapters=wire.lora_adapters_to_proto(self.stage.loras.info() if self.stage.loras else []),
            model_hash=self.model_hash,
        )  # fmt: skip

    def warm_up(self, shapes: list[tuple[int, int, int]]) -> None:
        """Compile the guided program at each configured size for that shape's batch and every bucket: one
        request of that many images, one step each (the unguided program compiles when first needed)."""
        sizes = {(h, w) for _, h, w in shapes}
        facts, f = self.facts, self.facts.vae_scale_factor
        for batch, height, width in sorted(set(shapes) | {(b, h, w) for h, w in sizes for b in self.batcher.buckets}):
            cond = np.zeros((batch, facts.max_length, facts.hidden_size), np.float32)
            # inpainting, depth and upscaling UNets take more input channels (and the upscaler a noise level)
            extra = np.zeros((batch, height // f, width // f, facts.extra_channels), np.float32)
            shape = facts.class_labels_shape
            labels = None if shape is None else np.zeros((batch, *shape), np.float32)
            job = DenoiseJob(cond, cond, None, 0, 1, 7.5, 0.0, 0.0, height, width,
                             extra=extra if facts.extra_channels else None, class_labels=labels)  # fmt: skip
            for _ in self.run(job):
                pass


def default_shapes(facts: ModelFacts) -> list[tuple[int, int, int]]:
    if facts.default_size is None:
        raise InvalidRequest("this UNet's config names no sample_size: give --shapes BATCHxHEIGHTxWIDTH")
    return [(1, *facts.default_size)]


def message_bytes(facts: ModelFacts, shapes: list[tuple[int, int, int]]) -> int:
    """The largest Denoise request at these sizes: cond + uncond + latents, float32, for the most images any
    request may carry (MAX_IMAGES) with the longest prompts (as many 77-token chunks as the contract's context
    length holds) and, when ControlNets are loaded, a control map per image for each of MAX_CONTROLS, so a valid
    request is never refused for its size by gRPC."""
    f, c, e = facts.vae_scale_factor, facts.latent_channels, facts.extra_channels
    length = max_chunks(facts.max_length) * facts.max_length
    maps = contract.MAX_CONTROLS * 3 if facts.controlnets else 0
    per_image = [
        2 * length * facts.hidden_size + (2 * c + e + 1) * (h // f) * (w // f) + maps * h * w for _, h, w in shapes
    ]
    return contract.MAX_IMAGES * max(per_image) * 4


def stage_service(
    service: DenoiserService, shapes: list[tuple[int, int, int]], metrics: Any = None
) -> server.StageService:
    server.check_shapes(shapes, service.facts.vae_scale_factor)
    return server.StageService(
        name="sdmesh.v1.Denoiser", servicer=service, add_to_server=denoiser_pb2_grpc.add_DenoiserServicer_to_server,
        device_methods=frozenset(), warm_up=lambda: service.warm_up(shapes),  # the batcher queues Denoise itself
        max_message_bytes=message_bytes(service.facts, shapes), metrics=metrics,
        stage=service.stage, drain=service.batcher.drain,
    )  # fmt: skip


def main(args: Any) -> int:
    shapes = server.parse_shapes(args.shapes)  # before loading: a typo should not cost a model load
    folder, options, load = server.load_setup(args)
    stage = DenoiserStage.load(folder, options, load)
    facts = denoiser_facts(stage, folder)
    shapes = shapes or default_shapes(facts)
    metrics = StageMetrics("denoiser")
    service = DenoiserService(stage, facts, args.model, chunk=args.chunk_steps, max_batch=args.max_batch,
                              max_queue=args.max_queue, buckets=tuple(b for b, _, _ in shapes), metrics=metrics,
                              policy=args.batching,
                              sizes={(h, w) for _, h, w in shapes} if args.strict_shapes else None,
                              budget=contract.WorkBudget.for_model(facts, args.max_work, args.max_side),
                              hashed_files=hashed_files(folder, load))  # fmt: skip
    return server.serve(stage_service(service, shapes, metrics), host=args.host, port=args.port,
                        max_queue=args.max_queue, metrics_port=args.metrics_port,
                        tls=server.tls_from_args(args), grace=args.drain_seconds)  # fmt: skip
