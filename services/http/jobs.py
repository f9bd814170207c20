"""Generation jobs for the HTTP front: each one a request admitted by the gateway, run on its own thread.

    jobs = Jobs(service)
    job = jobs.submit(request, tenant, preview_every=5)    admitted now (or Refused), running in the background
    await job.changed(version, timeout)                     wakes when its progress, preview or state moves
    job.cancel()                                            the stage call in flight is cancelled, as a gRPC client's

Every HTTP route that generates goes through a job: the synchronous ones (OpenAI's, A1111's) wait for theirs and
forget it, the asynchronous API (`/v1/jobs`) keeps it for `keep_seconds` after it ends. Jobs are bounded by the
gateway's own admission (its --max-inflight and each tenant's places) while they run, and by `max_finished` after.
JAX-free, like the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import threading
import time
from collections import OrderedDict
from typing import Any

import grpc

from sdmesh.services.serving.gateway import GatewayService, LocalCall, Refused
from sdmesh.services.serving.tenants import Tenant
from sdmesh.v1 import gateway_pb2

log = logging.getLogger("sdmesh.http")

DEFAULT_KEEP_SECONDS = 600.0  # a finished job's images stay this long
DEFAULT_MAX_FINISHED = 256  # finished jobs kept at most; the oldest go first
DEFAULT_JOB_TIMEOUT = 900.0  # a job still running after this long is stopped (DEADLINE_EXCEEDED)
STATES = ("queued", "running", "succeeded", "failed", "cancelled")


class Job:
    """One generation: its progress as the stages report it, then its images or its error."""

    def __init__(self, tenant: Tenant, request: gateway_pb2.GenerateRequest, timeout: float | None):
        self.id = secrets.token_urlsafe(12)
        self.tenant = tenant
        self.request = request
        self.call = LocalCall(timeout)
        self.created = time.time()
        self.started: float | None = None
        self.finished: float | None = None
        self.expires: float | None = None  # when a kept job's results are dropped
        self.state = "queued"
        self.stage, self.step, self.total_steps = "", 0, max(request.num_inference_steps, 1)
        self.preview = b""  # the latest preview (JPEG), empty until the denoiser sends one
        self.preview_step = 0
        self.images: list[bytes] = []
        self.seed: int | None = request.seed if request.HasField("seed") else None
        self.notes: list[str] = []
        self.model, self.model_hash = "", ""  # the model that made the images (the result's), once there is one
        self.error: Refused | None = None
        self.version = 0  # counts changes; `changed` waits for it to move
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: list[asyncio.Future[None]] = []

    @property
    def done(self) -> bool:
        return self.state in ("succeeded", "failed", "cancelled")

    @property
    def progress(self) -> float:
        """0 to 1 over the whole request: the text encoder and the decoder count as one step each."""
        if self.state == "succeeded":
            return 1.0
        steps = self.total_steps + 2
        done = {"": 0, "encode": 1, "denoise": 1 + self.step, "decode": steps}.get(self.stage, 0)
        return min(done / steps, 1.0)

    def eta_seconds(self) -> float | None:
        """Seconds left at the rate so far; None before there is a rate."""
        if self.started is None or self.done or self.progress <= 0:
            return None if not self.done else 0.0
        elapsed = time.time() - self.started
        return elapsed * (1 - self.progress) / self.progress

    def cancel(self) -> None:
        """Stop it: the denoiser drops its images within one chunk. A finished job stays as it is."""
        self.call.cancel()

    # -- waiting, from the event loop --

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    async def changed(self, version: int, timeout: float) -> None:
        """Return once `version` is out of date (the job moved), or after `timeout` seconds."""
        if self.version != version or self.done:
            return
        future = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(future, timeout)

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for future in waiters:
            if not future.done():
                future.set_result(None)

    def _moved(self) -> None:
        """Called on the job's thread after each change."""
        self.version += 1
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile (the front is stopping)
                loop.call_soon_threadsafe(self._wake)


class Jobs:
    """The front's jobs: submitted through the gateway's admission, each run on a thread, kept a while after."""

    def __init__(self, service: GatewayService, *, keep_seconds: float = DEFAULT_KEEP_SECONDS,
                 max_finished: int = DEFAULT_MAX_FINISHED, timeout: float | None = DEFAULT_JOB_TIMEOUT):  # fmt: skip
        self.service = service
        self.keep_seconds, self.max_finished, self.timeout = keep_seconds, max_finished, timeout
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()

    def submit(self, request: gateway_pb2.GenerateRequest, tenant: Tenant,
               loop: asyncio.AbstractEventLoop | None = None) -> Job:  # fmt: skip
        """Admit the request (Refused: not admitted, nothing kept) and start it on its own thread.

        Blocks while the gateway checks the request (the first one asks the denoiser for the model's facts):
        call it from a worker thread, not the event loop."""
        job = Job(tenant, request, self.timeout)
        if loop is not None:
            job.bind(loop)
        t0 = time.perf_counter()
        try:
            admitted = self.service.admit(request, job.call, tenant)
        except Refused as e:
            self.service.record(time.perf_counter() - t0, e.code, tenant)
            raise
        with self._lock:
            self._expire()
            self._jobs[job.id] = job
        threading.Thread(target=self._run, args=(job, admitted, t0), name=f"job-{job.id}", daemon=True).start()
        return job

    def get(self, job_id: str, tenant: Tenant) -> Job | None:
        """The tenant's job of that id (None: no such job, expired, or another tenant's)."""
        with self._lock:
            self._expire()
            job = self._jobs.get(job_id)
        return job if job is not None and job.tenant.name == tenant.name else None

    def latest(self, tenant: Tenant) -> Job | None:
        """The tenant's most recently started job that is still running, else its most recent one."""
        with self._lock:
            mine = [j for j in self._jobs.values() if j.tenant.name == tenant.name]
        running = [j for j in mine if not j.done]
        latest = running or mine
        return latest[-1] if latest else None

    def running(self, tenant: Tenant) -> list[Job]:
        with self._lock:
            return [j for j in self._jobs.values() if j.tenant.name == tenant.name and not j.done]

    def forget(self, job: Job) -> None:
        with self._lock:
            self._jobs.pop(job.id, None)

    def keep(self, job: Job) -> None:
        """Keep a job that `forget` dropped (nothing happens to a job still kept)."""
        with self._lock:
            self._jobs.setdefault(job.id, job)

    def cancel_all(self) -> None:
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            job.cancel()

    def _expire(self) -> None:
        """Drop finished jobs past their time, then the oldest finished ones beyond the bound (lock held)."""
        now = time.time()
        for job_id in [i for i, j in self._jobs.items() if j.expires is not None and j.expires <= now]:
            del self._jobs[job_id]
        finished = [i for i, j in self._jobs.items() if j.done]
        for job_id in finished[: max(len(finished) - self.max_finished, 0)]:
            del self._jobs[job_id]

    def _run(self, job: Job, admitted: Any, t0: float) -> None:
        job.state, job.started = "running", time.time()
        job._moved()
        code = grpc.StatusCode.OK
        try:
            for event in admitted.events():
                if event.HasField("progress"):
                    p = event.progress
                    job.stage = p.stage
                    if p.stage == "denoise":
                        job.step, job.total_steps = p.step, max(p.total_steps, 1)
                    if p.preview:
                        job.preview, job.preview_step = p.preview, p.step
                else:
                    result = event.result
                    job.images, job.seed, job.notes = list(result.images), result.seed, list(result.truncation_notes)
                    job.model, job.model_hash = result.model, result.model_hash
                job._moved()
            job.state = "succeeded"
        except Refused as e:
            code = e.code
            gone = e.code == grpc.StatusCode.CANCELLED
            job.state, job.error = ("cancelled" if gone else "failed"), e
        except Exception as e:  # a bug of ours; the job says so rather than hanging
            log.exception("internal error in job %s", job.id)
            code = grpc.StatusCode.INTERNAL
            job.state = "failed"
            job.error = Refused(code, f"internal error in the HTTP front ({type(e).__name__}: {e})")
        finally:
            admitted.release()
            job.finished = time.time()
            job.expires = job.finished + self.keep_seconds
            self.service.record(time.perf_counter() - t0, code, job.tenant, admitted.model_name())
            job._moved()
