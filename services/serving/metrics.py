"""Prometheus metrics of one service, served over HTTP (HTTPS with TLS) on a port of its own (`--metrics-port`).

    metrics = StageMetrics("denoiser")     # one registry per instance: two servers in one process never mix
    metrics.serve_http(9100)               # GET http://HOST:9100/metrics, Prometheus' text format
    metrics.serve_http(9100, tls=tls)      # HTTPS with a service's certificate (tls.ServerTLS); with its
                                           # client CA, a scraper must present a certificate that CA signed

Every metric carries `stage` = text_encoder | denoiser | decoder | gateway:

    sdmesh_queue_depth{stage}                 gauge      calls admitted and not finished: running + waiting for the
                                                         device (a stage's DeviceQueue);
                                                         requests in flight (the gateway)
    sdmesh_batch_occupancy{stage}             gauge      the last device batch's used rows / compiled rows (0..1)
    sdmesh_batch_size{stage}                  histogram  rows used per device batch
    sdmesh_chunk_seconds{stage}               histogram  seconds per compiled program call (a denoiser chunk, an encode,
                                                         a decode): device time, without queueing or the wire
    sdmesh_request_seconds{stage}             histogram  seconds per RPC, from arrival to its status, queueing included
    sdmesh_images_served_total{stage}         counter    images returned
    sdmesh_errors_total{stage,code}           counter    RPCs that ended with a status other than OK, by its name
                                                         (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, CANCELLED, ...)
    sdmesh_tenant_requests_total{stage,tenant,code}      the gateway's requests by tenant (its API key's) and status
    sdmesh_tenant_images_served_total{stage,tenant}      images returned, by tenant

Who records what: `server.StageServer` records request latency, errors and queue depth for every
`/sdmesh.*` RPC of a stage; the stage services record batches, chunks and images; the gateway
records its own requests, in-flight count, errors and images. `sdmesh top` (client/top.py) reads
these names. No JAX here: the gateway uses this module too.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import start_http_server

if TYPE_CHECKING:
    from sdmesh.services.serving.tls import ServerTLS

STAGES = ("text_encoder", "denoiser", "decoder", "gateway")
# Requests run from milliseconds (ModelInfo, an encode) to minutes (a long denoise on a slow device).
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0, 600.0)
CHUNK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # up to MAX_IMAGES
# Codes our servers answer with, present at 0 from the start so a rate() over them is defined before the first error.
KNOWN_ERROR_CODES = (
    "INVALID_ARGUMENT",
    "RESOURCE_EXHAUSTED",
    "INTERNAL",
    "CANCELLED",
    "DEADLINE_EXCEEDED",
    "UNAVAILABLE",
)


class StageMetrics:
    """The metrics of one service (one `stage`), in a registry of its own."""

    def __init__(self, stage: str):
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {', '.join(STAGES)}; got {stage!r}")
        self.stage = stage
        self.registry = CollectorRegistry()
        r, s = self.registry, ["stage"]
        self._queue_depth = Gauge(
            "sdmesh_queue_depth", "Calls admitted and not finished (running + waiting).", s, registry=r
        ).labels(stage)
        self._occupancy = Gauge(
            "sdmesh_batch_occupancy", "The last device batch's used rows / compiled rows.", s, registry=r
        ).labels(stage)
        self._batch = Histogram(
            "sdmesh_batch_size", "Rows used per device batch.", s, buckets=BATCH_BUCKETS, registry=r
        ).labels(stage)
        self._chunk = Histogram(
            "sdmesh_chunk_seconds", "Seconds per compiled program call.", s, buckets=CHUNK_BUCKETS, registry=r
        ).labels(stage)
        self._request = Histogram(
            "sdmesh_request_seconds", "Seconds per RPC, queueing included.", s, buckets=REQUEST_BUCKETS, registry=r
        ).labels(stage)
        self._images = Counter("sdmesh_images_served", "Images returned.", s, registry=r).labels(stage)
        self._errors = Counter(
            "sdmesh_errors", "RPCs that ended with a status other than OK.", ["stage", "code"], registry=r
        )
        for code in KNOWN_ERROR_CODES:
            self._errors.labels(stage, code)
        # tenants come from the gateway's keys file, so these labels stay as few as its tenants
        self._tenant_requests = Counter(
            "sdmesh_tenant_requests", "Requests by tenant and status.", ["stage", "tenant", "code"], registry=r
        )
        self._tenant_images = Counter(
            "sdmesh_tenant_images_served", "Images returned, by tenant.", ["stage", "tenant"], registry=r
        )
        # models are the gateway's --route names: as few as the models it serves
        self._model_requests = Counter(
            "sdmesh_model_requests", "Requests by model and status.", ["stage", "model", "code"], registry=r
        )
        self._model_images = Counter(
            "sdmesh_model_images_served", "Images returned, by model.", ["stage", "model"], registry=r
        )
        self._model_seconds = Histogram(
            "sdmesh_model_request_seconds", "Seconds per request, by model.", ["stage", "model"],
            buckets=REQUEST_BUCKETS, registry=r,
        )  # fmt: skip
        self._http: Any = None
        self._lock = threading.Lock()

    def serve_http(self, port: int, host: str = "0.0.0.0", *, tls: ServerTLS | None = None) -> int:
        """Serve /metrics on host:port from a daemon thread; returns the bound port (port 0: any free one).

        tls: HTTPS with its certificate, and with its client CA only for scrapers presenting a certificate
        that CA signed; None: plain HTTP."""
        secure: dict[str, Any] = {}
        if tls is not None:
            secure = {"certfile": str(tls.cert), "keyfile": str(tls.key)}
            if tls.client_ca is not None:
                secure |= {"client_cafile": str(tls.client_ca), "client_auth_required": True}
        with self._lock:
            if self._http is not None:
                raise RuntimeError(f"the {self.stage} metrics are already served on port {self._http.server_port}")
            try:
                self._http, _ = start_http_server(port, addr=host, registry=self.registry, **secure)
            except OSError as e:
                raise OSError(f"cannot serve metrics on {host}:{port}: {e.strerror or e}") from e
            return self._http.server_port

    def close(self) -> None:
        """Stop serving /metrics (the values stay)."""
        with self._lock:
            if self._http is not None:
                self._http.shutdown()
                self._http.server_close()
                self._http = None

    def set_queue_depth(self, n: int) -> None:
        self._queue_depth.set(n)

    def observe_batch(self, used: int, capacity: int) -> None:
        """One device batch: `used` rows of a program compiled for `capacity`."""
        if capacity < 1 or not 0 <= used <= capacity:
            raise ValueError(f"a batch uses 0 to capacity rows of capacity ≥ 1; got {used} of {capacity}")
        self._occupancy.set(used / capacity)
        self._batch.observe(used)

    def observe_chunk(self, seconds: float) -> None:
        self._chunk.observe(seconds)

    def observe_request(self, seconds: float) -> None:
        self._request.observe(seconds)

    def images_served(self, n: int) -> None:
        self._images.inc(n)

    def tenant_request(self, tenant: str, code: str) -> None:
        """A request of `tenant` ended with status `code` (OK included)."""
        self._tenant_requests.labels(self.stage, tenant, getattr(code, "name", code)).inc()

    def tenant_images(self, tenant: str, n: int) -> None:
        self._tenant_images.labels(self.stage, tenant).inc(n)

    def model_request(self, model: str, code: str, seconds: float) -> None:
        """A request for `model` ended with status `code` (OK included) after `seconds`."""
        self._model_requests.labels(self.stage, model, getattr(code, "name", code)).inc()
        self._model_seconds.labels(self.stage, model).observe(seconds)

    def model_images(self, model: str, n: int) -> None:
        self._model_images.labels(self.stage, model).inc(n)

    def error(self, code: str) -> None:
        """An RPC ended with status `code`: a grpc.StatusCode name such as "INVALID_ARGUMENT" (or the StatusCode)."""
        self._errors.labels(self.stage, getattr(code, "name", code)).inc()
