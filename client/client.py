"""Python clients for the gateway: `Client` (blocking) and `AsyncClient` (asyncio). No JAX needed.

with Client("localhost:50051") as client:
    result = client.generate("an astronaut riding a horse", seed=0)
    result.images[0].save("astronaut.png")

    for event in client.stream("a red fox", steps=30):
        if isinstance(event, Progress):
            print(f"{event.stage} {event.step}/{event.total_steps}")
        else:
            event.images[0].save("fox.png")

    for event in client.stream("a red fox", steps=30, preview_every=5):   # live previews
        if isinstance(event, Progress) and event.preview:
            Path("preview.jpg").write_bytes(event.preview)   # the first image, at latent resolution

    # a ControlNet the denoiser loaded (--controlnet canny=PATH), steering by the edges of a photo
    client.generate("a glass house", controls=[Control("canny", "house.jpg", preprocessor="canny")])

    # a gateway serving several models (--route): pick one by name; the result says which made it
    result = client.generate("a lighthouse", model="sd15")
    print(result.model, result.model_hash)
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import grpc

from sdmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from sdmesh.v1.limits import GATEWAY_MESSAGE_BYTES

# use_local_subchannel_pool: a new client does not inherit an earlier channel's failure state for the same address
# (a gateway restarted on the port of one that went away would fail the first calls at once)
DEFAULT_OPTIONS = (("grpc.max_receive_message_length", GATEWAY_MESSAGE_BYTES), ("grpc.use_local_subchannel_pool", 1))


class GatewayError(Exception):
    """A call the gateway refused or could not finish: `code` is the grpc.StatusCode, `message` says why;
    `retry_after`: seconds to wait before retrying, when the gateway said (a tenant past its quota)."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after: float | None = None):
        super().__init__(f"{code.name}: {message}")
        self.code, self.message, self.retry_after = code, message, retry_after

    @classmethod
    def from_rpc(cls, e: grpc.RpcError) -> GatewayError:
        retry_after = None
        for key, value in getattr(e, "trailing_metadata", lambda: None)() or ():
            if key == "retry-after":
                with contextlib.suppress(ValueError):
                    retry_after = float(value)
        return cls(e.code(), e.details() or "", retry_after)


@dataclasses.dataclass(frozen=True)
class Progress:
    stage: str  # "encode", "denoise", "decode"
    step: int
    total_steps: int
    preview: bytes = b""  # denoise, with preview_every: a small JPEG of the first image as currently estimated


@dataclasses.dataclass
class GenerateResult:
    images: list[Any]  # PIL.Image.Image, one per image
    seed: int  # the seed used (drawn by the gateway when none was given)
    truncation_notes: list[str]  # one per prompt cut at the tokenizer's limit
    model: str = ""  # the gateway's name of the model that made the images
    model_hash: str = ""  # and its short hash ("" from a denoiser that reports none)


@dataclasses.dataclass(frozen=True)
class Control:
    """A ControlNet for every image of a request: one the denoiser loaded (`sdmesh serve denoiser --controlnet
    NAME=PATH`; ModelInfo's model_facts.controlnets lists them) and its control image.

    image: PNG/JPEG bytes, a path to such a file, a PIL image or a uint8 array: the control map (an edge map, a depth
    map, ...), or with preprocessor "canny" the picture to take its edges from; resized to the output size.
    scale: how strongly it steers (0 to 100; real use stays within 0–2). start, end: the fractions of the steps
    between which it applies (0 ≤ start < end ≤ 1). guess_mode: it acts without the prompt's help (on the
    conditional half only), for a prompt that does not describe the picture. low_threshold, high_threshold:
    canny's, 0–255 (None: 100 and 200).
    """

    name: str
    image: Any
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    guess_mode: bool = False
    preprocessor: str = "none"  # "none": image is the map; "canny": its edges (OpenCV's Canny)
    low_threshold: float | None = None
    high_threshold: float | None = None

    def to_proto(self) -> gateway_pb2.Control:
        message = gateway_pb2.Control(
            name=self.name, image=control_image_bytes(self.image), scale=self.scale, start=self.start, end=self.end,
            guess_mode=self.guess_mode, preprocessor=self.preprocessor,
        )  # fmt: skip
        if self.low_threshold is not None:
            message.low_threshold = self.low_threshold
        if self.high_threshold is not None:
            message.high_threshold = self.high_threshold
        return message


def generate_request(
    prompt: str,
    *,
    negative_prompt: str | None = None,
    num_images: int | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    guidance_rescale: float = 0.0,
    guidance_cutoff: float = 1.0,
    height: int | None = None,
    width: int | None = None,
    seed: int | None = None,
    eta: float = 0.0,
    sampler: str | None = None,
    priority: int = 0,
    init_image: Any = None,
    mask_image: Any = None,
    strength: float | None = None,
    depth_map: Any = None,
    noise_level: int | None = None,
    preview_every: int = 0,
    loras: Sequence[tuple[str, float] | tuple[str, float, float] | str] = (),
    controls: Sequence[Control] = (),
    model: str | None = None,
) -> gateway_pb2.GenerateRequest:
    """The GenerateRequest for these arguments (None means the gateway's default: 1 image, 50 steps, guidance 7.5,
    the native size, a random seed, the checkpoint's own sampler). preview_every k > 0: denoise progress carries a
    JPEG preview about every k steps (`Progress.preview`); 0: none.

    Images (init_image, mask_image, depth_map) may be PNG/JPEG bytes, a PIL image, or a uint8 array; a float
    depth map array is sent as .npy.

    loras: LoRA files the stages hold in their --lora-dir, by stem: `("name", weight)`, `("name", weight,
    unet_weight)` or just `"name"` (weight 1); `<lora:name:weight>` in the prompt works too.

    controls: ControlNets the denoiser loaded, up to 4 (their effects add up), each a `Control`: its name, its control
    image, and how strongly and over which steps it steers, e.g. `Control("canny", "edges.png", scale=0.8)` or
    `Control("canny", "photo.jpg", preprocessor="canny")`.

    model: which of the gateway's models runs it (ModelInfo.models): a name, A1111's "name [hash]", or the short
    hash; None: the gateway's first.

    guidance_cutoff: the fraction of the steps that are guided, (0, 1]; later steps skip the unconditional pass
    (faster; the image changes).
    """
    request = gateway_pb2.GenerateRequest(
        prompt=prompt,
        negative_prompt=negative_prompt or "",
        num_images=num_images or 0,
        num_inference_steps=steps or 0,
        guidance_rescale=guidance_rescale,
        guidance_cutoff=guidance_cutoff,
        height=height or 0,
        width=width or 0,
        eta=eta,
        sampler=sampler or "",
        priority=priority,
        init_image=image_bytes(init_image),
        mask_image=image_bytes(mask_image),
        depth_map=image_bytes(depth_map),
        preview_every=preview_every,
        model=model or "",
    )
    if guidance_scale is not None:
        request.guidance_scale = guidance_scale
    if seed is not None:
        request.seed = seed
    if strength is not None:
        request.strength = strength
    if noise_level is not None:
        request.noise_level = noise_level
    for lora in loras:
        name, *weights = (lora,) if isinstance(lora, str) else lora
        message = request.loras.add(name=name)
        if weights:
            message.weight = weights[0]
        if len(weights) > 1:
            message.unet_weight = weights[1]
    for control in controls:
        if not isinstance(control, Control):
            raise TypeError(f"controls holds Control values (sdmesh.client.Control), got {type(control).__name__}")
        request.controls.append(control.to_proto())
    return request


def image_bytes(image: Any) -> bytes:
    """PNG/JPEG bytes as they are; a PIL image or uint8 array as PNG; a float array as .npy (depth maps);
    None as b""."""
    if image is None:
        return b""
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    if isinstance(image, np.ndarray) and image.dtype != np.uint8:
        np.save(buffer, image, allow_pickle=False)
    else:
        (image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))).save(buffer, format="PNG")
    return buffer.getvalue()


def control_image_bytes(image: Any) -> bytes:
    """A control image as the gateway takes it: PNG/JPEG bytes as they are, a path's file, a PIL image or uint8
    array as PNG."""
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as file:
            return file.read()
    if image is None:
        raise TypeError("a Control needs an image: PNG/JPEG bytes, a path, a PIL image or a uint8 array")
    return image_bytes(image)


def event_from_proto(event: gateway_pb2.GenerateEvent) -> Progress | GenerateResult:
    if event.HasField("progress"):
        p = event.progress
        return Progress(stage=p.stage, step=p.step, total_steps=p.total_steps, preview=p.preview)
    from PIL import Image

    r = event.result
    images = [Image.open(io.BytesIO(png)) for png in r.images]
    for image in images:
        image.load()  # decode now, while the bytes are at hand
    return GenerateResult(
        images=images, seed=r.seed, truncation_notes=list(r.truncation_notes), model=r.model, model_hash=r.model_hash
    )


def _channel_options(options: Sequence[tuple[str, Any]] | None) -> list[tuple[str, Any]]:
    given = dict(options or ())
    return [*((k, v) for k, v in DEFAULT_OPTIONS if k not in given), *given.items()]


def _auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


class Client:
    """A blocking client for `sdmesh.v1.Gateway`.

    credentials: grpc.ChannelCredentials for TLS (e.g. grpc.ssl_channel_credentials()); None: plaintext.
    options: extra gRPC channel options. timeout: the default per-call deadline in seconds (None: none).
    api_key: sent with every call as 'authorization: Bearer KEY', for a gateway started with --api-keys.
    """

    def __init__(
        self,
        address: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] | None = None,
        timeout: float | None = None,
        api_key: str | None = None,
    ):
        opts = _channel_options(options)
        self.address, self.timeout = address, timeout
        self.metadata = _auth_metadata(api_key)
        self.channel = (
            grpc.secure_channel(address, credentials, options=opts)
            if credentials
            else grpc.insecure_channel(address, options=opts)
        )
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)

    def stream(
        self, prompt: str, *, timeout: float | None = None, **kwargs: Any
    ) -> Iterator[Progress | GenerateResult]:
        """Progress events as the stages report them, then the GenerateResult. Arguments as `generate`.

        Stopping the iteration early (or closing it) cancels the request on the gateway and its stages.
        """
        call = self.stub.Generate(
            generate_request(prompt, **kwargs),
            timeout=timeout if timeout is not None else self.timeout,
            metadata=self.metadata,
        )
        try:
            for event in call:
                yield event_from_proto(event)
        except grpc.RpcError as e:
            raise GatewayError.from_rpc(e) from None
        finally:
            call.cancel()  # a no-op once the call has finished

    def generate(self, prompt: str, *, timeout: float | None = None, **options: Any) -> GenerateResult:
        """Text (and images) → images. `options` are generate_request's: negative_prompt, num_images, steps,
        guidance_scale, guidance_rescale, height, width (None: native size), seed (None: random, returned), eta,
        sampler, priority, init_image, mask_image, strength, depth_map, noise_level, preview_every (previews arrive
        only through `stream`), loras, controls (a list of `Control`), model (which of the gateway's models; None:
        its first)."""
        result = None
        for event in self.stream(prompt, timeout=timeout, **options):  # to its end: the call finishes OK
            if isinstance(event, GenerateResult):
                result = event
        if result is not None:
            return result
        raise GatewayError(grpc.StatusCode.INTERNAL, "the gateway ended the stream without a result")

    def model_info(self, *, timeout: float | None = None) -> common_pb2.ModelInfo:
        try:
            return self.stub.ModelInfo(
                common_pb2.ModelInfoRequest(),
                timeout=timeout if timeout is not None else self.timeout,
                metadata=self.metadata,
            )
        except grpc.RpcError as e:
            raise GatewayError.from_rpc(e) from None

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AsyncClient:
    """`Client` on grpc.aio: the same arguments and methods, awaited (`stream` is an async iterator)."""

    def __init__(
        self,
        address: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] | None = None,
        timeout: float | None = None,
        api_key: str | None = None,
    ):
        opts = _channel_options(options)
        self.address, self.timeout = address, timeout
        self.metadata = _auth_metadata(api_key)
        self.channel = (
            grpc.aio.secure_channel(address, credentials, options=opts)
            if credentials
            else grpc.aio.insecure_channel(address, options=opts)
        )
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)

    async def stream(
        self, prompt: str, *, timeout: float | None = None, **kwargs: Any
    ) -> AsyncIterator[Progress | GenerateResult]:
        call = self.stub.Generate(
            generate_request(prompt, **kwargs),
            timeout=timeout if timeout is not None else self.timeout,
            metadata=self.metadata,
        )
        try:
            async for event in call:
                yield event_from_proto(event)
        except grpc.RpcError as e:
            raise GatewayError.from_rpc(e) from None
        finally:
            call.cancel()

    async def generate(self, prompt: str, *, timeout: float | None = None, **options: Any) -> GenerateResult:
        """As Client.generate."""
        result = None
        async for event in self.stream(prompt, timeout=timeout, **options):
            if isinstance(event, GenerateResult):
                result = event
        if result is not None:
            return result
        raise GatewayError(grpc.StatusCode.INTERNAL, "the gateway ended the stream without a result")

    async def model_info(self, *, timeout: float | None = None) -> common_pb2.ModelInfo:
        try:
            return await self.stub.ModelInfo(
                common_pb2.ModelInfoRequest(),
                timeout=timeout if timeout is not None else self.timeout,
                metadata=self.metadata,
            )
        except grpc.RpcError as e:
            raise GatewayError.from_rpc(e) from None

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()
