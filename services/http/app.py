"""The HTTP front: the gateway's requests over HTTP, in the gateway's own process.

    app = create_app(Front(gateway_service))         a FastAPI app; `serve(...)` runs it on uvicorn in a thread

Routes (the OpenAPI document at /openapi.json, browsable at /docs, is generated from the models below):

    GET  /                              the web page (static files shipped in the package; no build step)
    GET  /health                        200 while the gateway is serving (no key needed)
    GET  /v1/info                       the model's facts: sizes, steps, samplers, image limit; whether keys are needed
    POST /v1/jobs                       a generation, answered at once with its id (202)
    GET  /v1/jobs/{id}                  its state, progress and latest preview; its images when done
    GET  /v1/jobs/{id}/events           the same as server-sent events, until it ends
    DELETE /v1/jobs/{id}                cancel it (the denoiser drops it within one chunk)
    GET  /v1/files/{name}               PNGs of answers given as `url`, for a while
    POST /v1/images/generations|edits   OpenAI's Images API (openai_api.py)
    /sdapi/v1/*                         AUTOMATIC1111's API (a1111_api.py)

Every generation is a job through the gateway's admission (`GatewayService.admit`), so HTTP and gRPC requests share
its --max-inflight bound, its tenants and the stages' batching. With --api-keys every route but the page and
/health needs `Authorization: Bearer KEY` (401 otherwise). Errors keep the gateway's messages, with the HTTP
status of their gRPC one (400 bad input, 401, 429 overload with Retry-After, 503 no replica, 504 deadline), in
OpenAI's error shape, or A1111's under /sdapi. A body over --http-max-body is refused (413) before it is read whole.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from importlib import resources
from typing import Any, Literal

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sdmesh.services.http import a1111_api, openai_api
from sdmesh.services.http.common import (
    Caller,
    Front,
    LoraBody,
    decode_base64,
    error_body,
    generate_request,
    http_status,
    not_found,
)
from sdmesh.services.http.jobs import Job
from sdmesh.services.inputs import contract
from sdmesh.services.serving.gateway import Refused
from sdmesh.services.serving.tenants import Tenant, retry_after_header

log = logging.getLogger("sdmesh.http")

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]


# --- bodies -------------------------------------------------------------------------


class GenerationBody(BaseModel):
    """A generation (POST /v1/jobs): the gateway's GenerateRequest as JSON, images in base64."""

    model_config = ConfigDict(extra="ignore")

    prompt: str
    negative_prompt: str = ""
    n: int = Field(1, description="Images per request.")
    width: int | None = Field(None, description="Pixels; none: the model's own size.")
    height: int | None = None
    steps: int | None = Field(None, description="Denoising steps; none: 50.")
    guidance_scale: float | None = Field(None, description="None: 7.5; ≤ 1 turns guidance off.")
    guidance_rescale: float = 0.0
    guidance_cutoff: float = Field(1.0, description="The fraction of the steps guided, (0, 1]; below 1 is faster.")
    sampler: str | None = Field(None, description="See /v1/info's samplers; none: the checkpoint's own.")
    seed: int | None = Field(None, description="None or -1: a random seed, given back with the images.")
    eta: float = 0.0
    strength: float | None = Field(None, description="With init_image: how much of the schedule runs, (0, 1].")
    noise_level: int | None = None
    init_image: str | None = Field(None, description="Base64 PNG/JPEG (a data: URL is fine): img2img, inpainting.")
    mask: str | None = Field(None, description="Base64 PNG: white repaints, black keeps.")
    depth_map: str | None = None
    priority: int = 0
    preview_every: int | None = Field(None, description="Steps between previews; none: the front's default, 0: off.")
    loras: list[LoraBody] = Field(default_factory=list, description="LoRAs for every image (or <lora:NAME:W>).")
    model: str = Field("", description="Which of the gateway's models (GET /v1/models); none: its first.")

    def to_request(self, default_preview_every: int) -> Any:
        seed = None if self.seed is None or self.seed == -1 else self.seed
        preview = default_preview_every if self.preview_every is None else self.preview_every
        return generate_request(
            prompt=self.prompt, negative_prompt=self.negative_prompt, n=self.n, width=self.width,
            height=self.height, steps=self.steps, guidance_scale=self.guidance_scale,
            guidance_rescale=self.guidance_rescale, guidance_cutoff=self.guidance_cutoff, sampler=self.sampler,
            seed=seed, eta=self.eta,
            strength=self.strength, noise_level=self.noise_level,
            init_image=decode_base64(self.init_image, "init_image"), mask_image=decode_base64(self.mask, "mask"),
            depth_map=decode_base64(self.depth_map, "depth_map"), priority=self.priority, preview_every=preview,
            loras=self.loras, model=self.model,
        )  # fmt: skip


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class JobImage(BaseModel):
    b64_json: str = Field(description="A PNG file in base64.")


class JobStatus(BaseModel):
    id: str
    state: JobState
    progress: float = Field(description="0 to 1 over the whole request.")
    stage: str = Field(description='"", "encode", "denoise" or "decode": the last stage that reported.')
    step: int = Field(description="Denoising steps done.")
    total_steps: int
    eta_seconds: float | None = Field(None, description="Seconds left at the rate so far.")
    preview: str | None = Field(None, description="The latest preview, a base64 JPEG of the image being made.")
    preview_step: int | None = None
    images: list[JobImage] | None = Field(None, description="When succeeded: base64 PNGs.")
    seed: int | None = Field(None, description="The request's seed: the same request and seed give the same images.")
    notes: list[str] | None = Field(None, description="E.g. prompts cut at the tokenizer's limit.")
    model: str | None = Field(None, description="When succeeded: the model that made the images.")
    model_hash: str | None = Field(None, description="And its short hash, when its denoiser reports one.")
    error: ErrorInfo | None = None
    created: float
    finished: float | None = None
    expires_at: float | None = Field(None, description="When a finished job and its images are dropped.")


class AdapterItem(BaseModel):
    name: str
    kind: Literal["lora", "embedding"]
    resident: bool = Field(description="A LoRA held on the device now (others load on first use).")
    rank: int = Field(description="A LoRA's rank once read; an embedding's vectors.")
    error: str | None = Field(None, description="Why it cannot be used, if it cannot.")


class Info(BaseModel):
    model: str
    kind: str
    default_width: int = Field(description="The native size; 0 when the model names none (give one).")
    default_height: int
    size_multiple: int = Field(description="Widths and heights are multiples of it.")
    max_steps: int
    max_images: int
    samplers: list[str]
    default_sampler: str
    api_key_required: bool
    preview_every: int
    adapters: list[AdapterItem] = Field(
        default_factory=list, description="LoRAs (by file stem) and textual-inversion embeddings (by token)."
    )
    served_model: str = Field("", description="The name requests give as `model` for the model described.")
    models: list[str] = Field(default_factory=list, description="Every model's name, the first the default.")


def job_status(job: Job, *, images: bool = True) -> JobStatus:
    import base64

    b64 = lambda data: base64.b64encode(data).decode("ascii")
    error = None
    if job.error is not None:
        error = ErrorInfo(**error_body(job.error.code, job.error.message)["error"])
    seed = job.seed
    return JobStatus(
        id=job.id, state=job.state, progress=round(job.progress, 4), stage=job.stage, step=job.step,  # type: ignore[arg-type]
        total_steps=job.total_steps, eta_seconds=job.eta_seconds(), preview=b64(job.preview) if job.preview else None,
        preview_step=job.preview_step if job.preview else None,
        images=[JobImage(b64_json=b64(p)) for p in job.images]
        if images and job.state == "succeeded" else None,
        seed=seed, notes=job.notes or None, model=job.model or None, model_hash=job.model_hash or None,
        error=error, created=job.created, finished=job.finished,
        expires_at=job.expires,
    )  # fmt: skip


# --- the app ------------------------------------------------------------------------


def create_app(front: Front) -> FastAPI:
    app = FastAPI(
        title="sdmesh",
        summary="Stable Diffusion served by sdmesh: OpenAI Images, AUTOMATIC1111 and sdmesh's own job API.",
        version="1",
    )

    app.state.front = front

    @app.exception_handler(Refused)
    async def refused(request: Request, e: Refused) -> JSONResponse:
        return error_response(request, e.code, e.message, retry_after=e.retry_after)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        first = errors[0] if errors else {}
        field = ".".join(str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path"))
        message = f"{field or 'body'}: {first.get('msg', 'invalid')}"
        if request.url.path.startswith("/sdapi/"):  # A1111 answers 422 with the list, as FastAPI does
            body = {"error": "RequestValidationError", "detail": jsonable(errors), "body": "", "errors": message}
            return JSONResponse(body, status_code=422)
        return error_response(request, grpc.StatusCode.INVALID_ARGUMENT, message, param=field or None)

    @app.get("/health", tags=["sdmesh"])
    async def health() -> dict[str, str]:
        """200 and {"status": "ok"} (no key needed)."""
        return {"status": "ok"}

    @app.get("/v1/info", response_model=Info, tags=["sdmesh"])
    async def info(who: Caller, model: str = "") -> Info:
        """What requests are checked against: the model's sizes, steps, samplers and image limit (`model`: which
        of the gateway's models, as a request names it; none: the first)."""
        facts = await asyncio.to_thread(front.facts, model)
        name, _hash = await asyncio.to_thread(front.model, model)
        served = await asyncio.to_thread(front.models)
        source = next((m.source for m in served if m.name == name), "") or await asyncio.to_thread(front.model_name)
        adapters = await asyncio.to_thread(front.adapters)
        height, width = facts.default_size or (0, 0)
        return Info(
            model=source, served_model=name, models=[m.name for m in served], kind=facts.kind,
            default_width=width, default_height=height,
            size_multiple=facts.vae_scale_factor, max_steps=facts.max_steps, max_images=contract.MAX_IMAGES,
            samplers=list(facts.samplers),
            default_sampler=facts.default_sampler, api_key_required=not front.open,
            preview_every=front.preview_every,
            adapters=[AdapterItem(name=a.name, kind=a.kind, resident=a.resident, rank=a.rank, error=a.error or None)
                      for a in adapters if a.kind in ("lora", "embedding")],
        )  # fmt: skip

    @app.post("/v1/jobs", response_model=JobStatus, response_model_exclude_none=True, status_code=202,
              tags=["sdmesh"])  # fmt: skip
    async def create_job(body: GenerationBody, who: Caller) -> JobStatus:
        """Start a generation; poll GET /v1/jobs/{id} or follow /v1/jobs/{id}/events."""
        job = await front.submit(body.to_request(front.preview_every), who)
        return job_status(job)

    @app.get("/v1/jobs/{job_id}", response_model=JobStatus, response_model_exclude_none=True, tags=["sdmesh"])
    async def get_job(job_id: str, who: Caller) -> JobStatus:
        return job_status(find(job_id, who))

    @app.delete("/v1/jobs/{job_id}", response_model=JobStatus, response_model_exclude_none=True, tags=["sdmesh"])
    async def cancel_job(job_id: str, who: Caller) -> JobStatus:
        """Cancel a job (a finished one is left as it is) and answer its state once it has stopped."""
        job = find(job_id, who)
        job.cancel()
        deadline = time.monotonic() + 5.0
        while job.finished is None and time.monotonic() < deadline:
            await job.changed(job.version, timeout=0.25)
        return job_status(job, images=False)

    @app.get("/v1/jobs/{job_id}/events", tags=["sdmesh"], response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {}}}})  # fmt: skip
    async def job_events(job_id: str, request: Request, who: Caller) -> StreamingResponse:
        """Server-sent events: `progress` (state, progress, step, preview) as the job moves, then one `done`
        with the whole status (images included, or the error). Leaving the stream does not cancel the job."""
        job = find(job_id, who)

        async def stream() -> Any:
            sent_preview = None
            while True:
                version = job.version
                if job.done:
                    yield sse("done", job_status(job).model_dump(exclude_none=True))
                    return
                status = job_status(job, images=False).model_dump(exclude_none=True)
                if status.get("preview_step") == sent_preview:
                    status.pop("preview", None)  # each preview once
                sent_preview = status.get("preview_step", sent_preview)
                yield sse("progress", status)
                await job.changed(version, timeout=15.0)
                if await request.is_disconnected():
                    return

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    @app.get("/v1/files/{name}", tags=["sdmesh"], response_class=Response,
             responses={200: {"content": {"image/png": {}}}})  # fmt: skip
    async def get_file(name: str) -> Response:
        """A PNG of an answer given as `url` (the name is the key: it is random and long; it expires)."""
        data = front.files.get(name)
        if data is None:
            raise not_found(f"no file {name!r}: its link has expired or never existed")
        return Response(data, media_type="image/png")

    def find(job_id: str, who: Tenant) -> Job:
        job = front.jobs.get(job_id, who)
        if job is None:
            raise not_found(f"no job {job_id!r}: finished jobs are kept {front.jobs.keep_seconds:.0f} s")
        return job

    app.include_router(openai_api.router(front))
    app.include_router(a1111_api.router(front))
    static = resources.files("sdmesh.services.http") / "static"
    app.mount("/", StaticFiles(directory=str(static), html=True), name="page")
    return BodyLimit(app, front.max_body_bytes)  # type: ignore[return-value]


def sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def jsonable(errors: Any) -> list[dict[str, Any]]:
    """FastAPI's validation errors without their inputs (which may be bytes that are not text, or huge)."""
    return [{"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
            for e in errors]  # fmt: skip


def error_response(request: Request, code: grpc.StatusCode, message: str, *, param: str | None = None,
                   retry_after: float | None = None) -> JSONResponse:  # fmt: skip
    """The error in OpenAI's shape (A1111's under /sdapi), with the HTTP status of its gRPC one."""
    status = http_status(code)
    headers = {}
    if retry_after is not None:
        headers["Retry-After"] = retry_after_header(retry_after)
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if request.url.path.startswith("/sdapi/"):
        body: dict[str, Any] = {"error": code.name, "detail": message, "body": "", "errors": message}
    else:
        body = error_body(code, message, param)
    return JSONResponse(body, status_code=status, headers=headers)


class BodyLimit:
    """Refuse request bodies over `limit` bytes with 413: at once from Content-Length, else as the bytes arrive,
    so a 2 GB upload is never read whole."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit
        # the FastAPI app underneath, for tests and tools that want its routes and OpenAPI document
        self.fastapi = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await self._refuse(scope, send)
            return
        seen = 0
        refused = started = False

        async def counted() -> Message:
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:  # stop reading: the app sees the client gone, and its answer is dropped
                    refused = True
                    return {"type": "http.disconnect"}
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            if refused:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except Exception:
            if not refused:
                raise
        if refused and not started:
            await self._refuse(scope, send)

    async def _refuse(self, scope: Scope, send: Send) -> None:
        message = f"the request body is over {self.limit} bytes (the front's --http-max-body); send a smaller one"
        body = json.dumps(error_body(grpc.StatusCode.INVALID_ARGUMENT, message)).encode()
        if scope.get("path", "").startswith("/sdapi/"):
            body = json.dumps({"error": "PayloadTooLarge", "detail": message}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]  # fmt: skip
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


# --- serving ------------------------------------------------------------------------


class HttpServer:
    """uvicorn serving the front from a daemon thread; `stop()` stops taking requests and waits for open ones."""

    def __init__(self, front: Front, host: str, port: int, *, tls: Any = None, drain_seconds: float = 30.0,
                 log_level: str = "warning"):  # fmt: skip
        import uvicorn

        self.front = front
        self.socket = socket.create_server((host, port), family=_family(host), reuse_port=False)
        self.port = self.socket.getsockname()[1]
        self.scheme = "https" if tls is not None else "http"
        secure: dict[str, Any] = {}
        if tls is not None:
            import ssl

            secure = {"ssl_certfile": str(tls.cert), "ssl_keyfile": str(tls.key)}
            if tls.client_ca is not None:
                secure |= {"ssl_ca_certs": str(tls.client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
        config = uvicorn.Config(create_app(front), log_level=log_level, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=max(int(drain_seconds), 1), **secure)  # fmt: skip
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._serve, name="http-front", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        asyncio.run(self.server.serve(sockets=[self.socket]))

    def stop_accepting(self) -> None:
        """Take no new connections (the gateway's drain lets the jobs already admitted finish)."""
        self.server.should_exit = True

    def stop(self, seconds: float = 30.0) -> None:
        """No new connections; wait up to `seconds` for the server to end (its requests get the drain time)."""
        self.server.should_exit = True
        self._thread.join(seconds)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def serve(front: Front, host: str, port: int, *, tls: Any = None, drain_seconds: float = 30.0) -> HttpServer:
    """Start serving the front on host:port (0: any free port) from a thread; `.port` is the bound one.
    tls: a `tls.ServerTLS` to serve HTTPS (requiring client certificates when it has a client CA)."""
    return HttpServer(front, host, port, tls=tls, drain_seconds=drain_seconds)
