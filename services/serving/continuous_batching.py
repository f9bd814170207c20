"""Step-level continuous batching for the denoiser: one device thread, a running batch per latent shape.

    batcher = ContinuousBatcher(stage, facts, chunk=5, max_batch=8, max_queue=8, buckets=(1, 2, 4, 8))
    ticket = batcher.submit(job)          # Overloaded at once when max_queue requests already wait
    ticket.events.get()                   # (done, total, x̂₀ or None) progress, then ("latents", NHWC) or ("error", exc)
    batcher.cancel(ticket)                # frees its slots at the next chunk boundary
    batcher.drain(seconds)                # shutting down: admit nothing, finish what runs, end the rest

Every request becomes one slot per image (`DenoiserStage.job_slots`). The thread keeps a running
batch per latent shape and runs compiled chunks of `chunk` steps; between chunks finished images
leave, cancelled requests are dropped and waiting requests join, each slot at its own step, step
count, sampler and guidance: one compiled program serves them all. A request with preview_every k
gets its first image's x̂₀ (to the host, one image) with the progress of each chunk that passed a
multiple of k steps (`contract.preview_due`); the others pay nothing for it.

Who joins is fair across tenants (`DenoiseJob.tenant`, the gateway's API-key tenant): the next
request comes from the tenant with the fewest images running, and within a tenant by priority,
then first come, first served. A tenant with nothing running that finds the batch full takes
slots from the tenant running the most (its lowest-priority, latest request is suspended with its
whole state and resumes later, as if never interrupted), so one tenant's burst never starves
another's single request. A full waiting queue likewise pushes out the newest request of the
tenant waiting most rather than refuse a tenant waiting less.

A batch whose program is not compiled yet (an image size or batch size the warm-up did not cover)
runs its first chunk on a worker thread, compile included, while the device thread goes on with
the other batches: a new size costs its own requests the compile, not everyone's. (A stage over
several processes compiles in lockstep on the device thread.)

A chunk that fails fails only the requests in its batch. A device out-of-memory first retries
smaller: the requests that joined last are suspended and the batch size at that image size is
capped below what failed; a request that runs out of memory alone gets RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import collections
import concurrent.futures
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
from sdmesh.services.inputs.contract import DenoiseJob, ModelFacts, preview_due
from sdmesh.services.inputs.errors import InvalidRequest
from sdmesh.services.serving.errors import Draining, OutOfDeviceMemory, Overloaded, is_out_of_memory

GUIDED, UNGUIDED = "denoise", "denoise-unguided"  # the two programs: with and without an unconditional pass
POLICIES = ("continuous", "request")  # join between chunks, or only when the running batch has emptied

log = logging.getLogger("sdmesh.denoiser")


class Ticket:
    """One Denoise call inside the batcher: its slots, and the events its stream waits for."""

    def __init__(self, job: DenoiseJob, seq: int):
        self.job, self.seq = job, seq
        # (done, total, x̂₀ (h, w, C) or None) progress, then ("latents", array) or ("error", exc)
        self.events: queue.Queue = queue.Queue()
        self.cancelled = threading.Event()
        self.slots: list[Slot] = []
        self.states: list[Any] | None = None  # while suspended: its slots' whole state, to resume from
        self.reported = 0
        self.total = job.steps  # steps this request runs (fewer when it starts part-way)
        self.joined = 0  # when it (last) joined a batch: the batcher's join counter

    @property
    def tenant(self) -> str:
        return self.job.tenant

    def __lt__(self, other: Ticket) -> bool:  # heap order: higher priority, then earlier
        return (-self.job.priority, self.seq) < (-other.job.priority, other.seq)


class ContinuousBatcher:
    """Step-level continuous batching: one thread, running batches per latent shape, bounded, fair admission.

    Tickets wait in a heap per tenant (priority, then arrival). Between chunks the thread admits
    tickets, fairly across tenants, while their images fit in `max_batch` slots (a request larger than
    that runs alone), runs one chunk of the next non-empty batch (round robin over shapes), reports
    progress, and lets finished and cancelled tickets leave.
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
        self._waiting: dict[str, list[Ticket]] = {}  # tenant → heap
        self._batches: dict[tuple, RunningBatch] = {}
        self._tickets: list[Ticket] = []  # admitted, not finished
        self._row_limit: dict[tuple[int, int], int] = {}  # (height, width) → rows, after a device OOM there
        # batches whose first chunk (and compile) runs on the worker: key → (future, start time)
        # batches on the worker: (its chunk, when it started, the program it runs)
        self._busy: dict[tuple, tuple[concurrent.futures.Future, float, tuple[str, int, int, int]]] = {}
        self._deferred: list[Ticket] = []  # admitted, waiting for their batch to come back from the worker
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sdmesh-compile")
        self._off_thread = getattr(getattr(stage, "programs", None), "lockstep", None) is None
        self._lock = threading.Condition()
        self._seq = itertools.count()
        self._joins = itertools.count(1)
        self._turn = 0
        self._draining = False
        self.compiled: set[tuple[str, int, int, int]] = set()  # (program, batch, height, width)
        self.stats = {"chunks": 0, "peak_slots": 0, "peak_requests": 0, "shared_chunks": 0, "preempted": 0}
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="sdmesh-denoiser", daemon=True)
        self._thread.start()

    # -- callers' side --

    def submit(self, job: DenoiseJob) -> Ticket:
        with self._lock:
            if self._draining:
                raise Draining("the denoiser is shutting down and admits no new request; retry on another replica")
            ticket = Ticket(job, next(self._seq))
            if self.waiting_requests >= self.max_queue:
                self._push_out_for(ticket)
            heapq.heappush(self._waiting.setdefault(job.tenant, []), ticket)
            self._report_queue()
            self._lock.notify()
        return ticket

    def _push_out_for(self, ticket: Ticket) -> None:
        """The queue is full: refuse `ticket`, unless another tenant waits with more requests than its tenant
        does; then that tenant's last request (lowest priority, latest) leaves instead (caller holds the lock)."""
        if not self.waiting_requests:  # --max-queue 0: nothing waits
            raise Overloaded("the denoiser is busy and --max-queue is 0; retry later or on another replica")
        busiest = max(self._waiting, key=lambda t: len(self._waiting[t]))
        mine = len(self._waiting.get(ticket.tenant, ()))
        if busiest == ticket.tenant or len(self._waiting[busiest]) <= mine + 1:
            raise Overloaded(
                f"the denoiser is busy: {self.max_queue} requests already wait for a slot "
                "(--max-queue); retry later or on another replica"
            )
        heap = self._waiting[busiest]
        victim = max(heap)
        heap.remove(victim)
        heapq.heapify(heap)
        victim.events.put(
            ("error", Overloaded("the denoiser is busy and shares its queue between tenants; retry later"))
        )

    def cancel(self, ticket: Ticket) -> None:
        ticket.cancelled.set()
        with self._lock:
            heap = self._waiting.get(ticket.tenant, [])
            if ticket in heap:
                heap.remove(ticket)
                heapq.heapify(heap)
                self._report_queue()
            self._lock.notify()

    def drain(self, seconds: float) -> int:
        """Admit nothing new, fail what waits with Draining (a gateway retries it elsewhere), let running requests
        finish for up to `seconds`, then fail the rest with Draining. Returns how many were ended unfinished."""
        with self._lock:
            self._draining = True
            ended = self._fail_waiting(Draining("the denoiser is shutting down; retry on another replica"))
            self._lock.notify()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            with self._lock:
                if not self._tickets and not self._deferred and not self.waiting_requests:
                    return ended
            time.sleep(0.05)
        with self._lock:
            self._stop = True  # the device thread stops at the next chunk boundary, with the lock
            self._lock.notify()
        self._thread.join(timeout=max(seconds, 5.0))
        rest = [t for t in self._tickets + self._deferred if not t.cancelled.is_set()]
        self._fail(rest, Draining(f"the denoiser shut down before this request finished ({seconds:g}s drain); retry"))
        return ended + len(rest)

    def close(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify()
        self._thread.join(timeout=5)
        self._worker.shutdown(wait=False)

    @property
    def waiting_requests(self) -> int:
        return sum(len(h) for h in self._waiting.values())

    @property
    def running_slots(self) -> int:
        return sum(len(b) for b in self._batches.values()) + sum(len(t.slots) for t in self._deferred)

    # -- the device thread --

    def _report_queue(self) -> None:
        if self.metrics is not None:
            self.metrics.set_queue_depth(self.waiting_requests)

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not self.waiting_requests and not self.running_slots:
                    self._lock.wait()
                if self._stop:
                    return
                admitted, preempted = self._admit()
            self._collect()
            self._suspend(preempted)
            deferred, self._deferred = self._deferred, []
            for ticket in deferred + admitted:
                try:
                    self._join(ticket)
                except Exception as error:  # its own inputs failed to become slots: only it fails
                    log.exception("a denoise request could not join the batch")
                    self._fail([ticket], error)
            self._drop_cancelled()
            try:
                self._run_one_chunk()
            except Exception as error:  # a bug outside any one batch: fail what runs, keep serving
                log.exception("the denoiser's batching failed")
                self._fail(self._tickets + self._deferred, error)
                self._batches, self._busy, self._deferred = {}, {}, []

    # -- who joins (the caller holds the lock) --

    def _admit(self) -> tuple[list[Ticket], list[Ticket]]:
        """(tickets to join, running tickets to suspend for them): the fairest heads while they fit."""
        admitted: list[Ticket] = []
        preempted: list[Ticket] = []
        if self.policy == "request" and self.running_slots:
            return admitted, preempted  # request-level batching: a batch forms from the waiting requests, runs out
        holding = self._tickets + self._deferred
        running = collections.Counter(t.tenant for t in holding for _ in t.slots)
        rows = collections.Counter(self._size(t) for t in holding for _ in t.slots)
        free = self.max_batch - self.running_slots
        on_worker = self._on_worker()
        victims = sorted(  # most deserving first; a batch on the worker cannot give slots up now
            (t for t in self._tickets if id(t) not in on_worker), key=lambda t: (-t.job.priority, t.joined)
        )
        self._waiting = {tenant: heap for tenant, heap in self._waiting.items() if heap}  # tenants come and go
        while True:
            heads = [(running[tenant], heap[0], tenant) for tenant, heap in self._waiting.items() if heap]
            if not heads:
                break
            _, head, tenant = min(heads)
            images = self._images(head)
            size = self._size(head)
            limit = self._row_limit.get(size, self.max_batch)
            fits = images <= free and rows[size] + images <= limit
            alone = self.running_slots == 0 and not admitted and not preempted
            while not fits and not alone and self.policy == "continuous":
                # take slots from the tenant running the most, while it keeps at least as many as this one gets
                victim = next(
                    (
                        v
                        for v in reversed(victims)
                        if v.tenant != tenant
                        and running[v.tenant] - len(v.slots) >= running[tenant] + images
                        and (images > free or self._size(v) == size)  # else its slots would not make room here
                    ),
                    None,
                )
                if victim is None:
                    break
                victims.remove(victim)
                preempted.append(victim)
                running[victim.tenant] -= len(victim.slots)
                rows[self._size(victim)] -= len(victim.slots)
                free += len(victim.slots)
                fits = images <= free and rows[size] + images <= limit
            if not (fits or alone):
                break  # within the chosen tenant, first come, first served: nobody overtakes its head
            heapq.heappop(self._waiting[tenant])
            if head.cancelled.is_set():
                continue
            admitted.append(head)
            free -= images
            running[tenant] += images
            rows[size] += images
        if admitted or preempted:
            self._report_queue()
        return admitted, preempted

    @staticmethod
    def _images(ticket: Ticket) -> int:
        return len(ticket.slots) if ticket.slots else ticket.job.images

    @staticmethod
    def _size(ticket: Ticket) -> tuple[int, int]:
        return ticket.job.height, ticket.job.width

    # -- batches (the device thread) --

    def _suspend(self, tickets: list[Ticket]) -> None:
        """Take these tickets' slots out of their batches with their state, and put them back in the queue."""
        for ticket in tickets:
            mine = {id(s) for s in ticket.slots}
            states = {}
            for batch in self._batches.values():
                states.update({id(s): st for s, st in batch.suspend(lambda s, mine=mine: id(s) in mine)})
            ticket.states = [states[id(s)] for s in ticket.slots]
            self._tickets.remove(ticket)
            self.stats["preempted"] += 1
            with self._lock:
                heapq.heappush(self._waiting.setdefault(ticket.tenant, []), ticket)
                self._report_queue()

    def _join(self, ticket: Ticket) -> None:
        if ticket.states is None and not ticket.slots:
            ticket.slots = self.stage.job_slots(ticket.job, self.facts, owner=ticket)
            ticket.total = ticket.slots[0].steps  # img2img runs fewer
        key = group_key(ticket.slots[0])
        if key in self._busy:  # its batch is on the worker: join when it is back
            self._deferred.append(ticket)
            return
        if key not in self._batches:
            self._batches[key] = self.stage.new_batch(self.buckets)
        self._batches[key].join(ticket.slots, ticket.states)
        ticket.states = None
        ticket.joined = next(self._joins)
        self._tickets.append(ticket)

    def _drop_cancelled(self) -> None:
        for key, batch in self._batches.items():
            if key not in self._busy:
                batch.leave(lambda s: not s.owner.cancelled.is_set())
        on_worker = self._on_worker()
        self._tickets = [t for t in self._tickets if id(t) in on_worker or not t.cancelled.is_set()]
        self._deferred = [t for t in self._deferred if not t.cancelled.is_set()]

    def _on_worker(self) -> set[int]:
        """ids of the tickets whose batch is on the worker now (not to be touched until it is back)."""
        return {id(s.owner) for key in self._busy for s in self._batches[key].slots}

    def _in(self, batch: RunningBatch) -> list[Ticket]:
        mine = {id(s) for s in batch.slots}
        return [t for t in self._tickets if any(id(s) in mine for s in t.slots)]

    def _program(self, key: tuple, batch: RunningBatch) -> tuple[str, int, int, int]:
        (h, w, _), _, _ = key
        f = self.facts.vae_scale_factor
        return GUIDED if batch.with_uncond else UNGUIDED, batch.capacity, h * f, w * f

    def _run_one_chunk(self) -> None:
        keys = [k for k, b in self._batches.items() if len(b) and k not in self._busy]
        if not keys:
            if self._busy:  # only batches on the worker: wait for one (or for a new request, at the next loop)
                concurrent.futures.wait(
                    [f for f, _, _ in self._busy.values()], timeout=0.05, return_when="FIRST_COMPLETED"
                )
            return
        key = keys[self._turn % len(keys)]
        self._turn += 1
        batch = self._batches[key]
        t0 = time.perf_counter()
        program = self._program(key, batch)  # before the chunk: its slots' steps decide which program runs
        if self._off_thread and program not in self.compiled:
            self._busy[key] = (self._worker.submit(batch.run_chunk, self.chunk), t0, program)
            return
        try:
            compile_s = batch.run_chunk(self.chunk)
        except Exception as error:
            self._chunk_failed(key, batch, error)
            return
        self._after_chunk(key, batch, t0, compile_s, program)

    def _collect(self) -> None:
        """Take back the batches whose chunk on the worker has finished."""
        for key, (future, t0, program) in list(self._busy.items()):
            if not future.done():
                continue
            del self._busy[key]
            batch = self._batches[key]
            error = future.exception()
            if error is not None:
                self._chunk_failed(key, batch, error)  # type: ignore[arg-type]
            else:
                self._after_chunk(key, batch, t0, future.result(), program)

    def _after_chunk(
        self, key: tuple, batch: RunningBatch, t0: float, compile_s: float, program: tuple[str, int, int, int]
    ) -> None:
        """Count the chunk, report progress, and let finished requests leave with their latents."""
        seconds = time.perf_counter() - t0 - compile_s
        owners = {id(s.owner) for s in batch.slots}
        self.stats["chunks"] += 1
        self.stats["peak_slots"] = max(self.stats["peak_slots"], len(batch))
        self.stats["peak_requests"] = max(self.stats["peak_requests"], len(owners))
        self.stats["shared_chunks"] += len(owners) > 1
        self.compiled.add(program)
        if self.metrics is not None:
            self.metrics.observe_chunk(seconds)
            self.metrics.observe_batch(len(batch), batch.capacity)
        finished: dict[int, Ticket] = {}
        for ticket in self._in(batch):
            done = min(s.steps_done for s in ticket.slots)
            if done > ticket.reported:
                due = preview_due(ticket.reported, done, ticket.total, ticket.job.preview_every)
                ticket.reported = done
                ticket.events.put((done, ticket.total, self._x0(batch, ticket.slots[0]) if due else None))
            if all(s.done for s in ticket.slots):
                finished[id(ticket)] = ticket
        if finished:
            latents = {id(s): x for s, x in batch.leave(lambda s: id(s.owner) not in finished)}
            for ticket in finished.values():
                ticket.events.put(("latents", np.stack([latents[id(s)] for s in ticket.slots])))
                if self.metrics is not None:
                    self.metrics.images_served(ticket.job.images)
            self._tickets = [t for t in self._tickets if id(t) not in finished]

    @staticmethod
    def _x0(batch: RunningBatch, slot: Slot) -> np.ndarray | None:
        """The slot's current x̂₀ (h, w, C) as the chunk left it on the device: one image to the host."""
        state = batch.device_state
        # a batch sharded across processes is not this process's to read whole: no previews there
        if state is None or not getattr(state.x0_history, "is_fully_addressable", True):
            return None
        return np.asarray(state.x0_history[batch.slots.index(slot), 0])  # table.SlotState: most recent first

    def _chunk_failed(self, key: tuple, batch: RunningBatch, error: Exception) -> None:
        """Fail only this batch's requests; on a device OOM first retry with the latest joiners suspended."""
        tickets = self._in(batch)
        if is_out_of_memory(error) and len(tickets) > 1:
            size = self._size(tickets[0])
            smaller = max([b for b in self.buckets if b < batch.capacity], default=1)
            self._row_limit[size] = min(self._row_limit.get(size, self.max_batch), smaller)
            rows, keep = 0, []  # the earliest joiners stay, up to the smaller size; the later ones wait
            for t in sorted(tickets, key=lambda t: t.joined):
                if not keep or rows + len(t.slots) <= smaller:
                    keep.append(t)
                    rows += len(t.slots)
            out = [t for t in tickets if t not in keep]
            log.warning(
                "the device ran out of memory at batch %d (%dx%d): %d requests wait, at most %d rows at this size now",
                batch.capacity, size[0], size[1], len(out), smaller,
            )  # fmt: skip
            self._suspend(out)
            return
        if is_out_of_memory(error):
            t = tickets[0] if tickets else None
            error = OutOfDeviceMemory(
                "the denoiser's device ran out of memory for this request"
                + (f" ({len(t.slots)} images at {t.job.height}x{t.job.width})" if t else "")
                + "; ask for fewer images or a smaller size, or retry on a replica with more memory"
            )
        else:
            log.exception("a denoise chunk failed", exc_info=error)
        self._fail(tickets, error)
        del self._batches[key]  # its device state is unknown now; the other batches keep running

    def _fail(self, tickets: list[Ticket], error: Exception) -> None:
        for ticket in tickets:
            ticket.events.put(("error", error))
        gone = {id(t) for t in tickets}
        self._tickets = [t for t in self._tickets if id(t) not in gone]

    def _fail_waiting(self, error: Exception) -> int:
        """Fail every waiting ticket (caller holds the lock); returns how many."""
        waiting = [t for heap in self._waiting.values() for t in heap]
        self._waiting = {}
        self._fail(waiting, error)
        self._report_queue()
        return len(waiting)
