"""The plumbing every stage service shares: one gRPC server, health, reflection, a bounded queue, error statuses.

    StageServer(service, host=, port=, max_queue=).start()   listening, health NOT_SERVING
    server.warm_up()                                         compiles the service's shapes, then SERVING
    serve(service, ...)                                      both, then waits for SIGTERM/SIGINT and stops

A service (text_encoder_service, denoiser_service, decoder_service) hands this module
a `StageService`: its gRPC servicer, the names of the RPCs that use the device, the
shapes to compile before serving, and the largest message it will send or receive.

Errors: handlers raise plain exceptions and `StatusInterceptor`, the one place that
chooses status codes, turns them into statuses (`status_for`):

    InvalidRequest, TensorError, CheckpointError  → INVALID_ARGUMENT, with their message
    Overloaded (the queue is full, the device OOM) → RESOURCE_EXHAUSTED, at once
    AdaptersBusy (every LoRA bank row in use)     → RESOURCE_EXHAUSTED
    FollowerLost (a multi-process stage lost one) → UNAVAILABLE
    Draining (the stage is shutting down)         → UNAVAILABLE
    anything else                                 → INTERNAL: a bug of ours, logged with its traceback

The same interceptor admits device RPCs through the `DeviceQueue`: one runs at a time,
up to `max_queue` wait, and a call beyond that is refused rather than left waiting.

Metrics (services/metrics.py): the interceptor records every `/sdmesh.*` RPC's latency and, when its
status is not OK, its code (refusals and callers gone included); the `DeviceQueue` reports its depth.
They go to the service's own `StageMetrics` (`StageService.metrics`, where the servicer records batches,
chunks and images), and `serve(metrics_port=)` serves them over HTTP.

TLS (services/serving/tls.py): `serve(tls=)` (`StageServer(credentials=)`) listens with that certificate
instead of plaintext, and with a client CA refuses clients without a certificate it signed (mutual TLS);
the metrics are then served over HTTPS with the same certificate and client CA. `tls_from_args` reads
`sdmesh serve`'s --tls-* flags.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import TYPE_CHECKING, Any, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sdmesh.services.checkpoints.weights import CheckpointError
from sdmesh.services.engine.errors import AdaptersBusy, FollowerLost
from sdmesh.services.inputs import contract
from sdmesh.services.inputs.contract import DEFAULT_MAX_QUEUE
from sdmesh.services.inputs.errors import InvalidRequest
from sdmesh.services.serving.errors import CallerGone, Draining, Overloaded
from sdmesh.services.serving.metrics import StageMetrics
from sdmesh.services.serving.tls import ServerTLS, server_tls_from_args
from sdmesh.v1.tensors import TensorError

if TYPE_CHECKING:  # the gateway imports this module and no JAX
    from sdmesh.services.engine.programs import Programs


class Stage(Protocol):
    """What a multi-process stage runs in lockstep: an engine stage's compiled programs and its params."""

    programs: Programs
    params: Any


log = logging.getLogger("sdmesh.server")

MIN_MESSAGE_BYTES = 4 * 1024 * 1024  # gRPC's own default: small requests never need more
MESSAGE_MARGIN = 1024 * 1024  # room for the fields around the tensors
# Threads beyond the queue's: health Watch streams hold one each for as long as a gateway watches, and
# ModelInfo, reflection and the calls refused when the queue is full need some while the queue is full.
EXTRA_WORKERS = 32
DEADLINE_SLACK_SECONDS = 0.1  # a call that ends this close to its deadline counts as DEADLINE_EXCEEDED (`ended_with`)


@dataclasses.dataclass(frozen=True)
class StageService:
    """What a stage module gives the server."""

    name: str  # full gRPC service name, e.g. "sdmesh.v1.Denoiser"; health reports under it and under ""
    servicer: Any
    add_to_server: Callable[[Any, grpc.Server], None]  # the generated add_*Servicer_to_server
    device_methods: frozenset[str]  # RPC names that run on the device and wait in the queue, e.g. {"Denoise"}
    warm_up: Callable[[], None]  # compiles the configured shapes: a warm-up call per shape
    max_message_bytes: int  # the largest request or response of the configured shapes
    metrics: StageMetrics | None = (
        None  # where the server records; the servicer records batches, chunks, images here too
    )
    # The engine stage served (its .programs and .params): over several processes they run in lockstep.
    stage: Stage | None = None
    # On SIGTERM, before the server stops: admit nothing, let running work finish for up to the given seconds,
    # then end the rest with Draining (UNAVAILABLE); returns how many calls were ended. None: the server's own stop.
    drain: Callable[[float], int] | None = None


# --- errors → statuses: the one place ---------------------------------------------


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status a handler's exception becomes."""
    if isinstance(error, (Overloaded, AdaptersBusy)):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(error)
    if isinstance(error, (FollowerLost, Draining)):
        return grpc.StatusCode.UNAVAILABLE, str(error)
    if isinstance(error, (InvalidRequest, TensorError, CheckpointError)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(error)
    return (
        grpc.StatusCode.INTERNAL,
        f"internal error ({type(error).__name__}: {error}); this is a bug in sdmesh, the server log has the traceback",
    )


class DeviceQueue:
    """One call on the device at a time; at most `max_queue` more wait; past that, Overloaded at once."""

    def __init__(self, max_queue: int, on_change: Callable[[int], None] | None = None):
        if max_queue < 0:
            raise ValueError(f"max_queue must be ≥ 0, got {max_queue}")
        self.max_queue = max_queue
        self._on_change = on_change or (lambda admitted: None)  # told the new count (the queue-depth gauge)
        self._device = threading.Lock()
        self._count = threading.Lock()
        self._admitted = 0  # running + waiting

    @property
    def admitted(self) -> int:
        """Calls running or waiting now."""
        return self._admitted

    @contextlib.contextmanager
    def turn(self, context: grpc.ServicerContext) -> Iterator[None]:
        with self._count:
            if self._admitted > self.max_queue:  # one running and max_queue waiting
                raise Overloaded(
                    f"the stage is busy: 1 call running and {self.max_queue} waiting (--max-queue); "
                    "retry later or on another replica"
                )
            self._admitted += 1
            self._on_change(self._admitted)
        try:
            while not self._device.acquire(timeout=0.05):
                if not context.is_active():  # cancelled or past its deadline while waiting: give up the place
                    raise CallerGone()
            try:
                yield
            finally:
                self._device.release()
        finally:
            with self._count:
                self._admitted -= 1
                self._on_change(self._admitted)


MAX_STATUS_CHARS = 2000  # a status message travels as metadata (16 kB at most, percent-encoded): keep it well under


class Unparsable:
    """A request whose bytes are not the RPC's message: the handler answers INVALID_ARGUMENT, not gRPC's INTERNAL."""

    def __init__(self, message: str, error: Exception):
        self.why = (
            f"the request is not a valid {message} message ({type(error).__name__}); send one built from the .proto"
        )


class ParseInterceptor(grpc.ServerInterceptor):
    """Requests that do not parse as their message are refused INVALID_ARGUMENT (grpcio itself would answer
    INTERNAL, "Exception deserializing request!", before any handler runs). On every server, the gateway's too."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        deserialize = handler.request_deserializer
        message = handler_call_details.method.rsplit("/", 1)[-1] + "Request"

        def parse(data: bytes) -> Any:
            try:
                return deserialize(data)
            except Exception as e:  # any parse failure is the caller's bytes, never ours
                return Unparsable(message, e)

        if handler.response_streaming:
            behaviour = handler.unary_stream

            def streaming(request, context):
                if isinstance(request, Unparsable):
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.why)
                yield from behaviour(request, context)

            return grpc.unary_stream_rpc_method_handler(
                streaming, request_deserializer=parse, response_serializer=handler.response_serializer
            )
        unary = handler.unary_unary

        def call(request, context):
            if isinstance(request, Unparsable):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.why)
            return unary(request, context)

        return grpc.unary_unary_rpc_method_handler(
            call, request_deserializer=parse, response_serializer=handler.response_serializer
        )


class StatusInterceptor(grpc.ServerInterceptor):
    """Turns handler exceptions into statuses (`status_for`), queues device RPCs (`DeviceQueue`), and records
    each RPC's latency and non-OK status code in `metrics`."""

    def __init__(self, queue: DeviceQueue, device_methods: frozenset[str], metrics: StageMetrics | None = None):
        self.queue, self.device_methods, self.metrics = queue, device_methods, metrics
        self.active = 0  # our RPCs running now (not health or reflection): a drain waits for these alone
        self._active_lock = threading.Lock()

    def _count(self, change: int) -> None:
        with self._active_lock:
            self.active += change

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        ours = handler_call_details.method.startswith("/sdmesh.")  # health and reflection keep their own handling
        if handler is None or not ours or handler.request_streaming:  # none of our RPCs stream requests
            return handler
        queued = handler_call_details.method.rsplit("/", 1)[-1] in self.device_methods
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(handler.unary_stream, queued),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.unary_unary_rpc_method_handler(
            self._unary(handler.unary_unary, queued),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _admit(self, queued: bool, context: grpc.ServicerContext):
        return self.queue.turn(context) if queued else contextlib.nullcontext()

    def _unary(self, behaviour, queued: bool):
        def call(request, context):
            t0 = time.perf_counter()
            self._count(1)
            try:
                with self._admit(queued, context):
                    if context.is_active():
                        return behaviour(request, context)
            except CallerGone:
                pass
            except Exception as e:  # this is the one place errors become statuses
                _abort(context, e)
            finally:
                self._count(-1)
                self._record(context, t0)
            return None

        return call

    def _streaming(self, behaviour, queued: bool):
        def call(request, context):
            t0 = time.perf_counter()
            self._count(1)
            try:
                with self._admit(queued, context):
                    if context.is_active():
                        yield from behaviour(request, context)
            except CallerGone:
                pass
            except Exception as e:  # this is the one place errors become statuses
                _abort(context, e)
            finally:  # also when gRPC closes the generator of a call whose client went away
                self._count(-1)
                self._record(context, t0)

        return call

    def _record(self, context: grpc.ServicerContext, t0: float) -> None:
        """The call's latency, and its status code unless OK."""
        if self.metrics is None:
            return
        self.metrics.observe_request(time.perf_counter() - t0)
        code = ended_with(context)
        if code != grpc.StatusCode.OK:
            self.metrics.error(code.name)


def _abort(context: grpc.ServicerContext, error: Exception) -> None:
    code, message = status_for(error)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("internal error", exc_info=error)
    context.abort(code, short(message))


def short(message: str) -> str:
    """A status message cut to MAX_STATUS_CHARS, so no echo of a caller's input can pass gRPC's metadata limit."""
    return message if len(message) <= MAX_STATUS_CHARS else message[: MAX_STATUS_CHARS - 20] + " … (cut short)"


def ended_with(context: grpc.ServicerContext) -> grpc.StatusCode:
    """The status a call is ending with: the code it was aborted with or set, else CANCELLED or DEADLINE_EXCEEDED
    if the client is gone (cancelled, or its deadline passed, while the call waited or ran), else OK."""
    code = context.code()
    if code is not None and code != grpc.StatusCode.OK:
        return code
    if context.is_active():
        return grpc.StatusCode.OK
    # A client whose deadline passes cancels the call itself, which can reach us a little before our copy of the
    # deadline (sent as a timeout, so it ends later by the transit time): a call gone that close to it timed out.
    remaining = context.time_remaining()
    timed_out = remaining is not None and remaining < DEADLINE_SLACK_SECONDS
    return grpc.StatusCode.DEADLINE_EXCEEDED if timed_out else grpc.StatusCode.CANCELLED


# --- the server ---------------------------------------------------------------------


# gRPC sets SO_REUSEPORT by default: a second server on a taken port (or a port-0 bind racing another
# server's) would then share it and take part of its connections. Without it, a clash fails at bind.
NO_SHARED_PORT = ("grpc.so_reuseport", 0)


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    size = max(MIN_MESSAGE_BYTES, max_message_bytes + MESSAGE_MARGIN)
    return [("grpc.max_send_message_length", size), ("grpc.max_receive_message_length", size)]


def stage_name(service_name: str) -> str:
    """The metrics' stage label of a gRPC service: "sdmesh.v1.TextEncoder" → "text_encoder"."""
    short = service_name.rsplit(".", 1)[-1]
    return "".join(f"_{c.lower()}" if c.isupper() and i else c.lower() for i, c in enumerate(short))


def stop_when_idle(server: grpc.Server, grace: float, busy: Callable[[], bool]) -> None:
    """Refuse new calls now; stop once `busy()` is false (our own calls are done) or `grace` seconds pass.
    Waiting on gRPC's grace alone would wait it out for idle health Watch streams."""
    stopped = server.stop(grace)
    while busy() and not stopped.wait(0.05):
        pass
    server.stop(0).wait()  # what is left is health watchers and reflection


class StageServer:
    """A gRPC server hosting one stage, with health (NOT_SERVING until warmed up), reflection and metrics
    (the service's `StageMetrics`, or a new one; served over HTTP only by `serve(metrics_port=)`).

    credentials: grpc.ssl_server_credentials(...) (`ServerTLS.credentials()`) to serve TLS; None: plaintext.
    """

    def __init__(
        self,
        service: StageService,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_queue: int = DEFAULT_MAX_QUEUE,
        credentials: grpc.ServerCredentials | None = None,
    ):
        self.service, self.host = service, host
        self.metrics = service.metrics or StageMetrics(stage_name(service.name))
        self.queue = DeviceQueue(max_queue, on_change=self.metrics.set_queue_depth)
        self.health = health.HealthServicer()
        self.interceptor = StatusInterceptor(self.queue, service.device_methods, self.metrics)
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_queue + 1 + EXTRA_WORKERS, thread_name_prefix="sdmesh-rpc"),
            interceptors=[ParseInterceptor(), self.interceptor],
            options=[*channel_options(service.max_message_bytes), NO_SHARED_PORT],
        )
        service.add_to_server(service.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((service.name, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        address = f"{host}:{port}"
        self.port = (
            self.server.add_secure_port(address, credentials) if credentials else self.server.add_insecure_port(address)
        )
        if self.port == 0:
            raise OSError(f"could not listen on {host}:{port} (in use, or not an address of this machine)")
        self._set(health_pb2.HealthCheckResponse.NOT_SERVING)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _set(self, status: int) -> None:
        for name in ("", self.service.name):
            self.health.set(name, status)

    def start(self) -> StageServer:
        self.server.start()
        return self

    def warm_up(self) -> float:
        """Compile the configured shapes, then report SERVING; returns the seconds it took."""
        t0 = time.perf_counter()
        self.service.warm_up()
        self._set(health_pb2.HealthCheckResponse.SERVING)
        return time.perf_counter() - t0

    def drain(self, grace: float) -> int:
        """Shut down losing nothing: NOT_SERVING at once; the service's `drain` (the denoiser: admit nothing, finish
        what runs, end the rest UNAVAILABLE); new calls refused; ours in flight finish within `grace` seconds in
        all. Returns how many calls were ended unfinished. Health Watch streams do not hold it up."""
        self.health.enter_graceful_shutdown()
        t0 = time.monotonic()
        ended = self.service.drain(grace) if self.service.drain is not None else 0
        stop_when_idle(self.server, max(grace - (time.monotonic() - t0), 0.0), lambda: self.interceptor.active > 0)
        self.metrics.close()
        return ended

    def stop(self, grace: float | None = 5.0) -> None:
        """Report NOT_SERVING, refuse new calls, let running ones finish for `grace` seconds; stop serving metrics."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self.metrics.close()


def serve(
    service: StageService,
    *,
    host: str,
    port: int,
    max_queue: int = DEFAULT_MAX_QUEUE,
    grace: float = contract.DEFAULT_DRAIN_SECONDS,
    metrics_port: int | None = None,
    tls: ServerTLS | None = None,
) -> int:
    """Start, warm up, serve until SIGTERM or SIGINT, stop cleanly. Returns the exit status (0).

    Logs "<service> SERVING on HOST:PORT" once warm (with --port 0 that is how a launcher learns the port).
    A signal during warm-up ends the process at once: nothing is in flight yet. After it, SIGTERM drains: health
    turns NOT_SERVING at once (gateways stop sending), the service's `drain` admits nothing new and lets running
    calls finish for up to `grace` seconds (--drain-seconds), the rest end UNAVAILABLE (a gateway retries them on
    another replica), and then the server stops.
    metrics_port: serve Prometheus metrics on http://HOST:metrics_port/metrics from the start (0: any free
    port; logged as "<service> metrics on http://HOST:PORT/metrics"); None: not served.
    tls: serve gRPC over TLS, and the metrics over HTTPS, with this certificate (and client CA); None: plaintext.
    """
    from sdmesh.services.engine import distributed  # stage services only: JAX is loaded already

    if distributed.is_follower():
        # no gRPC here: it runs every program process 0 sends it, until process 0 stops or dies
        stage = _stage(service)
        code = distributed.follow(stage.programs, stage.params)
        logging.shutdown()
        os._exit(code)
    credentials = tls.credentials() if tls else None
    server = StageServer(service, host=host, port=port, max_queue=max_queue, credentials=credentials).start()
    security = tls.describe() if tls else "plaintext"
    log.warning("%s listening on %s, %s (NOT_SERVING until warmed up)", service.name, server.address, security)
    leader = None
    if distributed.is_multi_process():  # process 0: every program call goes to the followers first
        leader = distributed.Leader.open(on_lost=lambda _why: server._set(health_pb2.HealthCheckResponse.NOT_SERVING))
        _stage(service).programs.lead(leader)
    if metrics_port is not None:
        bound = server.metrics.serve_http(metrics_port, host, tls=tls)
        scheme = "https" if tls else "http"
        log.warning("%s metrics on %s://%s/metrics", service.name, scheme, _host_port(host, bound))
    seconds = server.warm_up()
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    log.warning("%s SERVING on %s (warm-up %.1fs)", service.name, server.address, seconds)
    while not stopping.wait(0.5):
        pass
    log.warning("%s stopping: NOT_SERVING, draining calls in flight for up to %.0fs", service.name, grace)
    ended = server.drain(grace)
    if ended:
        log.warning("%s ended %d calls unfinished (UNAVAILABLE: retried elsewhere)", service.name, ended)
    if leader is not None:
        leader.close()  # the followers exit too
    log.warning("%s stopped", service.name)
    # Everything is finished; skip interpreter teardown, where gRPC's and XLA's native threads can
    # abort the process ("terminate called ... exception not rethrown") after a clean stop.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _stage(service: StageService) -> Stage:
    if service.stage is None:
        raise TypeError(f"{service.name} names no engine stage, so it cannot run over several processes")
    return service.stage


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- what every stage's main() shares -------------------------------------------------


def tls_from_args(args: Any) -> ServerTLS | None:
    """`sdmesh serve`'s --tls-cert, --tls-key, --tls-client-ca, read and checked; None: plaintext."""
    return server_tls_from_args(args)


def check_size(height: int, width: int, sizes: set[tuple[int, int]] | None) -> None:
    """With --strict-shapes, only the configured sizes are served: anything else is refused, not compiled."""
    if sizes is not None and (height, width) not in sizes:
        served = ", ".join(f"{h}x{w}" for h, w in sorted(sizes))
        raise InvalidRequest(
            f"{height}x{width} is not a size this service serves (--strict-shapes: {served}); "
            "ask for one of those, or use a replica started with that size in its --shapes"
        )


def check_shapes(shapes: list[tuple[int, int, int]], multiple: int) -> None:
    """--shapes a stage can serve: sizes as requests may ask for them, batches as large as requests may be."""
    for b, h, w in shapes:
        if b > contract.MAX_IMAGES:
            raise InvalidRequest(f"--shapes {b}x{h}x{w}: batch must be at most {contract.MAX_IMAGES}")
        try:
            contract.check_size(h, w, multiple=multiple)
        except InvalidRequest as e:
            raise InvalidRequest(f"--shapes {b}x{h}x{w}: {e}") from None


def parse_shapes(text: str | None) -> list[tuple[int, int, int]] | None:
    """'1x512x512,2x512x768' → [(1, 512, 512), (2, 512, 768)]; BATCHxSIZE means a square. None stays None."""
    if not text:
        return None
    shapes = []
    for part in text.split(","):
        try:
            dims = [int(d) for d in part.strip().lower().split("x")]
        except ValueError:
            dims = []
        if len(dims) == 2:
            dims.append(dims[1])
        if len(dims) != 3 or min(dims) < 1:
            raise InvalidRequest(
                f"--shapes: expected BATCHxHEIGHTxWIDTH items separated by commas, e.g. 1x512x512,2x512x512; "
                f"got {part!r}"
            )
        shapes.append(tuple(dims))
    return shapes


def load_setup(args: Any) -> tuple[Any, Any, Any]:
    """(checkpoint folder, RuntimeOptions, LoadOptions) from `sdmesh serve` arguments; enables the JAX cache."""
    from pathlib import Path

    from sdmesh.services.checkpoints import checkpoint
    from sdmesh.services.engine import distributed, sharding, stages

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    distributed.initialize_from_args(args)  # before any device is touched: the mesh may span several processes
    options = stages.RuntimeOptions(
        weights_dtype=args.weights_dtype,
        activations_dtype=args.activations_dtype,
        precision=args.precision,
        attention=args.attention,
        jax_cache_dir=args.jax_cache_dir,
        mesh=sharding.mesh_config(args),
    )
    if options.jax_cache_dir:
        stages.enable_compilation_cache(options.jax_cache_dir)
    folder = checkpoint.resolve(
        args.model, revision=args.revision, variant=args.variant, config=args.config, tokenizer=args.tokenizer,
        prediction_type=args.prediction_type, original_config=args.original_config, allow_pickle=args.allow_pickle,
    )  # fmt: skip
    load = stages.LoadOptions(
        variant=args.variant, allow_pickle=args.allow_pickle, unet_checkpoint=args.unet_checkpoint,
        lora_dir=args.lora_dir, max_adapters=args.max_adapters, embeddings_dir=args.embeddings_dir,
        controlnets=tuple((name, Path(source)) for name, source in args.controlnet),
    )  # fmt: skip
    return folder, options, load


def device_facts(mesh: Any = None) -> tuple[list[str], dict[str, int]]:
    """(devices, mesh axis sizes) of a stage: its mesh's, or without one every device JAX sees as one data axis."""
    import jax

    if mesh is not None:
        return [str(d) for d in mesh.devices.flat], dict(mesh.shape)
    devices = [str(d) for d in jax.devices()]
    return devices, {"data": len(devices)}
