"""Decoder.Decode over gRPC: latents (NCHW on the wire) → uint8 images, around `pipeline.DecoderStage`."""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from sdmesh.client.tensors import from_proto, to_proto
from sdmesh.services import server
from sdmesh.services.pipeline import MAX_IMAGES, DecoderStage, InvalidRequest
from sdmesh.v1 import common_pb2, decoder_pb2, decoder_pb2_grpc

MAX_SIDE = 4096  # pixels, as StableDiffusion.validate


def latents_from_proto(request: decoder_pb2.DecodeRequest, latent_channels: int, scale_factor: int) -> np.ndarray:
    """The request's latents as NHWC (N, h, w, C) float32, after checking them; raises InvalidRequest/TensorError."""
    if not request.HasField("latents"):
        raise InvalidRequest("latents is missing: send the denoiser's final latents, (N, C, h, w) float32")
    latents = from_proto(request.latents, name="latents", dtype="float32", ndim=4)
    n, c, h, w = latents.shape
    if c != latent_channels or not 1 <= n <= MAX_IMAGES or min(h, w) < 1 or max(h, w) * scale_factor > MAX_SIDE:
        raise InvalidRequest(f"latents have shape {list(latents.shape)}; this VAE needs NCHW (N, {latent_channels}, h, w) "
                             f"with N from 1 to {MAX_IMAGES} and h, w from 1 to {MAX_SIDE // scale_factor}")
    if not np.isfinite(latents).all():
        raise InvalidRequest("latents contain NaN or infinity")
    return np.ascontiguousarray(latents.transpose(0, 2, 3, 1))


class DecoderService(decoder_pb2_grpc.DecoderServicer):
    def __init__(self, stage: DecoderStage, model: str):
        self.stage, self.model = stage, model
        self.compiled: set[tuple[int, int, int]] = set()  # (batch, height, width) in pixels

    @property
    def latent_channels(self) -> int:
        return self.stage.vae.config.latent_channels

    def decode(self, latents_nhwc: np.ndarray) -> np.ndarray:
        images, _ = self.stage.decode(jnp.asarray(latents_nhwc))
        self.compiled.add(images.shape[:3])
        return images

    def Decode(self, request, context):
        latents = latents_from_proto(request, self.latent_channels, self.stage.scale_factor)
        return decoder_pb2.DecodeResponse(images=to_proto(self.decode(latents)))

    def ModelInfo(self, request, context):
        devices, mesh = server.device_facts(self.stage.mesh)
        config = self.stage.vae.config
        facts = {"latent_channels": self.latent_channels, "vae_scale_factor": self.stage.scale_factor,
                 "scaling_factor": config.scaling_factor, "max_images": MAX_IMAGES}
        return common_pb2.ModelInfo(
            service="Decoder", model=self.model, weights_dtype=self.stage.options.weights_dtype,
            activations_dtype=self.stage.options.activations_dtype, devices=devices, mesh=mesh,
            compiled_shapes=[common_pb2.CompiledShape(program="decode", batch=b, height=h, width=w)
                             for b, h, w in sorted(self.compiled)],
            facts={k: str(v) for k, v in facts.items()},
        )

    def warm_up(self, shapes: list[tuple[int, int, int]]) -> None:
        f = self.stage.scale_factor
        for batch, height, width in shapes:
            self.decode(np.zeros((batch, height // f, width // f, self.latent_channels), np.float32))


def stage_service(service: DecoderService, shapes: list[tuple[int, int, int]]) -> server.StageService:
    f, c = service.stage.scale_factor, service.latent_channels
    for b, h, w in shapes:
        if h % f or w % f or max(h, w) > MAX_SIDE or b > MAX_IMAGES:
            raise InvalidRequest(f"--shapes {b}x{h}x{w}: height and width must be multiples of {f} up to {MAX_SIDE}, batch ≤ {MAX_IMAGES}")
    # images out + latents in, for the most images any request may carry
    largest = max(MAX_IMAGES * (h * w * 3 + c * (h // f) * (w // f) * 4) for _, h, w in shapes)
    return server.StageService(
        name="sdmesh.v1.Decoder", servicer=service, add_to_server=decoder_pb2_grpc.add_DecoderServicer_to_server,
        device_methods=frozenset({"Decode"}), warm_up=lambda: service.warm_up(shapes), max_message_bytes=largest,
    )


def default_shapes(stage: DecoderStage, folder: Any) -> list[tuple[int, int, int]]:
    """Batch 1 at the model's native size: the UNet's sample_size (from its config.json) × the VAE factor."""
    from sdmesh.services import checkpoint

    sample = checkpoint.read_config(folder, "unet").get("sample_size")
    if sample is None:
        raise InvalidRequest("the UNet's config names no sample_size: give --shapes BATCHxHEIGHTxWIDTH")
    h, w = (sample, sample) if isinstance(sample, int) else sample
    return [(1, h * stage.scale_factor, w * stage.scale_factor)]


def main(args: Any) -> int:
    shapes = server.parse_shapes(args.shapes)  # before loading: a typo should not cost a model load
    folder, options, load = server.load_setup(args)
    stage = DecoderStage.load(folder, options, load)
    shapes = shapes or default_shapes(stage, folder)
    service = DecoderService(stage, args.model)
    return server.serve(stage_service(service, shapes), host=args.host, port=args.port, max_queue=args.max_queue)
