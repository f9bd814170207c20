"""Decoder.Decode over gRPC: latents (NCHW on the wire) → uint8 images, around `stages.DecoderStage`;
and Decoder.EncodeImage, the VAE's encoder, for image-conditioned generation (img2img, inpainting, depth).

With --max-batch above 1, concurrent Decode calls of the same latent size share one device call
(`batching.Batcher`): their latents are joined along N, padded to a compiled bucket, decoded once,
and each call gets its own images back. The VAE decodes each image on its own (GroupNorm and the
mid-block attention are per image), so an image does not depend on its batch-mates (measured:
tests/test_batching.py).

ModelInfo.latent_preview is the VAE's latent → RGB map for the denoiser's live previews
(`DecoderStage.latent_preview`: fitted once, at warm-up, from a few decodes); the gateway forwards it with
each Denoise that asks for previews.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from sdmesh.services.checkpoints import checkpoint
from sdmesh.services.engine.stages import DecoderStage
from sdmesh.services.inputs import contract
from sdmesh.services.inputs.contract import MAX_IMAGES, MAX_SIDE
from sdmesh.services.inputs.errors import InvalidRequest
from sdmesh.services.inputs.images import preprocess_image
from sdmesh.services.serving import batching, server, wire
from sdmesh.services.serving.metrics import StageMetrics
from sdmesh.v1 import common_pb2, decoder_pb2, decoder_pb2_grpc
from sdmesh.v1.tensors import from_proto, to_proto


def latents_from_proto(request: decoder_pb2.DecodeRequest, latent_channels: int, scale_factor: int) -> np.ndarray:
    """The request's latents as NHWC (N, h, w, C) float32, after checking them; raises InvalidRequest/TensorError."""
    if not request.HasField("latents"):
        raise InvalidRequest("latents is missing: send the denoiser's final latents, (N, C, h, w) float32")
    latents = from_proto(request.latents, name="latents", dtype="float32", ndim=4)
    n, c, h, w = latents.shape
    if c != latent_channels or not 1 <= n <= MAX_IMAGES or min(h, w) < 1 or max(h, w) * scale_factor > MAX_SIDE:
        raise InvalidRequest(
            f"latents have shape {list(latents.shape)}; this VAE needs NCHW (N, {latent_channels}, h, w) "
            f"with N from 1 to {MAX_IMAGES} and h, w from 1 to {MAX_SIDE // scale_factor}"
        )
    if not np.isfinite(latents).all():
        raise InvalidRequest("latents contain NaN or infinity")
    return np.ascontiguousarray(latents.transpose(0, 2, 3, 1))


def images_from_proto(request: decoder_pb2.EncodeImageRequest, scale_factor: int) -> tuple[np.ndarray, int | None]:
    """(images (N, H, W, 3) float32 in [-1, 1], seed or None) after checking them; raises InvalidRequest/TensorError."""
    if not request.HasField("images"):
        raise InvalidRequest("images is missing: send (N, H, W, 3) uint8 RGB, or float32 in [-1, 1]")
    images = from_proto(request.images, name="images", ndim=4)
    dtype = images.dtype.name
    if dtype not in ("uint8", "float32"):
        raise InvalidRequest(f"images must be uint8 RGB or float32 in [-1, 1], got {dtype}")
    n, h, w, c = images.shape
    if (
        c != 3
        or not 1 <= n <= MAX_IMAGES
        or min(h, w) < scale_factor
        or h % scale_factor
        or w % scale_factor
        or max(h, w) > MAX_SIDE
    ):
        raise InvalidRequest(
            f"images have shape {list(images.shape)}; need (N, H, W, 3) with N from 1 to {MAX_IMAGES} and "
            f"H, W multiples of {scale_factor} up to {MAX_SIDE}"
        )
    if dtype == "uint8":
        images = preprocess_image(images)  # as the in-process pipeline does, bit for bit
    elif not np.isfinite(images).all() or np.abs(images).max() > 1.0:
        raise InvalidRequest("float32 images must lie in [-1, 1] (and be finite)")
    return images, (request.seed if request.HasField("seed") else None)


class DecoderService(decoder_pb2_grpc.DecoderServicer):
    """max_batch: images per device call; 1 runs each call alone, at its own size.
    batch_wait: seconds the oldest waiting call may wait for others to fill its batch.
    max_queue: calls that may wait (when batching; with max_batch 1 the server's DeviceQueue bounds them).
    metrics: where batches, device calls and images are recorded (the server records its RPCs there too)."""

    def __init__(
        self,
        stage: DecoderStage,
        model: str,
        *,
        max_batch: int = 1,
        batch_wait: float = 0.0,
        max_queue: int = contract.DEFAULT_MAX_QUEUE,
        metrics: StageMetrics | None = None,
        sizes: set[tuple[int, int]] | None = None,
    ):
        self.stage, self.model, self.sizes = stage, model, sizes  # sizes: --strict-shapes (None: any size)
        self.metrics = metrics or StageMetrics("decoder")
        self.compiled: set[tuple[int, int, int]] = set()  # (batch, height, width) in pixels
        self.batcher = batching.Batcher(
            self.decode,
            max_batch=max_batch,
            batch_wait=batch_wait,
            max_queue=max_queue,
            metrics=self.metrics,
            name="decoder",
        )

    @property
    def latent_channels(self) -> int:
        return self.stage.vae.config.latent_channels

    def decode(self, latents_nhwc: np.ndarray) -> np.ndarray:
        """One device call: (N, h, w, C) latents → (N, H, W, 3) uint8 images."""
        images, _ = self.stage.decode(jnp.asarray(latents_nhwc))
        self.compiled.add(images.shape[:3])
        return images

    def Decode(self, request, context):
        # validated alone, first: a bad request must not fail a batch
        latents = latents_from_proto(request, self.latent_channels, self.stage.scale_factor)
        f = self.stage.scale_factor
        server.check_size(latents.shape[1] * f, latents.shape[2] * f, self.sizes)
        # only latents of one size can share an array: the key is the shape of a row, (h, w, C)
        future = self.batcher.submit(latents, key=latents.shape[1:], is_active=context.is_active)
        images = batching.wait(future, context.is_active)
        self.metrics.images_served(len(images))
        return decoder_pb2.DecodeResponse(images=to_proto(images))

    def EncodeImage(self, request, context):
        images, seed = images_from_proto(request, self.stage.scale_factor)
        server.check_size(images.shape[1], images.shape[2], self.sizes)
        latents, _ = self.stage.encode_image(images, seed=seed, stream=request.stream)
        return decoder_pb2.EncodeImageResponse(latents=to_proto(np.ascontiguousarray(latents.transpose(0, 3, 1, 2))))

    def ModelInfo(self, request, context):
        devices, mesh = server.device_facts(self.stage.mesh)
        config = self.stage.vae.config
        facts = common_pb2.ModelFacts(
            latent_channels=self.latent_channels,
            vae_scale_factor=self.stage.scale_factor,
            scaling_factor=config.scaling_factor,
            max_images=MAX_IMAGES,
        )
        return common_pb2.ModelInfo(
            service="Decoder",
            model=self.model,
            weights_dtype=self.stage.options.weights_dtype,
            activations_dtype=self.stage.options.activations_dtype,
            devices=devices,
            mesh=mesh,
            compiled_shapes=[
                common_pb2.CompiledShape(program="decode", batch=b, height=h, width=w)
                for b, h, w in sorted(self.compiled)
            ],
            model_facts=facts,
            batching=batching.info(self.batcher),
            latent_preview=wire.latent_preview_to_proto(self.stage.latent_preview()),  # fitted at warm-up (else now)
        )

    def warm_up(self, shapes: list[tuple[int, int, int]]) -> None:
        """Compile decode for each configured shape, and at each of its sizes for every bucket a batch is padded to."""
        f = self.stage.scale_factor
        for batch, height, width in warm_up_shapes(shapes, self.batcher.buckets):
            self.decode(np.zeros((batch, height // f, width // f, self.latent_channels), np.float32))
        self.stage.latent_preview()  # the previews' map, for ModelInfo (batch 1 at the native size: compiled above)

    def close(self) -> None:
        """Finish the calls waiting for the device, then stop batching."""
        self.batcher.stop()


def warm_up_shapes(shapes: list[tuple[int, int, int]], buckets: list[int]) -> list[tuple[int, int, int]]:
    """(batch, height, width) to compile: the configured shapes, and every bucket at each configured size."""
    sizes = {(h, w) for _, h, w in shapes}
    return sorted(set(shapes) | {(b, h, w) for h, w in sizes for b in buckets})


def stage_service(service: DecoderService, shapes: list[tuple[int, int, int]]) -> server.StageService:
    f, c = service.stage.scale_factor, service.latent_channels
    server.check_shapes(shapes, f)
    # images out + latents in, for the most images any request may carry
    largest = max(MAX_IMAGES * (h * w * 3 + c * (h // f) * (w // f) * 4) for _, h, w in shapes)
    return server.StageService(
        name="sdmesh.v1.Decoder",
        servicer=service,
        add_to_server=decoder_pb2_grpc.add_DecoderServicer_to_server,
        device_methods=batching.device_methods(service.batcher, "Decode"),
        warm_up=lambda: service.warm_up(shapes),
        max_message_bytes=largest,
        metrics=service.metrics,
        stage=service.stage,
    )


def default_shapes(stage: DecoderStage, folder: Any) -> list[tuple[int, int, int]]:
    """Batch 1 at the model's native size: the UNet's sample_size (from its config.json) × the VAE factor."""
    sample = checkpoint.read_config(folder, "unet").get("sample_size")
    if sample is None:
        raise InvalidRequest("the UNet's config names no sample_size: give --shapes BATCHxHEIGHTxWIDTH")
    h, w = (sample, sample) if isinstance(sample, int) else sample
    return [(1, h * stage.scale_factor, w * stage.scale_factor)]


def main(args: Any) -> int:
    # before loading: a typo should not cost a model load
    shapes = server.parse_shapes(args.shapes)
    batch = batching.options_from_args(args, max_rows=MAX_IMAGES)
    folder, options, load = server.load_setup(args)
    stage = DecoderStage.load(folder, options, load)
    shapes = shapes or default_shapes(stage, folder)
    service = DecoderService(
        stage,
        args.model,
        **batch,
        sizes={(h, w) for _, h, w in shapes} if getattr(args, "strict_shapes", False) else None,
    )
    return server.serve(
        stage_service(service, shapes),
        host=args.host,
        port=args.port,
        max_queue=args.max_queue,
        grace=args.drain_seconds,
        metrics_port=getattr(args, "metrics_port", None),
        tls=server.tls_from_args(args),
    )
