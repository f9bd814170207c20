"""Thin synchronous clients for the stage services: one method per RPC, numpy in and out. No JAX.

    encoder = TextEncoderClient("127.0.0.1:50052")
    cond, uncond, truncations = encoder.encode(["a cat"], [""], unconditional=True)
    stream = DenoiserClient(channel).denoise(cond, uncond, seed=0, steps=50, guidance_scale=7.5, height=512, width=512)
    for p in stream: ...                          # Progress(stage, step, total_steps) after each chunk
    latents = stream.latents                      # (N, C, h, w) float32, once the stream has ended
    images = DecoderClient(channel).decode(latents)   # (N, H, W, 3) uint8

Each client takes an address ("host:port") or a grpc.Channel. Failures are grpc.RpcError
with the server's status (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, UNAVAILABLE, …), left
for the caller to judge: a gateway retries some on another replica.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import grpc
import numpy as np

from sdmesh.client.client import Progress
from sdmesh.v1 import (
    common_pb2,
    decoder_pb2,
    decoder_pb2_grpc,
    denoiser_pb2,
    denoiser_pb2_grpc,
    text_encoder_pb2,
    text_encoder_pb2_grpc,
)
from sdmesh.v1.tensors import from_proto, to_proto

# The client trusts its servers: it accepts replies as large as they send (the server's limit is the one that binds).
MAX_MESSAGE_BYTES = 1 << 30


class Truncation(NamedTuple):
    prompt_index: int
    removed_text: str  # the part of the prompt past the tokenizer's limit, which the model did not see
    negative: bool  # the negative prompt was the one cut


class Encoded(NamedTuple):
    cond: np.ndarray  # (P, L, D) float32
    uncond: np.ndarray | None  # (P, L, D) float32, when asked for
    truncations: list[Truncation]


def channel_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", max_message_bytes), ("grpc.max_receive_message_length", max_message_bytes)]


def connect(
    address: str, *, credentials: grpc.ChannelCredentials | None = None, max_message_bytes: int = MAX_MESSAGE_BYTES
) -> grpc.Channel:
    """A channel to `host:port`: TLS when credentials are given, else plaintext."""
    options = channel_options(max_message_bytes)
    if credentials is not None:
        return grpc.secure_channel(address, credentials, options=options)
    return grpc.insecure_channel(address, options=options)


def _channel(target: str | grpc.Channel) -> grpc.Channel:
    return connect(target) if isinstance(target, str) else target


def health_status(
    target: str | grpc.Channel,
    service: str = "",
    timeout: float | None = 5.0,
    *,
    credentials: grpc.ChannelCredentials | None = None,
) -> str:
    """The server's health for `service` ("" = the whole server): "SERVING", "NOT_SERVING", … ;
    RpcError if unreachable (a TLS server reached in plaintext, or refusing the client's certificate: UNAVAILABLE).

    credentials: TLS to an address (grpc.ssl_channel_credentials); a channel brings its own."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc  # grpcio-health-checking: only callers of health need it

    channel = connect(target, credentials=credentials) if isinstance(target, str) else target
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    finally:
        if channel is not target:
            channel.close()
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def wait_for_serving(target: str | grpc.Channel, timeout: float, service: str = "") -> None:
    """Block until the server's health says SERVING; TimeoutError naming the last state seen after `timeout` seconds."""
    channel = _channel(target)
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(
                f"{target if isinstance(target, str) else 'the server'} did not report SERVING "
                f"within {timeout:g}s (last: {last})"
            )
        try:
            last = health_status(channel, service, timeout=min(left, 2.0))
            if last == "SERVING":
                return
        except grpc.RpcError as e:
            last = f"{e.code().name}: {e.details()}"
        time.sleep(min(0.1, max(deadline - time.monotonic(), 0)))


class TextEncoderClient:
    def __init__(self, target: str | grpc.Channel):
        self.stub = text_encoder_pb2_grpc.TextEncoderStub(_channel(target))

    def encode(
        self,
        prompts: Sequence[str],
        negative_prompts: Sequence[str] = (),
        unconditional: bool = False,
        *,
        timeout: float | None = None,
    ) -> Encoded:
        """Conditioning for the prompts, and with `unconditional` for the negatives ("" each when none are given)."""
        reply = self.stub.Encode(
            text_encoder_pb2.EncodeRequest(
                prompts=list(prompts), negative_prompts=list(negative_prompts), unconditional=unconditional
            ),
            timeout=timeout,
        )
        cond = from_proto(reply.cond, name="cond", dtype="float32", ndim=3)
        uncond = from_proto(reply.uncond, name="uncond", dtype="float32", ndim=3) if reply.HasField("uncond") else None
        truncations = [Truncation(t.prompt_index, t.removed_text, t.negative) for t in reply.truncated]
        return Encoded(cond, uncond, truncations)

    def model_info(self, *, timeout: float | None = None) -> common_pb2.ModelInfo:
        return self.stub.ModelInfo(common_pb2.ModelInfoRequest(), timeout=timeout)


class DenoiseStream:
    """A running Denoise call: iterate for Progress; then `latents` holds the final (N, C, h, w) float32."""

    def __init__(self, call: grpc.Call):
        self.call = call
        self.latents: np.ndarray | None = None

    def __iter__(self) -> Iterator[Progress]:
        for event in self.call:
            if event.WhichOneof("event") == "progress":
                p = event.progress
                yield Progress(p.stage, p.step, p.total_steps, p.preview)
            elif event.WhichOneof("event") == "latents":
                self.latents = from_proto(event.latents, name="latents", dtype="float32", ndim=4)

    def result(self) -> np.ndarray:
        """Run to the end, ignoring progress; the final latents."""
        for _ in self:
            pass
        if self.latents is None:
            raise RuntimeError("the denoiser's stream ended without latents")
        return self.latents

    def cancel(self) -> None:
        """Stop the call: the server stops at its next chunk boundary."""
        self.call.cancel()


class DenoiserClient:
    def __init__(self, target: str | grpc.Channel):
        self.stub = denoiser_pb2_grpc.DenoiserStub(_channel(target))

    def denoise(
        self,
        cond: np.ndarray,
        uncond: np.ndarray | None = None,
        *,
        seed: int | None = None,
        latents: np.ndarray | None = None,
        steps: int,
        guidance_scale: float,
        guidance_rescale: float = 0.0,
        guidance_cutoff: float = 1.0,
        eta: float = 0.0,
        height: int = 0,
        width: int = 0,
        noise_seed: int = 0,
        sampler: str | None = None,
        priority: int = 0,
        tenant: str = "",
        preview_every: int = 0,
        preview_projection: common_pb2.LatentPreview | None = None,
        timeout: float | None = None,
    ) -> DenoiseStream:
        """Start the sampling loop from `seed`'s noise or from `latents` (N, C, h, w);
        height/width 0: the default or the latents'.

        With a seed, the seed also seeds the η stream; with latents, `noise_seed` does. `tenant`: whose request
        this is, for the denoiser's fair sharing of its batch (a gateway sends its caller's). `preview_every` k > 0:
        progress carries a JPEG of the first image's x̂₀ about every k steps, through `preview_projection` (the
        Decoder's ModelInfo.latent_preview; None: the denoiser's fallback, the first three channels).
        """
        if (seed is None) == (latents is None):
            raise ValueError("give exactly one of seed and latents")
        request = denoiser_pb2.DenoiseRequest(
            cond=to_proto(np.asarray(cond, np.float32)),
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            guidance_cutoff=guidance_cutoff,
            eta=eta,
            height=height,
            width=width,
            noise_seed=noise_seed,
            sampler=sampler or "",
            priority=priority,
            tenant=tenant,
            preview_every=preview_every,
        )
        if preview_projection is not None:
            request.preview_projection.CopyFrom(preview_projection)
        if uncond is not None:
            request.uncond.CopyFrom(to_proto(np.asarray(uncond, np.float32)))
        if seed is not None:
            request.seed = seed
        else:
            request.latents.CopyFrom(to_proto(np.asarray(latents, np.float32)))
        return DenoiseStream(self.stub.Denoise(request, timeout=timeout))

    def model_info(self, *, timeout: float | None = None) -> common_pb2.ModelInfo:
        return self.stub.ModelInfo(common_pb2.ModelInfoRequest(), timeout=timeout)


class DecoderClient:
    def __init__(self, target: str | grpc.Channel):
        self.stub = decoder_pb2_grpc.DecoderStub(_channel(target))

    def decode(self, latents: np.ndarray, *, timeout: float | None = None) -> np.ndarray:
        """Latents (N, C, h, w) float32 as the denoiser returns them → (N, H, W, 3) uint8 images."""
        reply = self.stub.Decode(
            decoder_pb2.DecodeRequest(latents=to_proto(np.asarray(latents, np.float32))), timeout=timeout
        )
        return from_proto(reply.images, name="images", dtype="uint8", ndim=4)

    def model_info(self, *, timeout: float | None = None) -> common_pb2.ModelInfo:
        return self.stub.ModelInfo(common_pb2.ModelInfoRequest(), timeout=timeout)
