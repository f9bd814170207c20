"""What every HTTP API of the front shares: the request it builds for the gateway, base64 images, the mapping of
gRPC statuses to HTTP ones, API keys, PNGs served by URL, and waiting for a job while the client is there.

Every API turns its fields into one `sdmesh.v1.GenerateRequest` (`generate_request`), so the gateway's contract
checks them all alike and answers with its own messages. Each API's model field (OpenAI's `model`, A1111's
`sd_model_checkpoint`) becomes the request's `model`: which of the gateway's models runs it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

import grpc
from fastapi import Depends
from pydantic import BaseModel, Field
from starlette.requests import Request

from sdmesh.services.http.jobs import Job, Jobs
from sdmesh.services.inputs.contract import ModelFacts
from sdmesh.services.serving.gateway import Downstream, GatewayService, LocalCall, Refused, refusals
from sdmesh.services.serving.tenants import Tenant
from sdmesh.v1 import common_pb2, gateway_pb2

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.CANCELLED: 499,  # the client closed the request (nginx's code); nobody is there to read it
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024  # a request larger than this is refused (413) before it is read whole
DEFAULT_FILE_SECONDS = 3600.0  # how long a `url` answer's PNG stays
MAX_FILE_BYTES = 1024 * 1024 * 1024  # PNGs held for URLs at most; the oldest go first


def http_status(code: grpc.StatusCode) -> int:
    return HTTP_STATUS.get(code, 500)


def not_found(what: str) -> Refused:
    return Refused(grpc.StatusCode.NOT_FOUND, what)


def invalid(message: str) -> Refused:
    return Refused(grpc.StatusCode.INVALID_ARGUMENT, message)


def decode_base64(text: str | None, field: str) -> bytes:
    """An image sent as base64 (optionally a `data:image/png;base64,` URL, as browsers and A1111 clients send):
    its bytes, b"" for none; Refused naming the field when it is not base64. What the bytes hold is the
    gateway's to check (PNG or JPEG)."""
    if not text:
        return b""
    if text.startswith("data:"):
        head, _, text = text.partition(",")
        if ";base64" not in head:
            raise invalid(f"{field}: a data URL must be base64 (data:image/png;base64,...)")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise invalid(f"{field}: not valid base64; send the PNG or JPEG file's bytes in base64") from None


class LoraBody(BaseModel):
    """A LoRA for every image of the request: a file the stages hold, by stem; `<lora:NAME:W>` in the prompt too."""

    name: str = Field(description="The file's stem in the stages' --lora-dir (see /v1/info's adapters).")
    weight: float = Field(1.0, description="Scales the LoRA in the text encoder and the UNet.")
    unet_weight: float | None = Field(None, description="The UNet's weight instead of `weight`.")


def generate_request(
    *,
    prompt: str,
    negative_prompt: str = "",
    n: int = 1,
    width: int | None = None,
    height: int | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    guidance_rescale: float = 0.0,
    guidance_cutoff: float = 1.0,
    sampler: str | None = None,
    seed: int | None = None,
    eta: float = 0.0,
    strength: float | None = None,
    noise_level: int | None = None,
    init_image: bytes = b"",
    mask_image: bytes = b"",
    depth_map: bytes = b"",
    priority: int = 0,
    preview_every: int = 0,
    loras: list[LoraBody] | None = None,
    controls: Sequence[gateway_pb2.Control] = (),
    model: str = "",
) -> gateway_pb2.GenerateRequest:
    """The gateway's request from any API's fields; None leaves a field to the gateway's default. Numbers outside
    what the message can carry are refused here, the rest by the gateway's contract. model: which of the gateway's
    models ("": its first)."""
    for name, value, low in (("n", n, 1), ("width", width, 0), ("height", height, 0), ("steps", steps, 1),
                             ("noise_level", noise_level, 0), ("preview_every", preview_every, 0)):  # fmt: skip
        if value is not None and not low <= value < 2**31:
            raise invalid(f"{name}: {value} is out of range; give a whole number from {low}")
    if seed is not None and not 0 <= seed < 2**64:
        raise invalid(f"seed: {seed} is out of range; give 0 to 2^64 - 1, or none (or -1) for a random one")
    if not -(2**31) <= priority < 2**31:
        raise invalid(f"priority: {priority} is out of range")
    request = gateway_pb2.GenerateRequest(
        prompt=prompt, negative_prompt=negative_prompt, num_images=n, num_inference_steps=steps or 0,
        guidance_rescale=guidance_rescale, guidance_cutoff=guidance_cutoff, height=height or 0, width=width or 0,
        eta=eta, sampler=sampler or "",
        priority=priority, init_image=init_image, mask_image=mask_image, depth_map=depth_map, model=model,
    )  # fmt: skip
    if preview_every:
        request.preview_every = preview_every
    for lora in loras or ():
        message = request.loras.add(name=lora.name, weight=lora.weight)
        if lora.unet_weight is not None:
            message.unet_weight = lora.unet_weight
    request.controls.extend(controls)
    if guidance_scale is not None:
        request.guidance_scale = guidance_scale
    if seed is not None:
        request.seed = seed
    if strength is not None:
        request.strength = strength
    if noise_level is not None:
        request.noise_level = noise_level
    return request


def parse_size(size: str | None, field: str = "size") -> tuple[int | None, int | None]:
    """OpenAI's "WIDTHxHEIGHT" → (width, height); None or "auto": the model's own size."""
    if size is None or size in ("", "auto"):
        return None, None
    w, sep, h = size.lower().partition("x")
    if not sep or not w.strip().isdigit() or not h.strip().isdigit():
        raise invalid(f"{field}: {size!r} is not a size; give WIDTHxHEIGHT, e.g. 512x512")
    return int(w), int(h)


class Files:
    """PNGs served at `/v1/files/{name}` for a bounded time (answers with `url`), bounded in total bytes."""

    def __init__(self, seconds: float = DEFAULT_FILE_SECONDS, max_bytes: int = MAX_FILE_BYTES):
        self.seconds, self.max_bytes = seconds, max_bytes
        self._files: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, data: bytes) -> tuple[str, float]:
        """A name for `data` and when it expires (Unix time)."""
        name = f"{secrets.token_urlsafe(18)}.png"
        expires = time.time() + self.seconds
        with self._lock:
            self._files[name] = (data, expires)
            self._bytes += len(data)
            self._expire()
        return name, expires

    def get(self, name: str) -> bytes | None:
        with self._lock:
            self._expire()
            entry = self._files.get(name)
        return None if entry is None else entry[0]

    def _expire(self) -> None:
        now = time.time()
        while self._files:
            name, (data, expires) = next(iter(self._files.items()))
            if expires > now and self._bytes <= self.max_bytes:
                break
            del self._files[name]
            self._bytes -= len(data)


class Front:
    """The HTTP front's state: the gateway service it calls in process, its jobs, and the PNGs it serves."""

    def __init__(self, service: GatewayService, *, jobs: Jobs | None = None, files: Files | None = None,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, preview_every: int = 5):  # fmt: skip
        self.service = service
        self.jobs = jobs or Jobs(service)
        self.files = files or Files()
        self.max_body_bytes = max_body_bytes
        self.preview_every = preview_every  # what the front asks for when a client will see progress

    @property
    def open(self) -> bool:
        """Whether callers need no key."""
        return not self.service.tenants.required

    def tenant(self, headers: Mapping[str, str]) -> Tenant:
        """The caller's tenant from `Authorization: Bearer KEY` (or `X-API-Key`); Refused UNAUTHENTICATED."""
        metadata = [(k.lower(), v) for k, v in headers.items() if k.lower() in ("authorization", "x-api-key")]
        try:
            return self.service.authenticate(metadata)
        except Refused as e:
            if metadata:
                raise
            message = "this server needs an API key: send the header 'Authorization: Bearer KEY' (or 'X-API-Key: KEY')"
            raise Refused(e.code, message) from None

    def facts(self, model: str = "") -> ModelFacts:
        """The facts of the model `model` names (as a request's `model`; "": the first), its denoiser's, asked once;
        Refused when no model has that name, or its denoiser does not answer. Blocks the first time: call from a
        worker thread."""
        with refusals():
            down = Downstream(LocalCall(timeout=30.0))
            return self.service.model(model, down).facts(down)

    def model_name(self) -> str:
        """The checkpoint the first model's denoiser serves (its ModelInfo.model, asked once); as `facts`."""
        with refusals():
            return self.service.denoiser_info(Downstream(LocalCall(timeout=30.0))).model

    def model(self, model: str = "") -> tuple[str, str]:
        """The model `model` names as (its name, its short hash: "" when its denoiser reports none); as `facts`."""
        with refusals():
            down = Downstream(LocalCall(timeout=30.0))
            served = self.service.model(model, down)
            return served.name(down), served.denoiser_info(down).model_hash

    def models(self) -> list[common_pb2.ServedModel]:
        """Every model the gateway serves, the first the default (`GatewayService.served_models`); as `facts`."""
        with refusals():
            return self.service.served_models(Downstream(LocalCall(timeout=30.0)))

    def adapters(self) -> list[common_pb2.Adapter]:
        """The LoRAs and embeddings the stages can apply (asked each time: which are resident changes); as `facts`."""
        with refusals():
            return self.service.adapters(Downstream(LocalCall(timeout=30.0)))

    async def submit(self, request: gateway_pb2.GenerateRequest, tenant: Tenant) -> Job:
        """Admit and start a job (Refused when the gateway refuses it)."""
        loop = asyncio.get_running_loop()
        return await asyncio.to_thread(self.jobs.submit, request, tenant, loop)

    async def run(self, request: gateway_pb2.GenerateRequest, tenant: Tenant, http: Request | None = None) -> Job:
        """Submit, then wait for the job to end; cancel it if the HTTP client goes away. Raises its Refused."""
        job = await self.submit(request, tenant)
        try:
            while not job.done:
                await job.changed(job.version, timeout=0.5)
                if http is not None and not job.done and await http.is_disconnected():
                    job.cancel()
            # its thread has set the state; wait for the release it does last
            while job.finished is None:
                await asyncio.sleep(0.005)
        except asyncio.CancelledError:  # the server is stopping, or the client went away while we waited
            job.cancel()
            raise
        finally:
            self.jobs.forget(job)
        if job.error is not None:
            raise job.error
        return job


def error_body(code: grpc.StatusCode, message: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    status = http_status(code)
    kinds = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 429: "rate_limit_error", 504: "timeout_error"}  # fmt: skip
    kind = kinds.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code.name.lower()}}


def caller(request: Request) -> Tenant:
    """The route dependency that authenticates the caller (the app's `state.front` knows the keys)."""
    front: Front = request.app.state.front
    return front.tenant(request.headers)


Caller = Annotated[Tenant, Depends(caller)]  # a route's `who: Caller` parameter: the authenticated tenant
