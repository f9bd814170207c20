"""Request-level batching for a stage service: gather waiting requests, run them as one device call, split back.

    batcher = Batcher(run, max_batch=8, batch_wait=0.005, max_queue=8)   # run: joined rows → outputs, row for row
    future = batcher.submit(rows, key=rows.shape[1:], is_active=context.is_active)
    result = future.result()                                             # this request's rows of the output

One worker thread owns the device. It takes the oldest waiting request, then every later one with the same
`key` (the shape of a row: requests with different row shapes cannot share an array) that still fits, until
`max_batch` rows or `batch_wait` seconds after the oldest arrived. The rows are joined along axis 0, padded
up to the next compiled bucket with copies of the last real row, run once, and split back by each request's
row count. Row i of the output may depend only on row i of the input (true of the text encoder and the VAE
decoder: no op mixes the batch), so a request's result does not depend on what it was batched with, and the
padding rows, being real inputs, cannot produce NaN or change the rows beside them.

A request with more rows than `max_batch` runs alone at its own size (it is not split: its rows already
make a full call, and the stage compiles that size for it).

The queue is bounded: at most `max_queue` requests wait (the running batch is not counted, as in
`server.DeviceQueue`); one more raises `errors.Overloaded` at submit. A batch is gathered from the
waiting requests, so `max_queue` also caps the requests in one batch: keep it at least `max_batch`.
A request whose caller is gone (cancelled, past its deadline) is dropped before its batch runs, and one
cancelled while waiting leaves the queue at once. An exception in a call fails only the requests of that call.

`max_batch` 1 turns batching off: each request runs alone at its own size.

JAX-free: the rows are numpy arrays or lists, and `run` is whatever the stage does with them.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import numpy as np

from sdmesh.services.inputs.contract import DEFAULT_MAX_QUEUE
from sdmesh.services.inputs.errors import InvalidRequest
from sdmesh.services.serving.errors import CallerGone, Overloaded
from sdmesh.v1 import common_pb2

MAX_BATCH_WAIT_MS = 10_000  # longer than any gather is worth: a mistake (seconds for milliseconds?)

Rows = np.ndarray | list  # a request's input: one row per image (decoder) or per text (encoder), axis 0


# --- the data: joining, padding, splitting ------------------------------------------------------


def batch_buckets(max_batch: int) -> list[int]:
    """The row counts a batch is padded up to: the powers of two below max_batch, and max_batch. Few sizes, so
    few programs to compile, and at most half of a call is padding. No buckets when max_batch is 1: batching is off
    and every call runs at its own size."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be ≥ 1, got {max_batch}")
    if max_batch == 1:
        return []
    return sorted({1 << k for k in range(max_batch.bit_length()) if 1 << k < max_batch} | {max_batch})


def bucket_for(rows: int, buckets: Sequence[int]) -> int:
    """The smallest bucket holding `rows`; `rows` itself past the largest (a request run alone at its own size)."""
    i = bisect.bisect_left(buckets, rows)
    return buckets[i] if i < len(buckets) else rows


def join(parts: Sequence[Rows], size: int) -> Rows:
    """The parts concatenated along axis 0, then padded to `size` rows with copies of the last real row."""
    if isinstance(parts[0], np.ndarray):
        joined = np.concatenate(parts, axis=0)
        pad = size - joined.shape[0]
        return joined if pad <= 0 else np.concatenate([joined, np.repeat(joined[-1:], pad, axis=0)], axis=0)
    joined = [row for part in parts for row in part]
    return joined + joined[-1:] * (size - len(joined))


def split(output: Any, counts: Sequence[int]) -> list[Any]:
    """`output` (an array or list with a row per input row, or a tuple of them) cut into consecutive pieces of
    `counts` rows; padding rows past sum(counts) are dropped."""
    if isinstance(output, tuple):
        pieces = [split(part, counts) for part in output]
        return [tuple(parts) for parts in zip(*pieces)]
    bounds = np.cumsum([0, *counts])
    return [output[a:b] for a, b in itertools.pairwise(bounds)]


@dataclasses.dataclass(eq=False)
class Request:
    """One caller's rows, waiting for a batch."""

    rows: Rows
    key: Hashable  # requests with equal keys can be joined: the shape of a row
    is_active: Callable[[], bool]  # False once the caller is gone (grpc's context.is_active)
    arrived: float  # time.monotonic()
    future: Future = dataclasses.field(default_factory=Future)

    @property
    def count(self) -> int:
        return len(self.rows)


def gather(waiting: Sequence[Request], max_batch: int) -> tuple[list[Request], bool]:
    """(the next batch, whether it is as full as it can get): the oldest request, then later ones with its key,
    oldest first, while they fit in max_batch rows. Full when it has max_batch rows or a compatible request
    had to be left out: waiting longer would not add to it. A request of max_batch rows or more goes alone."""
    first = waiting[0]
    chosen, rows, left_out = [first], first.count, False
    for request in waiting[1:]:
        if rows >= max_batch:
            break
        if request.key != first.key:
            continue
        if rows + request.count <= max_batch:
            chosen.append(request)
            rows += request.count
        else:
            left_out = True
    return chosen, rows >= max_batch or left_out


# --- the worker ---------------------------------------------------------------------------------


class Batcher:
    """Runs `run(joined rows)` on one worker thread for batches of submitted requests; see the module docstring.

    run: the stage's device call; its output has a row per input row (or is a tuple of such), padding included.
    buckets: the row counts to pad to (default `batch_buckets(max_batch)`); a service compiles these at warm-up.
    metrics: optional, with set_queue_depth(n), observe_batch(used_rows, capacity_rows), observe_chunk(seconds)
        (a `metrics.StageMetrics`); the depth is running + waiting requests, reported only when batching.
    """

    def __init__(
        self,
        run: Callable[[Rows], Any],
        *,
        max_batch: int = 1,
        batch_wait: float = 0.0,
        max_queue: int = DEFAULT_MAX_QUEUE,
        buckets: Sequence[int] | None = None,
        metrics: Any = None,
        name: str = "stage",
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be ≥ 1, got {max_batch}")
        if batch_wait < 0:
            raise ValueError(f"batch_wait must be ≥ 0 seconds, got {batch_wait}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be ≥ 0, got {max_queue}")
        self.run, self.max_batch, self.batch_wait, self.max_queue = run, max_batch, batch_wait, max_queue
        self.buckets = sorted(batch_buckets(max_batch) if buckets is None else buckets)
        self.metrics = metrics
        self._waiting: list[Request] = []  # oldest first
        self._running = 0  # requests in the batch on the device
        self._changed = threading.Condition()
        self._stopping = False
        self._worker = threading.Thread(target=self._loop, name=f"sdmesh-batcher-{name}", daemon=True)
        self._worker.start()

    @property
    def depth(self) -> int:
        """Requests waiting now (not counting the batch on the device)."""
        return len(self._waiting)

    @property
    def admitted(self) -> int:
        """Requests running or waiting now: what the queue-depth metric reports, as for a DeviceQueue."""
        return len(self._waiting) + self._running

    def submit(self, rows: Rows, *, key: Hashable = None, is_active: Callable[[], bool] = lambda: True) -> Future:
        """Queue `rows` (already validated: an error in a batch fails every request in it); returns the future
        of this request's rows of the output. Raises Overloaded when max_queue requests already wait."""
        if len(rows) < 1:
            raise ValueError("a request needs at least one row")
        request = Request(rows, key, is_active, time.monotonic())
        with self._changed:
            if self._stopping:
                raise Overloaded("the stage is stopping: retry on another replica")
            if len(self._waiting) >= self.max_queue:
                raise Overloaded(
                    f"the stage is busy: {len(self._waiting)} calls waiting for the device (--max-queue "
                    f"{self.max_queue}); retry later or on another replica"
                )
            self._waiting.append(request)
            self._queue_changed()
        # a caller that gives up (future.cancel()) leaves the queue now, not when its turn comes
        request.future.add_done_callback(lambda _: self._leave(request))
        return request.future

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new requests, run those already waiting, then end the worker."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        self._worker.join(timeout)

    # -- the worker thread --

    def _leave(self, request: Request) -> None:
        with self._changed:
            if request in self._waiting:
                self._waiting.remove(request)
                self._queue_changed()

    def _queue_changed(self) -> None:  # holding self._changed
        self._changed.notify_all()
        # not batching, the server's DeviceQueue admits the calls (`device_methods`) and reports the depth itself
        if self.metrics is not None and self.max_batch > 1:
            self.metrics.set_queue_depth(self.admitted)

    def _next_batch(self) -> list[Request] | None:
        """Wait for the next batch and take it off the queue; None once stopping with nothing left."""
        with self._changed:
            while True:
                if not self._waiting:
                    if self._stopping:
                        return None
                    self._changed.wait()
                    continue
                chosen, full = gather(self._waiting, self.max_batch)
                left = self._waiting[0].arrived + self.batch_wait - time.monotonic()
                if full or left <= 0 or self._stopping:
                    for request in chosen:
                        self._waiting.remove(request)
                    self._running = len(chosen)
                    self._queue_changed()
                    return chosen
                self._changed.wait(left)  # woken early by an arrival (the batch may now be full) or a departure

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            # set_running_or_notify_cancel: False for a future cancelled since; after it, cancel() can no longer win
            live = [r for r in batch if r.future.set_running_or_notify_cancel()]
            for request in [r for r in live if not r.is_active()]:  # cancelled or past its deadline: no one to answer
                request.future.set_exception(CallerGone())
                live.remove(request)
            if live:
                self._run(live)
            with self._changed:
                self._running = 0
                self._queue_changed()

    def _run(self, batch: list[Request]) -> None:
        counts = [r.count for r in batch]
        used = sum(counts)
        size = bucket_for(used, self.buckets)
        try:
            t0 = time.perf_counter()
            output = self.run(join([r.rows for r in batch], size))
            seconds = time.perf_counter() - t0
            pieces = split(output, counts)
        except Exception as e:  # handed to this batch's callers; their handlers map it to a status
            for request in batch:
                request.future.set_exception(e)
            return
        if self.metrics is not None:  # before the results: whoever has a result sees its batch counted
            self.metrics.observe_chunk(seconds)
            self.metrics.observe_batch(used, size)
        for request, piece in zip(batch, pieces):
            request.future.set_result(piece)


# --- what the stage services share ---------------------------------------------------------------


def options_from_args(args: Any, max_rows: int) -> dict[str, Any]:
    """`sdmesh serve` arguments → a service's batching keywords; raises InvalidRequest naming the flag to fix.
    max_rows: the most rows one device call of the stage may take."""
    max_batch, wait_ms = getattr(args, "max_batch", 1), getattr(args, "batch_wait_ms", 0.0)
    if not 1 <= max_batch <= max_rows:
        raise InvalidRequest(f"--max-batch {max_batch}: give 1 (no batching) to {max_rows} rows per device call")
    if not 0 <= wait_ms <= MAX_BATCH_WAIT_MS:
        raise InvalidRequest(f"--batch-wait-ms {wait_ms}: give 0 to {MAX_BATCH_WAIT_MS} milliseconds")
    return {"max_batch": max_batch, "batch_wait": wait_ms / 1000, "max_queue": args.max_queue}


def info(batcher: Batcher) -> common_pb2.Batching:
    """How the batcher batches, for ModelInfo."""
    return common_pb2.Batching(
        policy="request" if batcher.max_batch > 1 else "off",
        max_batch=batcher.max_batch,
        buckets=batcher.buckets,
        batch_wait_ms=round(batcher.batch_wait * 1000, 3),
    )


def device_methods(batcher: Batcher, rpc: str) -> frozenset[str]:
    """The server's `StageService.device_methods` for a batching service's RPC. Batching, the batcher bounds the
    queue and gathers the waiting calls, so the server's one-at-a-time DeviceQueue must not admit them one by
    one first. Not batching (max_batch 1), the DeviceQueue admits and bounds them."""
    return frozenset() if batcher.max_batch > 1 else frozenset({rpc})


def wait(future: Future, is_active: Callable[[], bool], poll: float = 0.05) -> Any:
    """future.result(), checking every `poll` seconds that the caller is still there; once it is gone, cancel
    the request (it leaves the queue) and raise CallerGone. The caller's own exception is re-raised."""
    while True:
        try:
            return future.result(timeout=poll)
        except FutureTimeout:
            if not is_active():
                future.cancel()  # no effect once its batch is running: that result is simply dropped
                raise CallerGone() from None
