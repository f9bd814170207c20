"""Step-level continuous batching for the denoiser: one device thread, a running batch per latent shape.

    batcher = ContinuousBatcher(stage, facts, chunk=5, max_batch=8, max_queue=8, buckets=(1, 2, 4, 8))
    ticket = batcher.submit(job)          # Overloaded at once when max_queue requests already wait
    ticket.events.get()                   # (done, total) progress, then ("latents", NHWC array) or ("error", exc)
    batcher.cancel(ticket)                # frees its slots at the next chunk boundary

Every request becomes one slot per image (`DenoiserStage.job_slots`). The thread keeps a running
batch per latent shape and runs compiled chunks of `chunk` steps; between chunks finished images
leave, cancelled requests are dropped and waiting requests join (highest priority first, then
first come, first served), each slot at its own step, step count, sampler and guidance: one
compiled program serves them all.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import queue
import threading
import time
from typing import Any

import numpy as np

from sdmesh.services.engine.denoise import RunningBatch, Slot, group_key
from sdmesh.services.engine.stages import DenoiserStage
from sdmesh.services.inputs.contract import DenoiseJob, ModelFacts
from sdmesh.services.inputs.errors import InvalidRequest
from sdmesh.services.serving.errors import Overloaded

GUIDED, UNGUIDED = "denoise", "denoise-unguided"  # the two programs: with and without an unconditional pass
POLICIES = ("continuous", "request")  # join between chunks, or only when the running batch has emptied

log = logging.getLogger("sdmesh.denoiser")


class Ticket:
    """One Denoise call inside the batcher: its slots, and the events its stream waits for."""

    def __init__(self, job: DenoiseJob, seq: int):
        self.job, self.seq = job, seq
        self.events: queue.Queue = queue.Queue()  # (done, total) progress, then ("latents", array) or ("error", exc)
        self.cancelled = threading.Event()
        self.slots: list[Slot] = []
        self.reported = 0
        self.total = job.steps  # steps this request runs (fewer when it starts part-way)

    def __lt__(self, other: Ticket) -> bool:  # heap order: higher priority, then earlier
        return (-self.job.priority, self.seq) < (-other.job.priority, other.seq)


class ContinuousBatcher:
    """Step-level continuous batching: one thread, running batches per latent shape, bounded admission.

    Tickets wait in a heap (priority, then arrival). Between chunks the thread admits the
    head tickets while their images fit in `max_batch` slots (a request larger than that
    runs alone), runs one chunk of the next non-empty batch (round robin over shapes),
    reports progress, and lets finished and cancelled tickets leave.
    """

    def __init__(
        self,
        stage: DenoiserStage,
        facts: ModelFacts,
        *,
        chunk: int,
        max_batch: int,
        max_queue: int,
        buckets: tuple[int, ...],
        metrics: Any = None,
        policy: str = "continuous",
    ):
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
                raise Overloaded(
                    f"the denoiser is busy: {self.max_queue} requests already wait for a slot "
                    "(--max-queue); retry later or on another replica"
                )
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
    def waiting_requests(self) -> int:
        return len(self._waiting)

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
            except Exception as error:  # fail the calls in flight, keep serving the next ones
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
        ticket.slots = self.stage.job_slots(ticket.job, self.facts, owner=ticket)
        ticket.total = ticket.slots[0].steps  # img2img runs fewer
        key = group_key(ticket.slots[0])
        if key not in self._batches:
            self._batches[key] = self.stage.new_batch(self.buckets)
        self._batches[key].join(ticket.slots)
        self._tickets.append(ticket)

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
        f = self.facts.vae_scale_factor
        self.compiled.add((GUIDED if batch.with_uncond else UNGUIDED, batch.capacity, h * f, w * f))
        if self.metrics is not None:
            self.metrics.observe_chunk(seconds)
            self.metrics.observe_batch(len(batch), batch.capacity)
        finished: dict[int, Ticket] = {}
        for ticket in [t for t in self._tickets if any(s in batch.slots for s in t.slots)]:
            done = min(s.steps_done for s in ticket.slots)
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
