"""Denoiser.Denoise over gRPC: conditioning + initial noise → final latents, with step-level continuous batching.

Every request becomes one slot per image (`DenoiserStage.slots`). One scheduler thread
owns the device: it keeps a running batch per latent shape and runs compiled chunks of
`chunk` steps; between chunks finished images leave, cancelled requests are dropped and
waiting requests join (highest priority first, then first come, first served), each slot
at its own step, step count, sampler and guidance — one compiled program serves them all.
After each chunk a request's stream carries Progress(step i of N). At most `max_queue`
requests wait; the next gets RESOURCE_EXHAUSTED at once.

Initial noise from a seed is `DenoiserStage.noise(seed, …)`, and that seed also seeds
the η stream, as `StableDiffusion.generate` does; with given latents, `noise_seed` seeds
it. Latents are NCHW on the wire and NHWC inside.
"""
from __future__ import annotations

import dataclasses
import heapq
import itertools
import logging
import math
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from sdmesh.client.tensors import from_proto, to_proto
from sdmesh.services import checkpoint, modes, server
from sdmesh.services.denoise import RunningBatch, Slot, group_key
from sdmesh.services.metrics import StageMetrics
from sdmesh.services.models.vae import VAEConfig
from sdmesh.services.pipeline import MAX_IMAGES, DenoiserStage, InvalidRequest
from sdmesh.services.weights import CheckpointError
from sdmesh.v1 import common_pb2, denoiser_pb2, denoiser_pb2_grpc

MAX_SIDE = 4096  # pixels, as StableDiffusion.validate
MAX_CONTEXT_LENGTH = 1024  # tokens per conditioning row; CLIP gives 77
GUIDED, UNGUIDED = "denoise", "denoise-unguided"  # the two programs: with and without an unconditional pass
DEFAULT_MAX_BATCH = 8
POLICIES = ("continuous", "request")  # join between chunks, or only when the running batch has emptied

log = logging.getLogger("sdmesh.denoiser")


@dataclasses.dataclass(frozen=True)
class DenoiserFacts:
    """What a request is checked against: the UNet's, the scheduler's and the VAE's numbers."""

    latent_channels: int
    context_dim: int  # the UNet's cross_attention_dim: D of the conditioning
    context_length: int  # L the text encoder gives (for warm-up; requests may differ)
    scale_factor: int  # image pixels per latent pixel (the VAE's)
    max_steps: int
    default_size: tuple[int, int] | None  # (height, width) from the UNet's sample_size
    prediction_type: str
    samplers: tuple[str, ...] = ("ddim",)
    default_sampler: str = "ddim"
    kind: str = "text"  # text | inpaint | depth | upscale (services/modes.py)
    max_noise_level: int = 350  # the x4 upscaler's
    extra_channels: int = 0  # UNet input channels beyond the latents (inpainting 5, depth 1, x4 upscaler 3)
    class_labels_shape: tuple[int, ...] | None = None  # per-sample class label shape, None: the UNet takes none


def denoiser_facts(stage: DenoiserStage, folder: Path) -> DenoiserFacts:
    """Facts from the loaded UNet plus the VAE's and text encoder's config.json (their weights stay unread)."""
    f = VAEConfig.from_json(checkpoint.read_config(folder, "vae")).scale_factor
    try:
        length = int(checkpoint.read_config(folder, "text_encoder").get("max_position_embeddings", 77))
    except CheckpointError:  # a UNet-only folder: CLIP's length is the usual one
        length = 77
    sample = stage.unet.config.sample_size
    size = None if sample is None else ((sample, sample) if isinstance(sample, int) else tuple(sample))
    return DenoiserFacts(
        latent_channels=stage.latent_channels, context_dim=stage.unet.config.context_dim, context_length=length,
        scale_factor=f, max_steps=stage.max_steps,
        default_size=None if size is None else (size[0] * f, size[1] * f),
        prediction_type=stage.scheduler.prediction_type, samplers=stage.samplers, default_sampler=stage.default_sampler,
        kind=stage.kind, max_noise_level=stage.max_noise_level,
        extra_channels=stage.unet.config.in_channels - stage.latent_channels,
        class_labels_shape=stage.unet.config.class_labels_shape,
    )


@dataclasses.dataclass(frozen=True)
class DenoiseJob:
    cond: np.ndarray  # (N, L, D) float32
    uncond: np.ndarray | None  # (N, L, D) float32, or None: no classifier-free guidance
    latents: np.ndarray | None  # (N, h, w, C) float32 NHWC, or None: drawn from `seed`
    seed: int  # initial noise (when latents is None) and the η stream
    steps: int
    guidance_scale: float
    guidance_rescale: float
    eta: float
    height: int  # pixels
    width: int
    sampler: str | None = None  # None: the checkpoint's own
    priority: int = 0
    init_latents: np.ndarray | None = None  # (N, h, w, C) NHWC: start part-way from these, at `strength`
    strength: float = 1.0
    extra: np.ndarray | None = None  # (N, h, w, E): channels joining the UNet input
    blend_mask: np.ndarray | None = None  # (N, h, w, 1): latent blending towards init_latents (1 repaints)
    class_labels: np.ndarray | None = None  # (N, *class_labels_shape)

    @property
    def program(self) -> str:
        return UNGUIDED if self.uncond is None else GUIDED

    @property
    def images(self) -> int:
        return int(self.cond.shape[0])


def _finite_tensor(t, name: str, ndim: int) -> np.ndarray:
    array = from_proto(t, name=name, dtype="float32", ndim=ndim)
    if not np.isfinite(array).all():
        raise InvalidRequest(f"{name} contains NaN or infinity")
    return array


def _finite_number(name: str, value: float, low: float, high: float) -> float:
    if not math.isfinite(value) or not low <= value <= high:
        raise InvalidRequest(f"{name} must be a finite number from {low:g} to {high:g}, got {value}")
    return float(value)


def denoise_job_from_proto(request: denoiser_pb2.DenoiseRequest, facts: DenoiserFacts) -> DenoiseJob:
    """Check a DenoiseRequest against the model; raises InvalidRequest (or TensorError) saying what to fix."""
    if not request.HasField("cond"):
        raise InvalidRequest("cond is missing: send the text encoder's conditioning, (N, L, D) float32")
    cond = _finite_tensor(request.cond, "cond", 3)
    n, length, dim = cond.shape
    if not 1 <= n <= MAX_IMAGES:
        raise InvalidRequest(f"cond has {n} rows (images); give 1 to {MAX_IMAGES}")
    if dim != facts.context_dim or not 1 <= length <= MAX_CONTEXT_LENGTH:
        raise InvalidRequest(f"cond has shape {list(cond.shape)}; this UNet needs (N, L, {facts.context_dim}) with L ≤ "
                             f"{MAX_CONTEXT_LENGTH} (is the text encoder from the same model?)")
    uncond = None
    if request.HasField("uncond"):
        uncond = _finite_tensor(request.uncond, "uncond", 3)
        if uncond.shape != cond.shape:
            raise InvalidRequest(f"uncond has shape {list(uncond.shape)} but cond has {list(cond.shape)}; they must match")

    steps = request.num_inference_steps
    if not 1 <= steps <= facts.max_steps:
        raise InvalidRequest(f"num_inference_steps must be from 1 to {facts.max_steps}, got {steps}")
    guidance_scale = _finite_number("guidance_scale", request.guidance_scale, -1000.0, 1000.0)
    guidance_rescale = _finite_number("guidance_rescale", request.guidance_rescale, 0.0, 1.0)
    eta = _finite_number("eta", request.eta, 0.0, 1000.0)
    sampler = request.sampler or None
    if sampler is not None and sampler not in facts.samplers:
        raise InvalidRequest(f"sampler {sampler!r} is not one of {', '.join(facts.samplers)}")
    extra = dict(sampler=sampler, priority=request.priority)

    f, c = facts.scale_factor, facts.latent_channels
    if request.WhichOneof("init") == "latents":
        given = _finite_tensor(request.latents, "latents", 4)  # (N, C, h, w)
        if given.shape[0] != n or given.shape[1] != c or min(given.shape[2:]) < 1 or max(given.shape[2:]) * f > MAX_SIDE:
            raise InvalidRequest(f"latents have shape {list(given.shape)}; need NCHW ({n}, {c}, h, w) with h, w from 1 to "
                                 f"{MAX_SIDE // f} ({n} rows as cond, {c} latent channels)")
        height, width = given.shape[2] * f, given.shape[3] * f
        for name, asked, got in (("height", request.height, height), ("width", request.width, width)):
            if asked and asked != got:
                raise InvalidRequest(f"{name} {asked} disagrees with the latents' {got // f} × {f} = {got} pixels; send 0 or {got}")
        latents = np.ascontiguousarray(given.transpose(0, 2, 3, 1))  # NCHW → NHWC
        job = DenoiseJob(cond, uncond, latents, request.noise_seed, steps, guidance_scale, guidance_rescale, eta, height, width, **extra)
        return with_image_conditioning(job, request, facts)
    if request.WhichOneof("init") != "seed":
        raise InvalidRequest("give the initial noise: a seed, or latents (N, C, H/f, W/f)")
    height, width = request.height, request.width
    if not height or not width:
        if facts.default_size is None:
            raise InvalidRequest("this UNet's config names no sample_size, so there is no default size: give height and width")
        height, width = height or facts.default_size[0], width or facts.default_size[1]
    for name, v in (("height", height), ("width", width)):
        if v % f or not f <= v <= MAX_SIDE:
            raise InvalidRequest(f"{name} must be a multiple of {f} from {f} to {MAX_SIDE} for this model, got {v}")
    job = DenoiseJob(cond, uncond, None, request.seed, steps, guidance_scale, guidance_rescale, eta, height, width, **extra)
    return with_image_conditioning(job, request, facts)


def _nhwc(request: denoiser_pb2.DenoiseRequest, name: str, channels: int, job: DenoiseJob, f: int, what: str) -> np.ndarray:
    array = _finite_tensor(getattr(request, name), name, 4)
    want = (job.images, channels, job.height // f, job.width // f)
    if array.shape != want:
        raise InvalidRequest(f"{name} has shape {list(array.shape)}; this request needs NCHW {list(want)} ({what})")
    return np.ascontiguousarray(array.transpose(0, 2, 3, 1))


def with_image_conditioning(job: DenoiseJob, request: denoiser_pb2.DenoiseRequest, facts: DenoiserFacts) -> DenoiseJob:
    """The image-conditioning fields of a DenoiseRequest, checked against the UNet; raises InvalidRequest."""
    f, c, e = facts.scale_factor, facts.latent_channels, facts.extra_channels
    changes: dict[str, Any] = {}
    if request.HasField("init_latents"):
        changes["init_latents"] = _nhwc(request, "init_latents", c, job, f, "the init image's latents, Decoder.EncodeImage")
        strength = request.strength if request.HasField("strength") else 1.0
        changes["strength"] = _finite_number("strength", strength, 1e-6, 1.0)
    elif request.HasField("strength"):
        raise InvalidRequest("strength needs init_latents (the init image's latents from Decoder.EncodeImage)")
    if e and not request.HasField("extra"):
        raise InvalidRequest(f"this UNet takes {e} conditioning channels beyond the latents (an inpainting, depth or upscaling "
                             "model): send them as extra (N, E, h, w)")
    if request.HasField("extra"):
        if not e:
            raise InvalidRequest("extra was given but this UNet takes only the latents; drop it or use an inpainting/depth model")
        changes["extra"] = _nhwc(request, "extra", e, job, f, f"{e} channels beyond the latents")
    if request.HasField("blend_mask"):
        if "init_latents" not in changes:
            raise InvalidRequest("blend_mask needs init_latents: the latents to keep where the mask is 0")
        mask = _nhwc(request, "blend_mask", 1, job, f, "1 repaints, 0 keeps")
        if mask.min() < 0 or mask.max() > 1:
            raise InvalidRequest("blend_mask values must lie in [0, 1]")
        changes["blend_mask"] = mask
    shape = facts.class_labels_shape
    if shape is not None and not request.HasField("class_labels"):
        raise InvalidRequest("this UNet has a class embedding (the x4 upscaler: the noise level); send class_labels")
    if request.HasField("class_labels"):
        if shape is None:
            raise InvalidRequest("class_labels were given but this UNet has no class embedding; drop them")
        labels = _finite_tensor(request.class_labels, "class_labels", 1 + len(shape))
        if labels.shape != (job.images, *shape):
            raise InvalidRequest(f"class_labels have shape {list(labels.shape)}; need {[job.images, *shape]}")
        if facts.kind == "upscale" and (np.any(labels != labels.reshape(-1)[0]) or labels.reshape(-1)[0] % 1
                                        or not 0 <= labels.reshape(-1)[0] <= facts.max_noise_level):
            raise InvalidRequest(f"the x4 upscaler's class_labels are its noise level: one integer from 0 to "
                                 f"{facts.max_noise_level} for every row, got {labels.tolist()}")
        changes["class_labels"] = labels
    return dataclasses.replace(job, **changes) if changes else job


def progress_to_proto(done: int, total: int) -> denoiser_pb2.DenoiseEvent:
    return denoiser_pb2.DenoiseEvent(progress=common_pb2.Progress(stage="denoise", step=done, total_steps=total))


def latents_to_proto(latents_nhwc: Any) -> denoiser_pb2.DenoiseEvent:
    return denoiser_pb2.DenoiseEvent(latents=to_proto(np.asarray(latents_nhwc, np.float32).transpose(0, 3, 1, 2)))


class Ticket:
    """One Denoise call inside the scheduler: its slots, and the events its stream waits for."""

    def __init__(self, job: DenoiseJob, seq: int):
        self.job, self.seq = job, seq
        self.events: queue.Queue = queue.Queue()  # (done, total) progress, then ("latents", array) or ("error", exc)
        self.cancelled = threading.Event()
        self.slots: list[Slot] = []
        self.reported = 0
        self.total = job.steps  # steps this request runs (fewer when it starts part-way)

    def __lt__(self, other: "Ticket") -> bool:  # heap order: higher priority, then earlier
        return (-self.job.priority, self.seq) < (-other.job.priority, other.seq)


class Scheduler:
    """Step-level continuous batching: one thread, running batches per latent shape, bounded admission.

    Tickets wait in a heap (priority, then arrival). Between chunks the thread admits the
    head tickets while their images fit in `max_batch` slots (a request larger than that
    runs alone), runs one chunk of the next non-empty batch (round robin over shapes),
    reports progress, and lets finished and cancelled tickets leave.
    """

    def __init__(self, stage: DenoiserStage, facts: DenoiserFacts, *, chunk: int, max_batch: int, max_queue: int,
                 buckets: tuple[int, ...], metrics: Any = None, policy: str = "continuous"):
        if policy not in POLICIES:
            raise InvalidRequest(f"--batching must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.stage, self.facts, self.chunk, self.max_batch, self.max_queue = stage, facts, chunk, max_batch, max_queue
        self.policy = policy
        self.buckets, self.metrics = buckets, metrics
        self._waiting: list[Ticket] = []
        self._batches: dict[tuple, RunningBatch] = {}
        self._tickets: list[Ticket] = []  # admitted, not finished
        self._lock = threading.Condition()
        self._seq = itertools.count()
        self._turn = 0
        self.compiled: set[tuple[str, int, int, int]] = set()  # (program, batch, height, width)
        self.stats = {"chunks": 0, "peak_slots": 0, "peak_requests": 0, "shared_chunks": 0}
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="sdmesh-denoiser", daemon=True)
        self._thread.start()

    # -- callers' side --

    def submit(self, job: DenoiseJob) -> Ticket:
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise server.Overloaded(f"the denoiser is busy: {self.max_queue} requests already wait for a slot "
                                        "(--max-queue); retry later or on another replica")
            ticket = Ticket(job, next(self._seq))
            heapq.heappush(self._waiting, ticket)
            self._report_queue()
            self._lock.notify()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        ticket.cancelled.set()
        with self._lock:
            if ticket in self._waiting:
                self._waiting.remove(ticket)
                heapq.heapify(self._waiting)
                self._report_queue()
            self._lock.notify()

    def close(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify()
        self._thread.join(timeout=5)

    @property
    def running_slots(self) -> int:
        return sum(len(b) for b in self._batches.values())

    # -- the device thread --

    def _report_queue(self) -> None:
        if self.metrics is not None:
            self.metrics.set_queue_depth(len(self._waiting))

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not self._waiting and not self.running_slots:
                    self._lock.wait()
                if self._stop:
                    return
                admitted = self._admit()
            try:
                for ticket in admitted:
                    self._join(ticket)
                self._drop_cancelled()
                self._run_one_chunk()
            except Exception as error:  # noqa: BLE001 - fail the calls in flight, keep serving the next ones
                log.exception("denoise chunk failed")
                self._fail_all(error)

    def _admit(self) -> list[Ticket]:
        """Pop the head tickets that fit (caller holds the lock)."""
        admitted: list[Ticket] = []
        if self.policy == "request" and self.running_slots:
            return admitted  # request-level batching: a batch forms from the waiting requests and runs to its end
        free = self.max_batch - self.running_slots
        while self._waiting:
            head = self._waiting[0]
            fits = head.job.images <= free or (self.running_slots == 0 and not admitted)
            if not fits:
                break  # first come, first served: nobody overtakes the head
            heapq.heappop(self._waiting)
            if head.cancelled.is_set():
                continue
            admitted.append(head)
            free -= head.job.images
        if admitted:
            self._report_queue()
        return admitted

    def _join(self, ticket: Ticket) -> None:
        job, f = ticket.job, self.facts.scale_factor
        if job.latents is None:
            noise = self.stage.noise(job.seed, (job.images, job.height // f, job.width // f, self.facts.latent_channels))
        else:
            noise = job.latents
        extra = job.extra
        if self.facts.kind == "upscale":  # extra is the clean low-res image: noise it to its level, as the pipeline does
            level = int(job.class_labels.reshape(-1)[0])
            extra = modes.noise_low_res(extra, level, job.seed, self.stage.low_res_alphas)
        ticket.slots = self.stage.slots(noise, job.cond, job.uncond, steps=job.steps, guidance_scale=job.guidance_scale,
                                        guidance_rescale=job.guidance_rescale, eta=job.eta, seed=job.seed,
                                        sampler=job.sampler, owner=ticket, init_latents=job.init_latents,
                                        strength=job.strength, noise_at_full_strength=self._inpainting(job),
                                        extra=extra, class_labels=job.class_labels, blend_mask=job.blend_mask)
        ticket.total = min(job.steps, ticket.slots[0].plan.evaluations)  # img2img runs fewer; PLMS evaluates once more
        key = group_key(ticket.slots[0])
        if key not in self._batches:
            self._batches[key] = self.stage.new_batch(self.buckets)
        self._batches[key].join(ticket.slots)
        self._tickets.append(ticket)

    def _inpainting(self, job: DenoiseJob) -> bool:
        """Inpainting (latent blending, or a 9-channel UNet: mask + masked-image latents) starts from pure noise at
        strength 1, as StableDiffusionInpaintPipeline does; img2img and depth always noise the init latents."""
        return job.blend_mask is not None or self.facts.extra_channels == self.facts.latent_channels + 1

    def _drop_cancelled(self) -> None:
        for batch in self._batches.values():
            batch.leave(lambda s: not s.owner.cancelled.is_set())
        self._tickets = [t for t in self._tickets if not t.cancelled.is_set()]

    def _run_one_chunk(self) -> None:
        keys = [k for k, b in self._batches.items() if len(b)]
        if not keys:
            return
        key = keys[self._turn % len(keys)]
        self._turn += 1
        batch = self._batches[key]
        t0 = time.perf_counter()
        compile_s = batch.run_chunk(self.chunk)
        seconds = time.perf_counter() - t0 - compile_s
        owners = {id(s.owner) for s in batch.slots}
        self.stats["chunks"] += 1
        self.stats["peak_slots"] = max(self.stats["peak_slots"], len(batch))
        self.stats["peak_requests"] = max(self.stats["peak_requests"], len(owners))
        self.stats["shared_chunks"] += len(owners) > 1
        (h, w, _), _, _ = key
        f = self.facts.scale_factor
        self.compiled.add((GUIDED if batch.with_uncond else UNGUIDED, batch.capacity, h * f, w * f))
        if self.metrics is not None:
            self.metrics.observe_chunk(seconds)
            self.metrics.observe_batch(len(batch), batch.capacity)
        finished: dict[int, Ticket] = {}
        for ticket in [t for t in self._tickets if any(s in batch.slots for s in t.slots)]:
            job = ticket.job
            evaluations = ticket.slots[0].plan.evaluations
            done = min(s.step for s in ticket.slots) * ticket.total // evaluations
            if done > ticket.reported:
                ticket.reported = done
                ticket.events.put((done, ticket.total))
            if all(s.done for s in ticket.slots):
                finished[id(ticket)] = ticket
        if finished:
            latents = {id(s): x for s, x in batch.leave(lambda s: id(s.owner) not in finished)}
            for ticket in finished.values():
                ticket.events.put(("latents", np.stack([latents[id(s)] for s in ticket.slots])))
                if self.metrics is not None:
                    self.metrics.images_served(ticket.job.images)
            self._tickets = [t for t in self._tickets if id(t) not in finished]

    def _fail_all(self, error: Exception) -> None:
        for ticket in self._tickets:
            ticket.events.put(("error", error))
        self._tickets = []
        self._batches = {}


class DenoiserService(denoiser_pb2_grpc.DenoiserServicer):
    def __init__(self, stage: DenoiserStage, facts: DenoiserFacts, model: str, chunk: int | None = None, *,
                 max_batch: int = DEFAULT_MAX_BATCH, max_queue: int = server.DEFAULT_MAX_QUEUE,
                 buckets: tuple[int, ...] | None = None, metrics: Any = None, policy: str = "continuous",
                 sizes: set[tuple[int, int]] | None = None):
        """sizes: with --strict-shapes, the only (height, width) served; None compiles any other size on first use."""
        self.stage, self.facts, self.model, self.sizes = stage, facts, model, sizes
        self.chunk = chunk or 5
        buckets = tuple(sorted(set(buckets or ()) | {b for b in (1, 2, 4, 8, 16, 32, 64) if b <= max_batch} | {max_batch}))
        self.scheduler = Scheduler(stage, facts, chunk=self.chunk, max_batch=max_batch, max_queue=max_queue,
                                   buckets=buckets, metrics=metrics, policy=policy)

    @property
    def compiled(self) -> set[tuple[str, int, int, int]]:
        return self.scheduler.compiled

    def run(self, job: DenoiseJob, active=lambda: True) -> Iterator[tuple[int, int, np.ndarray | None]]:
        """(steps done, steps in all, None) after each chunk, then (total, total, final latents NHWC); cancels the
        request once `active()` is false."""
        ticket = self.scheduler.submit(job)
        try:
            while True:
                try:
                    event = ticket.events.get(timeout=0.05)
                except queue.Empty:
                    if not active():
                        return
                    continue
                if event[0] == "latents":
                    yield ticket.total, ticket.total, event[1]
                    return
                if event[0] == "error":
                    raise event[1]
                yield event[0], event[1], None
                if not active():
                    return
        finally:
            self.scheduler.cancel(ticket)  # a no-op once finished; frees the slots of a call that went away

    def Denoise(self, request, context):
        job = denoise_job_from_proto(request, self.facts)
        server.check_size(job.height, job.width, self.sizes)
        latents = None
        for done, total, latents in self.run(job, context.is_active):
            if latents is None:
                yield progress_to_proto(done, total)
        if context.is_active() and latents is not None:
            yield latents_to_proto(latents)

    def ModelInfo(self, request, context):
        devices, mesh = server.device_facts(self.stage.mesh)
        facts = self.facts
        info = {"latent_channels": facts.latent_channels, "vae_scale_factor": facts.scale_factor,
                "hidden_size": facts.context_dim, "max_length": facts.context_length, "max_steps": facts.max_steps,
                "prediction_type": facts.prediction_type, "chunk_steps": self.chunk, "max_images": MAX_IMAGES,
                "max_batch": self.scheduler.max_batch, "batching": self.scheduler.policy, "batch_buckets": ",".join(map(str, self.scheduler.buckets)),
                "samplers": ",".join(facts.samplers), "default_sampler": facts.default_sampler, "kind": facts.kind,
                "max_noise_level": facts.max_noise_level,
                "running_slots": self.scheduler.running_slots, "waiting_requests": len(self.scheduler._waiting),
                **self.scheduler.stats}
        if facts.default_size is not None:
            info["default_height"], info["default_width"] = facts.default_size
        return common_pb2.ModelInfo(
            service="Denoiser", model=self.model, weights_dtype=self.stage.options.weights_dtype,
            activations_dtype=self.stage.options.activations_dtype, devices=devices, mesh=mesh,
            compiled_shapes=[common_pb2.CompiledShape(program=p, batch=b, height=h, width=w)
                             for p, b, h, w in sorted(self.compiled)],
            facts={k: str(v) for k, v in info.items()},
        )

    def warm_up(self, shapes: list[tuple[int, int, int]]) -> None:
        """Compile the guided program at each configured size for that shape's batch and every bucket: one
        request of that many images, one step each (the unguided program compiles when first needed)."""
        sizes = {(h, w) for _, h, w in shapes}
        for batch, height, width in sorted(set(shapes) | {(b, h, w) for h, w in sizes for b in self.scheduler.buckets}):
            cond = np.zeros((batch, self.facts.context_length, self.facts.context_dim), np.float32)
            job = DenoiseJob(cond, cond, None, 0, 1, 7.5, 0.0, 0.0, height, width)
            for _ in self.run(job):
                pass


def default_shapes(facts: DenoiserFacts) -> list[tuple[int, int, int]]:
    if facts.default_size is None:
        raise InvalidRequest("this UNet's config names no sample_size: give --shapes BATCHxHEIGHTxWIDTH")
    return [(1, *facts.default_size)]


def message_bytes(facts: DenoiserFacts, shapes: list[tuple[int, int, int]]) -> int:
    """The largest Denoise request at these sizes: cond + uncond + latents, float32, for the most images any
    request may carry (MAX_IMAGES), so a valid request is never refused for its size by gRPC."""
    f = facts.scale_factor
    return max(MAX_IMAGES * (2 * facts.context_length * facts.context_dim + facts.latent_channels * (h // f) * (w // f)) * 4
               for _, h, w in shapes)


def stage_service(service: DenoiserService, shapes: list[tuple[int, int, int]], metrics: Any = None) -> server.StageService:
    f = service.facts.scale_factor
    for b, h, w in shapes:
        if h % f or w % f or max(h, w) > MAX_SIDE or b > MAX_IMAGES:
            raise InvalidRequest(f"--shapes {b}x{h}x{w}: height and width must be multiples of {f} up to {MAX_SIDE}, batch ≤ {MAX_IMAGES}")
    return server.StageService(
        name="sdmesh.v1.Denoiser", servicer=service, add_to_server=denoiser_pb2_grpc.add_DenoiserServicer_to_server,
        device_methods=frozenset(), warm_up=lambda: service.warm_up(shapes),  # the scheduler queues Denoise itself
        max_message_bytes=message_bytes(service.facts, shapes), metrics=metrics,
    )


def main(args: Any) -> int:
    shapes = server.parse_shapes(args.shapes)  # before loading: a typo should not cost a model load
    folder, options, load = server.load_setup(args)
    stage = DenoiserStage.load(folder, options, load)
    facts = denoiser_facts(stage, folder)
    shapes = shapes or default_shapes(facts)
    metrics = StageMetrics("denoiser")
    service = DenoiserService(stage, facts, args.model, chunk=args.chunk_steps, max_batch=args.max_batch,
                              max_queue=args.max_queue, buckets=tuple(b for b, _, _ in shapes), metrics=metrics,
                              policy=args.batching, sizes={(h, w) for _, h, w in shapes} if args.strict_shapes else None)
    return server.serve(stage_service(service, shapes, metrics), host=args.host, port=args.port, max_queue=args.max_queue,
                        metrics_port=args.metrics_port)
