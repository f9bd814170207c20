"""The gateway: one user-facing `Gateway.Generate` that chains the stage services.

    GenerateRequest → TextEncoder.Encode → Denoiser.Denoise (progress streamed through) → Decoder.Decode → PNGs

It holds no model (and imports no JAX). It makes the same calls, in the same order, as
`StableDiffusion.generate` makes in one process, so a request and seed give the same image:
the encoder sees the prompts and, when guidance_scale > 1, the negatives in one call; each
prompt's hidden rows are repeated num_images times; the denoiser draws the initial noise
(and the η-noise) from the request's seed; the decoder's uint8 images become PNG files.

Each stage has a pool of replica addresses. A call goes to the serving replica with the fewest
outstanding calls; replicas whose grpc.health.v1 status is NOT_SERVING (watched in the
background) are skipped. A call that fails with UNAVAILABLE or RESOURCE_EXHAUSTED (or is cancelled
by a stage shutting down) before it returned its result is retried on another replica: Encode and Decode are pure, and Denoise is a
pure function of its request given the seed, so rerunning it from the start gives the same
latents. The client's deadline is passed down as each call's timeout, and a client that goes
away cancels the call in flight.

Metrics (services/metrics.py, stage="gateway"): requests in flight as the queue depth, each RPC's
latency and non-OK status code, images served; `--metrics-port` serves them over HTTP.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sdmesh.client.tensors import TensorError, from_proto, to_proto
from sdmesh.services import images, modes
from sdmesh.services.errors import InvalidRequest
from sdmesh.services.metrics import StageMetrics
from sdmesh.services.server import ended_with
from sdmesh.v1 import (common_pb2, decoder_pb2, decoder_pb2_grpc, denoiser_pb2, denoiser_pb2_grpc, gateway_pb2,
                       gateway_pb2_grpc, text_encoder_pb2, text_encoder_pb2_grpc)

log = logging.getLogger("sdmesh.gateway")

# Limits, as StableDiffusion.validate sets them (the gateway must reject what the pipeline rejects).
MAX_IMAGES = 64
MAX_STEPS = 1000
MAX_SIDE = 4096
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 7.5
MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # decoded images of the largest batch fit; larger is rejected by gRPC, not crashed on
# Stage failures another replica may not have; CANCELLED counts only when the stage (shutting down), not our client, cancelled.
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED)
STUBS = {"encoder": text_encoder_pb2_grpc.TextEncoderStub, "denoiser": denoiser_pb2_grpc.DenoiserStub,
         "decoder": decoder_pb2_grpc.DecoderStub}
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # a replica that comes back is found within ~2 s, not after gRPC's default backoff of up to 2 minutes
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


# A `dns:///name:port` address stands for every server the name resolves to (docker compose's `--scale`):
# gRPC spreads calls over them round robin and skips those whose health is not SERVING.
BALANCED_SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}], "healthCheckConfig": {"serviceName": ""}})


def stage_channel(address: str) -> grpc.Channel:
    options = list(CHANNEL_OPTIONS)
    if is_balanced(address):
        options.append(("grpc.service_config", BALANCED_SERVICE_CONFIG))
    return grpc.insecure_channel(address, options=options)


def is_balanced(address: str) -> bool:
    """Whether an address names several servers (a DNS name gRPC resolves to all of its records)."""
    return address.startswith("dns:")


class StageError(Exception):
    """A stage call that failed for good: the status the client gets and why."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


# --- Replicas -----------------------------------------------------------------------


class Replica:
    """One stage server: its channel, stub, outstanding calls and last known health."""

    def __init__(self, stage: str, address: str, channel: grpc.Channel):
        self.stage, self.address, self.channel = stage, address, channel
        self.stub = STUBS[stage](channel)
        self.outstanding = 0
        # SERVING / NOT_SERVING from grpc.health.v1 (None until the first answer); `reachable`: the last call got through
        self.health: int | None = None
        self.reachable = True

    @property
    def usable(self) -> bool:
        return self.reachable and self.health != health_pb2.HealthCheckResponse.NOT_SERVING

    def __repr__(self) -> str:
        return f"{self.stage}@{self.address}"


class ReplicaPool:
    """The replicas of one stage; `acquire` picks the usable one with the fewest outstanding calls."""

    def __init__(self, stage: str, addresses: Sequence[str], *, channel_factory: Callable[[str], grpc.Channel] | None = None,
                 watch_health: bool = True):
        if not addresses:
            raise ValueError(f"no {stage} addresses: give at least one HOST:PORT")
        make = channel_factory or stage_channel
        self.stage = stage
        self.replicas = [Replica(stage, a, make(a)) for a in addresses]
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._watchers = [threading.Thread(target=self._watch, args=(r,), name=f"health-{r}", daemon=True)
                          for r in self.replicas] if watch_health else []
        for t in self._watchers:
            t.start()

    def acquire(self, exclude: set[Replica] | frozenset[Replica] = frozenset()) -> Replica | None:
        """The least-loaded usable replica not in `exclude` (ties: the first listed), now counted as busy.

        None when every replica left says NOT_SERVING. Replicas that merely failed to answer lately
        are still tried when no other is left: that hint may be stale, and must not turn every request away.
        """
        with self._lock:
            candidates = [r for r in self.replicas if r not in exclude and r.health != health_pb2.HealthCheckResponse.NOT_SERVING]
            usable = [r for r in candidates if r.usable] or candidates
            if not usable:
                return None
            best = min(usable, key=lambda r: r.outstanding)
            best.outstanding += 1
            return best

    def release(self, replica: Replica) -> None:
        with self._lock:
            replica.outstanding -= 1

    def mark_unreachable(self, replica: Replica) -> None:
        replica.reachable = False  # until the health watcher hears from it again

    def _watch(self, replica: Replica) -> None:
        """Follow the replica's grpc.health.v1 Watch stream; reconnect with backoff while it is down."""
        stub = health_pb2_grpc.HealthStub(replica.channel)
        backoff = 0.2
        while not self._closed.is_set():
            try:
                call = stub.Watch(health_pb2.HealthCheckRequest(service=""))
                for response in call:
                    replica.health, replica.reachable, backoff = response.status, True, 0.2
                    if self._closed.is_set():
                        call.cancel()
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.UNIMPLEMENTED:  # a server without health checking: trust it
                    replica.health, replica.reachable = health_pb2.HealthCheckResponse.SERVING, True
                    return
                if e.code() != grpc.StatusCode.CANCELLED:
                    replica.reachable = False
            self._closed.wait(backoff)
            backoff = min(backoff * 2, 2.0)

    def close(self) -> None:
        self._closed.set()
        for r in self.replicas:
            r.channel.close()  # ends the Watch streams


# --- Deadlines and cancellation -----------------------------------------------------


class Downstream:
    """The stage calls one client request makes: each gets the client's remaining time, and the one in
    flight is cancelled when the client goes away."""

    def __init__(self, context: grpc.ServicerContext):
        self.context = context
        self._lock = threading.Lock()
        self._call: Any = None
        self._finished = False
        context.add_callback(self._on_client_done)

    def _on_client_done(self) -> None:
        # Runs when the client's RPC ends for any reason: cancelled, past its deadline, or answered.
        with self._lock:
            self._finished = True
            if self._call is not None:
                self._call.cancel()  # a no-op for a call that already finished

    def client_gone(self) -> bool:
        return self._finished or not self.context.is_active()

    def timeout(self) -> float | None:
        """Seconds left of the client's deadline, for the next stage call (None: the client set none)."""
        remaining = self.context.time_remaining()
        if remaining is None or remaining > 1e8:  # no deadline
            return None
        if remaining <= 0:
            raise StageError(grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline passed before the stages finished")
        return remaining

    def track(self, call: Any) -> Any:
        """Make `call` the one to cancel if the client goes away; returns it."""
        with self._lock:
            self._call = call
            if self._finished:
                call.cancel()
        return call

    def check(self) -> None:
        if self.client_gone():
            raise StageError(grpc.StatusCode.CANCELLED, "the client cancelled the request")


def stream_stage(pool: ReplicaPool, down: Downstream, run: Callable[[Replica, float | None], Iterator[Any]], what: str):
    """Run `run(replica, timeout)` (a generator: its events are passed through, its return value returned)
    on the least-loaded replica; retry on another when it failed before finishing with a retryable code.

    UNAVAILABLE, RESOURCE_EXHAUSTED, and CANCELLED by the stage (a server shutting down) move to the
    next replica; anything else is final. Each replica is tried once, a balanced address (several
    servers behind one name) twice, as gRPC picks another server behind it. Every stage call is safe to
    rerun from the start: Encode and Decode are pure, and Denoise is a pure function of its request given the seed.
    """
    attempts_left = {r: 2 if is_balanced(r.address) else 1 for r in pool.replicas}
    tried: list[str] = []
    last: grpc.RpcError | None = None
    while True:
        down.check()
        replica = pool.acquire(exclude={r for r, n in attempts_left.items() if n == 0})
        if replica is None:
            break
        attempts_left[replica] -= 1
        tried.append(replica.address)
        try:
            return (yield from run(replica, down.timeout()))
        except grpc.RpcError as e:
            code = e.code()
            if code == grpc.StatusCode.CANCELLED and down.client_gone():
                raise StageError(grpc.StatusCode.CANCELLED, "the client cancelled the request") from None
            if code not in RETRYABLE:
                raise StageError(*_map_stage_error(pool.stage, replica, e)) from None
            if code == grpc.StatusCode.UNAVAILABLE:
                pool.mark_unreachable(replica)
            log.warning("%s on %s failed with %s (%s); trying another replica", what, replica, code.name, e.details())
            last = e
        finally:
            pool.release(replica)
    if last is None:
        raise StageError(grpc.StatusCode.UNAVAILABLE, f"no {pool.stage} replica is SERVING "
                                                      f"({', '.join(r.address for r in pool.replicas)}); retry later")
    code = grpc.StatusCode.UNAVAILABLE if last.code() == grpc.StatusCode.CANCELLED else last.code()
    raise StageError(code, f"{what} failed on every {pool.stage} replica "
                                  f"({', '.join(dict.fromkeys(tried))}): {last.details()}")


def call_stage(pool: ReplicaPool, down: Downstream, run: Callable[[Replica, float | None], Any], what: str) -> Any:
    """`stream_stage` for a unary call: `run(replica, timeout)` returns the response."""

    def as_stream(replica: Replica, timeout: float | None) -> Iterator[Any]:
        return run(replica, timeout)
        yield  # a generator with no events

    stream = stream_stage(pool, down, as_stream, what)
    try:
        while True:
            next(stream)
    except StopIteration as stop:
        return stop.value


def _map_stage_error(stage: str, replica: Replica, e: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    """A stage's final error as the client should see it: its own mistakes keep their message; ours say which stage."""
    code = e.code()
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE):
        return code, e.details() or f"the {stage} rejected the request"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return code, f"the request's deadline passed while the {stage} ({replica.address}) was working on it"
    return code, f"the {stage} ({replica.address}) failed: {e.details()}"


# --- Requests -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelFacts:
    """What the gateway must know about the model to validate and default a request (from the stages' ModelInfo)."""

    default_height: int | None  # None: the UNet names no sample_size, so height and width are required
    default_width: int | None
    size_multiple: int = 8
    max_steps: int = MAX_STEPS
    kind: str = "text"  # text | inpaint | depth | upscale: which image inputs the model takes (services/modes.py)
    max_noise_level: int = 350  # the x4 upscaler's


@dataclasses.dataclass(frozen=True)
class Job:
    """A validated request with its defaults filled in."""

    prompt: str
    negative_prompt: str
    num_images: int
    steps: int
    guidance_scale: float
    guidance_rescale: float
    eta: float
    height: int
    width: int
    seed: int
    sampler: str = ""  # "": the checkpoint's own (the denoiser checks the name)
    priority: int = 0

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0  # as diffusers: no unconditional pass at scale ≤ 1


def job_from_proto(request: gateway_pb2.GenerateRequest, facts: ModelFacts, *, draw_seed: Callable[[], int] | None = None) -> Job:
    """Validate a GenerateRequest and fill its defaults; raises InvalidRequest saying what to change."""
    num_images = request.num_images or 1
    if num_images > MAX_IMAGES:
        raise InvalidRequest(f"num_images must be at most {MAX_IMAGES}, got {num_images}")
    steps = request.num_inference_steps or DEFAULT_STEPS
    if steps > facts.max_steps:
        raise InvalidRequest(f"num_inference_steps must be from 1 to {facts.max_steps}, got {steps}")
    guidance = request.guidance_scale if request.HasField("guidance_scale") else DEFAULT_GUIDANCE
    for name, value in (("guidance_scale", guidance), ("guidance_rescale", request.guidance_rescale), ("eta", request.eta)):
        if not math.isfinite(value):
            raise InvalidRequest(f"{name} must be a finite number, got {value}")
    if not 0.0 <= request.guidance_rescale <= 1.0:
        raise InvalidRequest(f"guidance_rescale must be between 0 and 1, got {request.guidance_rescale}")
    if request.eta < 0:
        raise InvalidRequest(f"eta must be ≥ 0, got {request.eta}")
    height, width = request.height, request.width
    if request.init_image and not (height and width):  # the init image gives the size (prepare_images checks it)
        height, width = height or facts.size_multiple, width or facts.size_multiple
    if not height or not width:
        if facts.default_height is None or facts.default_width is None:
            raise InvalidRequest("this model has no native size (its UNet config names no sample_size): give height and width")
        height, width = height or facts.default_height, width or facts.default_width
    m = facts.size_multiple
    for name, v in (("height", height), ("width", width)):
        if v < m or v % m or v > MAX_SIDE:
            raise InvalidRequest(f"{name} must be a multiple of {m} between {m} and {MAX_SIDE} for this model, got {v}")
    if request.HasField("seed"):
        seed = request.seed
    else:  # as the pipeline draws one: [0, 2^32)
        seed = draw_seed() if draw_seed else random.SystemRandom().randrange(2**32)
    return Job(prompt=request.prompt, negative_prompt=request.negative_prompt, num_images=num_images, steps=steps,
               guidance_scale=float(guidance), guidance_rescale=float(request.guidance_rescale), eta=float(request.eta),
               height=height, width=width, seed=seed, sampler=request.sampler, priority=request.priority)


def encode_request(job: Job) -> text_encoder_pb2.EncodeRequest:
    """The prompt, and its negative only when guided: one encoder call, prompts first, as the pipeline makes it."""
    negatives = [job.negative_prompt] if job.guided else []
    return text_encoder_pb2.EncodeRequest(prompts=[job.prompt], negative_prompts=negatives, unconditional=job.guided)


def has_images(request: gateway_pb2.GenerateRequest) -> bool:
    return bool(request.init_image or request.mask_image or request.depth_map or request.HasField("strength")
                or request.HasField("noise_level"))


def prepare_images(request: gateway_pb2.GenerateRequest, job: Job, facts: ModelFacts,
                   encode: Callable[[np.ndarray, int], np.ndarray]) -> modes.ModeInputs:
    """Decode the request's images and build the denoiser's image inputs (`encode` is Decoder.EncodeImage)."""
    def decoded(field: str, decode: Callable[..., np.ndarray]) -> np.ndarray | None:
        data = getattr(request, field)
        return decode(data, what=field) if data else None

    return modes.prepare(
        facts.kind, rows=job.num_images, init_image=decoded("init_image", images.decode_image),
        mask_image=decoded("mask_image", images.decode_mask), depth_map=decoded("depth_map", images.decode_depth),
        strength=request.strength if request.HasField("strength") else None,
        noise_level=request.noise_level if request.HasField("noise_level") else None,
        scale_factor=facts.size_multiple, encode=encode, seed=job.seed, height=request.height or None,
        width=request.width or None, max_noise_level=facts.max_noise_level)


def add_image_inputs(request: denoiser_pb2.DenoiseRequest, mode: modes.ModeInputs) -> None:
    """The mode's NHWC arrays onto a DenoiseRequest (NCHW on the wire)."""
    def nchw(a: np.ndarray) -> Any:
        return to_proto(np.ascontiguousarray(np.asarray(a, np.float32).transpose(0, 3, 1, 2)))

    if mode.init_latents is not None:
        request.init_latents.CopyFrom(nchw(mode.init_latents))
        request.strength = mode.strength
    if mode.extra is not None:
        request.extra.CopyFrom(nchw(mode.extra))
    if mode.blend_mask is not None:
        request.blend_mask.CopyFrom(nchw(mode.blend_mask))
    if mode.class_labels is not None:
        request.class_labels.CopyFrom(to_proto(np.asarray(mode.class_labels, np.float32)))
    request.height, request.width = mode.height, mode.width


def denoise_request(job: Job, response: text_encoder_pb2.EncodeResponse) -> denoiser_pb2.DenoiseRequest:
    """The conditioning rows repeated num_images times, as the pipeline does: (P·n, L, D)."""
    cond = np.repeat(from_proto(response.cond, name="cond", dtype="float32", ndim=3), job.num_images, axis=0)
    request = denoiser_pb2.DenoiseRequest(
        cond=to_proto(cond), seed=job.seed, noise_seed=job.seed, num_inference_steps=job.steps,
        guidance_scale=job.guidance_scale, guidance_rescale=job.guidance_rescale, eta=job.eta,
        height=job.height, width=job.width, sampler=job.sampler, priority=job.priority,
    )
    if job.guided:
        uncond = np.repeat(from_proto(response.uncond, name="uncond", dtype="float32", ndim=3), job.num_images, axis=0)
        request.uncond.CopyFrom(to_proto(uncond))
    return request


def truncation_notes(response: text_encoder_pb2.EncodeResponse) -> list[str]:
    return [f"the {'negative ' if t.negative else ''}prompt was cut at the tokenizer's limit; dropped: {t.removed_text!r}"
            for t in response.truncated]


def png_bytes(images: np.ndarray) -> list[bytes]:
    """(N, H, W, 3) uint8 → one PNG file per image."""
    from PIL import Image

    files = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        files.append(buffer.getvalue())
    return files


# --- The service --------------------------------------------------------------------


class GatewayService(gateway_pb2_grpc.GatewayServicer):
    """Chains the stage pools; each RPC is validate → encode → denoise → decode → PNGs."""

    def __init__(self, encoders: ReplicaPool, denoisers: ReplicaPool, decoders: ReplicaPool, *, max_inflight: int = 32,
                 facts: ModelFacts | None = None, metrics: StageMetrics | None = None):
        self.encoders, self.denoisers, self.decoders = encoders, denoisers, decoders
        self.max_inflight = max_inflight
        self.metrics = metrics or StageMetrics("gateway")
        self._inflight = 0
        self._lock = threading.Lock()
        self._facts = facts
        self._denoiser_info: common_pb2.ModelInfo | None = None

    # -- the model's facts, asked of the denoiser once (it knows the UNet, the scheduler and the VAE factor) --

    def facts(self, down: Downstream) -> ModelFacts:
        if self._facts is None:
            self._facts = facts_from_info(self.denoiser_info(down))
        return self._facts

    def denoiser_info(self, down: Downstream) -> common_pb2.ModelInfo:
        if self._denoiser_info is None:
            def run(replica: Replica, timeout: float | None) -> common_pb2.ModelInfo:
                return replica.stub.ModelInfo(common_pb2.ModelInfoRequest(), timeout=min(timeout or 10.0, 10.0))

            self._denoiser_info = call_stage(self.denoisers, down, run, "Denoiser.ModelInfo")
        return self._denoiser_info

    # -- RPCs --

    def Generate(self, request: gateway_pb2.GenerateRequest, context: grpc.ServicerContext) -> Iterator[gateway_pb2.GenerateEvent]:
        t0 = time.perf_counter()
        try:
            yield from self._admitted(request, context)
        finally:  # also when gRPC closes the stream of a client that went away
            self._record(context, t0)

    def _record(self, context: grpc.ServicerContext, t0: float) -> None:
        self.metrics.observe_request(time.perf_counter() - t0)
        code = ended_with(context)
        if code != grpc.StatusCode.OK:
            self.metrics.error(code.name)

    def _admitted(self, request: gateway_pb2.GenerateRequest, context: grpc.ServicerContext) -> Iterator[gateway_pb2.GenerateEvent]:
        with self._lock:
            if self._inflight >= self.max_inflight:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"the gateway has {self.max_inflight} requests in flight (its --max-inflight); retry later")
            self._inflight += 1
            self.metrics.set_queue_depth(self._inflight)
        try:
            yield from self._generate(request, context)
        except InvalidRequest as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except TensorError as e:
            context.abort(grpc.StatusCode.INTERNAL, f"a stage returned a malformed tensor: {e}")
        except StageError as e:
            context.abort(e.code, e.message)
        except Exception as e:  # noqa: BLE001 - a bug of ours: say so, and keep the traceback in the log
            log.exception("internal error in Generate")
            context.abort(grpc.StatusCode.INTERNAL, f"internal error in the gateway ({type(e).__name__}: {e}); the log has the traceback")
        finally:
            with self._lock:
                self._inflight -= 1
                self.metrics.set_queue_depth(self._inflight)

    def _generate(self, request: gateway_pb2.GenerateRequest, context: grpc.ServicerContext) -> Iterator[gateway_pb2.GenerateEvent]:
        down = Downstream(context)
        job = job_from_proto(request, self.facts(down))

        def encode(replica: Replica, timeout: float | None) -> text_encoder_pb2.EncodeResponse:
            return down.track(replica.stub.Encode.future(encode_request(job), timeout=timeout)).result()

        encoded = call_stage(self.encoders, down, encode, "Encode")
        yield gateway_pb2.GenerateEvent(progress=common_pb2.Progress(stage="encode", step=1, total_steps=1))
        denoise_in = denoise_request(job, encoded)
        if has_images(request) or self.facts(down).kind != "text":
            def encode_image(pixels: np.ndarray, stream: int) -> np.ndarray:
                message = decoder_pb2.EncodeImageRequest(images=to_proto(np.asarray(pixels, np.float32)), seed=job.seed,
                                                         stream=stream)

                def run(replica: Replica, timeout: float | None) -> decoder_pb2.EncodeImageResponse:
                    return down.track(replica.stub.EncodeImage.future(message, timeout=timeout)).result()

                reply = call_stage(self.decoders, down, run, "EncodeImage")
                return from_proto(reply.latents, name="latents", dtype="float32", ndim=4).transpose(0, 2, 3, 1)

            add_image_inputs(denoise_in, prepare_images(request, job, self.facts(down), encode_image))

        def denoise(replica: Replica, timeout: float | None) -> Iterator[gateway_pb2.GenerateEvent]:
            for event in down.track(replica.stub.Denoise(denoise_in, timeout=timeout)):
                if event.HasField("progress"):
                    yield gateway_pb2.GenerateEvent(progress=event.progress)
                elif event.HasField("latents"):
                    return from_proto(event.latents, name="latents", dtype="float32", ndim=4)
            raise StageError(grpc.StatusCode.INTERNAL, f"the denoiser ({replica.address}) ended its stream without latents")

        # A retried Denoise starts again from step 0: its progress events say so.
        latents = yield from stream_stage(self.denoisers, down, denoise, "Denoise")

        def decode(replica: Replica, timeout: float | None) -> decoder_pb2.DecodeResponse:
            call = replica.stub.Decode.future(decoder_pb2.DecodeRequest(latents=to_proto(latents)), timeout=timeout)
            return down.track(call).result()

        decoded = call_stage(self.decoders, down, decode, "Decode")
        images = from_proto(decoded.images, name="images", dtype="uint8", ndim=4)
        yield gateway_pb2.GenerateEvent(progress=common_pb2.Progress(stage="decode", step=1, total_steps=1))
        result = gateway_pb2.GenerateResult(images=png_bytes(images), seed=job.seed, truncation_notes=truncation_notes(encoded))
        self.metrics.images_served(len(images))
        yield gateway_pb2.GenerateEvent(result=result)

    def ModelInfo(self, request: common_pb2.ModelInfoRequest, context: grpc.ServicerContext) -> common_pb2.ModelInfo:
        t0 = time.perf_counter()
        try:
            return self._model_info(context)
        finally:
            self._record(context, t0)

    def _model_info(self, context: grpc.ServicerContext) -> common_pb2.ModelInfo:
        down = Downstream(context)
        try:
            facts = self.facts(down)
            denoiser = self.denoiser_info(down)
        except StageError as e:
            context.abort(e.code, e.message)
        info = common_pb2.ModelInfo(service="Gateway", model=denoiser.model, weights_dtype=denoiser.weights_dtype,
                                    activations_dtype=denoiser.activations_dtype)
        info.compiled_shapes.extend(denoiser.compiled_shapes)
        info.facts.update({
            "default_height": str(facts.default_height or 0), "default_width": str(facts.default_width or 0),
            "size_multiple": str(facts.size_multiple), "max_steps": str(facts.max_steps),
            "max_inflight": str(self.max_inflight), "kind": facts.kind,
            **{k: denoiser.facts[k] for k in ("samplers", "default_sampler", "max_noise_level") if k in denoiser.facts},
            **{f"{pool.stage}_replicas": ",".join(r.address for r in pool.replicas)
               for pool in (self.encoders, self.denoisers, self.decoders)},
        })
        return info


def facts_from_info(denoiser: common_pb2.ModelInfo) -> ModelFacts:
    """Native size, size multiple and step limit from the denoiser's ModelInfo facts (no default size: absent)."""
    f = denoiser.facts
    return ModelFacts(default_height=int(f["default_height"]) if "default_height" in f else None,
                      default_width=int(f["default_width"]) if "default_width" in f else None,
                      size_multiple=int(f.get("vae_scale_factor", 8)), max_steps=int(f.get("max_steps", MAX_STEPS)),
                      kind=f.get("kind", "text"), max_noise_level=int(f.get("max_noise_level", 350)))


# --- Wiring -------------------------------------------------------------------------


def split_addresses(text: str | Sequence[str]) -> list[str]:
    """'a:1,b:2' or ['a:1', 'b:2,c:3'] → ['a:1', 'b:2', 'c:3']."""
    items = [text] if isinstance(text, str) else list(text)
    return [a.strip() for item in items for a in item.split(",") if a.strip()]


def build_server(service: GatewayService, address: str, *, workers: int | None = None,
                 credentials: grpc.ServerCredentials | None = None) -> tuple[grpc.Server, int]:
    """A grpc server hosting the gateway, grpc.health.v1 and reflection; (server, bound port). Not started.

    credentials: grpc.ssl_server_credentials(...) to serve TLS; None: plaintext.
    """
    from grpc_health.v1 import health
    from grpc_reflection.v1alpha import reflection

    # One thread per request in flight (each waits on a stage) plus a few for health, ModelInfo and the refusals;
    # past that gRPC itself answers RESOURCE_EXHAUSTED rather than queueing without bound.
    workers = workers or service.max_inflight + 8
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), maximum_concurrent_rpcs=workers,
                         options=[("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                                  ("grpc.max_receive_message_length", 4 * 1024 * 1024)])
    gateway_pb2_grpc.add_GatewayServicer_to_server(service, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", "sdmesh.v1.Gateway"):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    names = (gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    server.health = health_servicer  # type: ignore[attr-defined]  # so `serve` can report NOT_SERVING on shutdown
    return server, port


DEFAULT_ADDRESSES = {"encoder": "127.0.0.1:50052", "denoiser": "127.0.0.1:50053", "decoder": "127.0.0.1:50054"}


def main(args: argparse.Namespace) -> int:
    """`sdmesh serve gateway`: serve until SIGTERM or SIGINT, then stop cleanly. Wiring only."""
    import signal

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    pools = [ReplicaPool(stage, split_addresses(getattr(args, stage, None) or DEFAULT_ADDRESSES[stage]))
             for stage in ("encoder", "denoiser", "decoder")]
    service = GatewayService(*pools, max_inflight=args.max_inflight)
    server, port = build_server(service, f"{args.host}:{args.port}")
    if getattr(args, "metrics_port", None) is not None:
        bound = service.metrics.serve_http(args.metrics_port, args.host)
        log.warning("sdmesh.v1.Gateway metrics on http://%s:%d/metrics", args.host, bound)
    for name in ("", "sdmesh.v1.Gateway"):  # until the stages answer (below)
        server.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)  # type: ignore[attr-defined]
    server.start()
    log.warning("sdmesh.v1.Gateway listening on %s:%d (encoder %s; denoiser %s; decoder %s)", args.host, port,
                *(",".join(r.address for r in pool.replicas) for pool in pools))
    serving = None
    while True:
        # The gateway is SERVING while every stage has a SERVING replica, so health checks
        # (and `sdmesh up`, compose, load balancers) wait for the whole chain, not just this process.
        now = all(any(r.health == health_pb2.HealthCheckResponse.SERVING for r in pool.replicas) for pool in pools)
        if now != serving:
            status = health_pb2.HealthCheckResponse.SERVING if now else health_pb2.HealthCheckResponse.NOT_SERVING
            for name in ("", "sdmesh.v1.Gateway"):
                server.health.set(name, status)  # type: ignore[attr-defined]
            log.warning("sdmesh.v1.Gateway %s", "SERVING" if now else "NOT_SERVING: a stage has no SERVING replica")
            serving = now
        if stopping.wait(0.25):
            break
    log.warning("sdmesh.v1.Gateway stopping")
    server.health.enter_graceful_shutdown()  # type: ignore[attr-defined]
    server.stop(grace=5).wait()
    for pool in pools:
        pool.close()
    service.metrics.close()
    return 0
