"""Request-level batching (services/batching.py) in the text-encoder and decoder services.

The Batcher gathers waiting requests up to max_batch rows or batch_wait seconds, pads to a bucket, runs once,
and splits the results back; its queue is bounded, callers that left are dropped, and an error fails only its
own batch. First with a fake stage function whose output is exact, then over gRPC around the tiny checkpoint:
concurrent Encode and Decode calls really share device calls, and each gets what it gets alone."""

from __future__ import annotations

import threading
import time
import types
from concurrent.futures import CancelledError, ThreadPoolExecutor

import grpc
import jax.numpy as jnp
import numpy as np
import pytest

from sdmesh.client import stages
from sdmesh.services.engine.stages import DecoderStage, TextEncoderStage
from sdmesh.services.serving import batching, decoder_service, errors, server, text_encoder_service
from sdmesh.services.serving.metrics import StageMetrics
from sdmesh.v1 import decoder_pb2, decoder_pb2_grpc
from sdmesh.v1.tensors import to_proto

SIZE = 16  # the tiny checkpoint's native size: UNet sample_size 8 × VAE factor 2


# --- the data: buckets, joining, splitting ------------------------------------------------------


def test_buckets_are_powers_of_two_up_to_max_batch_and_none_when_not_batching():
    assert batching.batch_buckets(1) == []
    assert batching.batch_buckets(4) == [1, 2, 4]
    assert batching.batch_buckets(12) == [1, 2, 4, 8, 12]
    assert [batching.bucket_for(n, [1, 2, 4]) for n in (1, 2, 3, 4, 5)] == [
        1,
        2,
        4,
        4,
        5,
    ]  # past the last: its own size
    assert batching.bucket_for(3, []) == 3


def test_join_pads_with_copies_of_a_real_row_and_split_drops_the_padding():
    a, b = np.array([[1.0, 1.0]]), np.array([[2.0, 2.0], [3.0, 3.0]])
    joined = batching.join([a, b], 4)
    np.testing.assert_array_equal(joined, [[1, 1], [2, 2], [3, 3], [3, 3]])
    assert batching.join([["x"], ["y", "z"]], 5) == ["x", "y", "z", "z", "z"]
    first, second = batching.split((joined * 10, ["p", "q", "r", "s"]), [1, 2])
    np.testing.assert_array_equal(first[0], [[10, 10]])
    np.testing.assert_array_equal(second[0], [[20, 20], [30, 30]])
    assert (first[1], second[1]) == (["p"], ["q", "r"])


def _request(rows: int, key="k") -> batching.Request:
    return batching.Request(np.zeros((rows, 1)), key, lambda: True, 0.0)


def test_gather_takes_the_oldest_then_compatible_requests_that_fit():
    a, b, c, d, e = _request(2), _request(1, key="other"), _request(3), _request(1), _request(1)
    chosen, full = batching.gather([a, b, c, d, e], max_batch=4)
    assert chosen == [a, d, e] and full  # b has another row shape; c does not fit beside a
    chosen, full = batching.gather([a, b], max_batch=4)
    assert chosen == [a] and not full  # room left: worth waiting for more
    big = _request(6)
    assert batching.gather([big, a], max_batch=4) == ([big], True)  # more rows than max_batch: alone


# --- the Batcher, with a fake stage -------------------------------------------------------------


class FakeStage:
    """run(rows) → rows × 10, row for row; records each call's rows; can hold a call until released, or fail."""

    def __init__(self, hold_first: bool = False, fail_when=None):
        self.calls: list[np.ndarray] = []
        self.entered, self.release = threading.Semaphore(0), threading.Event()
        self.hold = hold_first
        self.fail_when = fail_when  # rows → bool

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        self.calls.append(rows.copy())
        self.entered.release()
        if self.hold:
            self.hold = False
            assert self.release.wait(10)
        if self.fail_when is not None and self.fail_when(rows):
            raise KeyError("oops")
        return rows * 10

    @property
    def sizes(self) -> list[int]:
        return [len(rows) for rows in self.calls]


class RecordingMetrics:
    def __init__(self):
        self.depths, self.batches, self.chunks = [], [], []

    def set_queue_depth(self, n):
        self.depths.append(n)

    def observe_batch(self, used, capacity):
        self.batches.append((used, capacity))

    def observe_chunk(self, seconds):
        self.chunks.append(seconds)


def rows(*values: float) -> np.ndarray:
    return np.array(values, np.float32)[:, None]  # (N, 1)


@pytest.fixture
def make_batcher():
    made = []

    def make(stage, **kwargs) -> batching.Batcher:
        made.append(batching.Batcher(stage, **kwargs))
        return made[-1]

    yield make
    for batcher in made:
        batcher.stop(timeout=5)


def test_waiting_requests_are_gathered_up_to_max_batch_and_each_gets_its_own_rows(make_batcher):
    stage, metrics = FakeStage(hold_first=True), RecordingMetrics()
    batcher = make_batcher(stage, max_batch=3, max_queue=8, metrics=metrics)
    first = batcher.submit(rows(0))
    assert stage.entered.acquire(timeout=5)  # on the "device", held: the next ones wait together
    waiting = [batcher.submit(rows(i, i + 0.5) if i == 2 else rows(i)) for i in (1, 2, 3, 4)]  # 1 + 2 + 1 + 1 rows
    stage.release.set()
    results = [f.result(timeout=5) for f in [first, *waiting]]
    np.testing.assert_array_equal(results[2], rows(20, 25))
    for i in (0, 1, 3, 4):
        np.testing.assert_array_equal(results[i], rows(10 * i))
    # [0] alone; [1, 2] fill 3 rows (3 does not fit beside them); [3, 4] fill 2 rows
    assert stage.sizes == [1, 3, 2]
    assert metrics.batches == [(1, 1), (3, 3), (2, 2)] and len(metrics.chunks) == 3
    assert metrics.depths[-1] == 0


def test_a_batch_is_padded_to_the_next_bucket_with_copies_of_a_real_row(make_batcher):
    stage, metrics = FakeStage(hold_first=True), RecordingMetrics()
    batcher = make_batcher(stage, max_batch=8, metrics=metrics)
    batcher.submit(rows(9))
    assert stage.entered.acquire(timeout=5)
    futures = [batcher.submit(rows(1)), batcher.submit(rows(2, 3)), batcher.submit(rows(4, 5))]  # 5 rows → bucket 8
    stage.release.set()
    assert [f.result(timeout=5).ravel().tolist() for f in futures] == [[10], [20, 30], [40, 50]]
    np.testing.assert_array_equal(stage.calls[1].ravel(), [1, 2, 3, 4, 5, 5, 5, 5])
    assert metrics.batches[1] == (5, 8)


def test_the_oldest_waits_at_most_batch_wait_and_a_full_batch_does_not_wait(make_batcher):
    stage = FakeStage()
    batcher = make_batcher(stage, max_batch=4, batch_wait=0.3)
    t0 = time.monotonic()
    first = batcher.submit(rows(1))
    time.sleep(0.1)
    second = batcher.submit(rows(2))
    first.result(timeout=5), second.result(timeout=5)
    waited = time.monotonic() - t0
    assert stage.sizes == [2] and 0.25 <= waited < 3.0, waited  # gathered together, after about batch_wait
    stage = FakeStage()
    batcher = make_batcher(stage, max_batch=4, batch_wait=10.0)
    t0 = time.monotonic()
    full = [batcher.submit(rows(i)) for i in range(4)]
    [f.result(timeout=5) for f in full]
    assert stage.sizes == [4] and time.monotonic() - t0 < 3.0  # full: runs at once, not after 10 s


def test_requests_of_different_row_shapes_never_share_a_call_and_a_big_request_runs_alone(make_batcher):
    stage = FakeStage(hold_first=True)
    batcher = make_batcher(stage, max_batch=4)
    batcher.submit(rows(0))
    assert stage.entered.acquire(timeout=5)
    a = batcher.submit(rows(1), key=(8, 8))
    b = batcher.submit(rows(2), key=(16, 16))
    c = batcher.submit(rows(3), key=(8, 8))
    big = batcher.submit(rows(*range(6)))  # 6 rows > max_batch 4: alone, at its own size
    stage.release.set()
    for f in (a, b, c, big):
        f.result(timeout=5)
    assert [call.ravel().tolist() for call in stage.calls[1:]] == [[1, 3], [2], list(range(6))]


def test_a_burst_past_the_queue_bound_is_refused_at_submit_and_every_admitted_request_completes(make_batcher):
    stage = FakeStage(hold_first=True)
    batcher = make_batcher(stage, max_batch=2, max_queue=3)
    running = batcher.submit(rows(0))
    assert stage.entered.acquire(timeout=5)
    admitted, refused = [], 0
    for i in range(1, 8):  # a burst of 7 while one runs: 3 may wait
        try:
            admitted.append((i, batcher.submit(rows(i))))
        except errors.Overloaded as e:
            assert "--max-queue 3" in str(e)
            refused += 1
    assert len(admitted) == 3 and refused == 4 and batcher.depth == 3
    stage.release.set()
    assert running.result(timeout=5).item() == 0
    assert [f.result(timeout=5).item() for _, f in admitted] == [10 * i for i, _ in admitted]


def test_a_caller_gone_before_its_batch_runs_is_dropped_and_a_cancelled_one_leaves_the_queue(make_batcher):
    stage = FakeStage(hold_first=True)
    batcher = make_batcher(stage, max_batch=4, max_queue=2)
    batcher.submit(rows(0))
    assert stage.entered.acquire(timeout=5)
    caller = {"active": True}
    gone = batcher.submit(rows(1), is_active=lambda: caller["active"])
    cancelled = batcher.submit(rows(2))
    with pytest.raises(errors.Overloaded):  # the queue (2) is full
        batcher.submit(rows(3))
    assert cancelled.cancel() and batcher.depth == 1  # gives up its place at once
    kept = batcher.submit(rows(4))
    caller["active"] = False  # e.g. its deadline passed while it waited
    stage.release.set()
    assert kept.result(timeout=5).item() == 40
    with pytest.raises(errors.CallerGone):
        gone.result(timeout=5)
    with pytest.raises(CancelledError):
        cancelled.result(timeout=5)
    assert [call.ravel().tolist() for call in stage.calls] == [[0], [4]]  # neither 1 nor 2 reached the device


def test_an_error_fails_only_its_own_batch(make_batcher):
    stage = FakeStage(hold_first=True, fail_when=lambda r: 7 in r)
    batcher = make_batcher(stage, max_batch=2)
    first = batcher.submit(rows(0))
    assert stage.entered.acquire(timeout=5)
    bad = [batcher.submit(rows(7)), batcher.submit(rows(1))]  # one batch, with the row that fails
    good = [batcher.submit(rows(2)), batcher.submit(rows(3))]  # the next batch
    stage.release.set()
    assert first.result(timeout=5).item() == 0
    for f in bad:
        with pytest.raises(KeyError):
            f.result(timeout=5)
    assert [f.result(timeout=5).item() for f in good] == [20, 30]


def test_stop_runs_what_waits_then_refuses(make_batcher):
    stage = FakeStage(hold_first=True)
    batcher = make_batcher(stage, max_batch=1)
    first, second = batcher.submit(rows(1)), None
    assert stage.entered.acquire(timeout=5)
    second = batcher.submit(rows(2))
    stopper = threading.Thread(target=batcher.stop)
    stopper.start()
    time.sleep(0.05)
    with pytest.raises(errors.Overloaded, match="stopping"):
        batcher.submit(rows(3))
    stage.release.set()
    stopper.join(5)
    assert not stopper.is_alive() and (first.result(0).item(), second.result(0).item()) == (10, 20)


def test_wait_gives_up_and_frees_the_place_once_the_caller_is_gone(make_batcher):
    stage = FakeStage(hold_first=True)
    batcher = make_batcher(stage, max_batch=2, max_queue=1)
    batcher.submit(rows(0))
    assert stage.entered.acquire(timeout=5)
    future = batcher.submit(rows(1))
    deadline = time.monotonic() + 0.1
    with pytest.raises(errors.CallerGone):
        batching.wait(future, lambda: time.monotonic() < deadline, poll=0.01)
    assert future.cancelled() and batcher.depth == 0
    stage.release.set()


def test_options_from_args_name_the_flag_to_fix():
    args = types.SimpleNamespace(max_batch=4, batch_wait_ms=5.0, max_queue=8)
    assert batching.options_from_args(args, max_rows=64) == {"max_batch": 4, "batch_wait": 0.005, "max_queue": 8}
    with pytest.raises(batching.InvalidRequest, match="--max-batch 100: give 1"):
        batching.options_from_args(types.SimpleNamespace(max_batch=100, batch_wait_ms=0.0, max_queue=8), max_rows=64)
    with pytest.raises(batching.InvalidRequest, match="--batch-wait-ms"):
        batching.options_from_args(types.SimpleNamespace(max_batch=4, batch_wait_ms=-1.0, max_queue=8), max_rows=64)


# --- over gRPC, around the tiny checkpoint --------------------------------------------------------


class Recorded(StageMetrics):
    """StageMetrics that also keep each device batch's (used, capacity) rows."""

    def __init__(self, stage: str):
        super().__init__(stage)
        self.batches: list[tuple[int, int]] = []

    def observe_batch(self, used: int, capacity: int) -> None:
        super().observe_batch(used, capacity)
        self.batches.append((used, capacity))


@pytest.fixture(scope="module")
def tiny(tiny_checkpoints):
    folder = tiny_checkpoints["sd2"]
    return types.SimpleNamespace(encoder=TextEncoderStage.load(folder), decoder=DecoderStage.load(folder))


def _serve(stage_service, service):
    running = server.StageServer(stage_service, max_queue=service.batcher.max_queue).start()
    running.warm_up()
    return running


def concurrently(calls):
    with ThreadPoolExecutor(len(calls)) as pool:
        return [f.result() for f in [pool.submit(call) for call in calls]]


def test_concurrent_decodes_share_a_device_call_and_each_image_equals_its_decode_alone(tiny):
    metrics = Recorded("decoder")
    service = decoder_service.DecoderService(
        tiny.decoder, "tiny", max_batch=4, batch_wait=2.0, max_queue=8, metrics=metrics
    )
    running = _serve(decoder_service.stage_service(service, [(1, SIZE, SIZE)]), service)
    try:
        info = stages.DecoderClient(running.address).model_info()
        assert sorted(s.batch for s in info.compiled_shapes) == [1, 2, 4]  # every bucket compiled before SERVING
        assert (info.batching.max_batch, info.batching.batch_wait_ms) == (4, 2000.0)
        rng = np.random.default_rng(0)
        latents = [
            rng.standard_normal((n, 4, SIZE // 2, SIZE // 2), dtype=np.float32) for n in (1, 2, 1)
        ]  # 4 images: full
        client = stages.DecoderClient(running.address)
        images = concurrently([lambda x=x: client.decode(x, timeout=30) for x in latents])
        assert metrics.batches == [(4, 4)]  # one device call for the three requests
        worst = 0
        for x, got in zip(latents, images):
            alone, _ = tiny.decoder.decode(
                jnp.asarray(x.transpose(0, 2, 3, 1))
            )  # the same request at its own batch size
            assert got.shape == alone.shape
            worst = max(worst, int(np.abs(got.astype(int) - alone.astype(int)).max()))
        print(f"decoder: batched vs alone, max difference {worst}/255")
        assert worst <= 1  # fp32: XLA may reassociate per batch size; ≤ 1/255 per pixel
    finally:
        running.stop(grace=0)
        service.close()


def test_concurrent_encodes_share_a_device_call_and_each_equals_its_encode_alone(tiny):
    metrics = Recorded("text_encoder")
    service = text_encoder_service.TextEncoderService(
        tiny.encoder, "tiny", max_batch=8, batch_wait=2.0, max_queue=8, metrics=metrics
    )
    running = _serve(text_encoder_service.stage_service(service, [(1, 0, 0)]), service)
    try:
        requests = [  # (prompts, negatives, unconditional): 2 + 2 + 3 + 1 = 8 rows, one full batch
            (["a red cube"], [], True),
            (["word " * 250], ["blurry"], True),  # 1000 tokens: 13 chunks, the last 25 tokens cut
            (["a", "b", "a dog " * 500], [], False),  # 1000 tokens; "a" and "b" padded to its 13 chunks
            (["an empty room"], [], False),
        ]
        client = stages.TextEncoderClient(running.address)
        encoded = concurrently([lambda r=r: client.encode(*r, timeout=30) for r in requests])
        assert metrics.batches == [(8, 8)]
        worst = 0.0
        for (prompts, negatives, unconditional), got in zip(requests, encoded):
            negatives = negatives or ([""] * len(prompts) if unconditional else [])
            hidden, removed, _ = tiny.encoder.encode(prompts + negatives)  # alone
            hidden = np.asarray(hidden)
            expected = hidden if not unconditional else hidden[: len(prompts)]
            worst = max(worst, float(np.abs(got.cond - expected).max() / np.abs(expected).max()))
            if unconditional:
                worst = max(worst, float(np.abs(got.uncond - hidden[len(prompts) :]).max() / np.abs(hidden).max()))
            else:
                assert got.uncond is None
            notes = [
                stages.Truncation(i % len(prompts), text, i >= len(prompts)) for i, text in enumerate(removed) if text
            ]
            assert got.truncations == notes  # each request keeps its own truncation notes
        assert [t.prompt_index for t in encoded[2].truncations] == [2] and encoded[1].truncations[0].prompt_index == 0
        print(f"encoder: batched vs alone, max difference {worst:.2e} of the largest value")
        assert worst <= 1e-5
    finally:
        running.stop(grace=0)
        service.close()


class HeldDecoder:
    """Looks like a DecoderStage; the first decode blocks until released; records each call's batch."""

    scale_factor = 2
    vae = types.SimpleNamespace(config=types.SimpleNamespace(latent_channels=4, scaling_factor=0.18215))
    options = types.SimpleNamespace(weights_dtype="float32", activations_dtype="float32")
    mesh = None

    def __init__(self):
        self.entered, self.release, self.batches = threading.Semaphore(0), threading.Event(), []

    def decode(self, latents):
        self.batches.append(np.asarray(latents[:, 0, 0, 0]))
        self.entered.release()
        assert self.release.wait(10)
        return np.zeros((latents.shape[0], 2 * latents.shape[1], 2 * latents.shape[2], 3), np.uint8), 0.0


def _decode_request(marker: float) -> decoder_pb2.DecodeRequest:
    return decoder_pb2.DecodeRequest(latents=to_proto(np.full((1, 4, 8, 8), marker, np.float32)))


def test_over_grpc_a_burst_past_the_bound_gets_resource_exhausted_for_the_excess_only_and_a_cancelled_call_leaves():
    stage = HeldDecoder()
    service = decoder_service.DecoderService(stage, "held", max_batch=4, max_queue=3)
    running = server.StageServer(decoder_service.stage_service(service, [(1, SIZE, SIZE)]), max_queue=3).start()
    stub = decoder_pb2_grpc.DecoderStub(stages.connect(running.address))
    try:
        first = stub.Decode.future(_decode_request(0), timeout=20)
        assert stage.entered.acquire(timeout=5)  # on the "device": the next ones wait
        leaving = stub.Decode.future(_decode_request(99), timeout=20)
        _wait_until(lambda: service.batcher.depth == 1)
        leaving.cancel()
        _wait_until(lambda: service.batcher.depth == 0)  # its place is free again
        burst = [stub.Decode.future(_decode_request(i), timeout=20) for i in range(1, 7)]
        _wait_until(lambda: sum(f.done() for f in burst) == 3)  # 3 may wait: the rest are refused at once
        refused = [f for f in burst if f.done()]
        assert all(f.exception().code() == grpc.StatusCode.RESOURCE_EXHAUSTED for f in refused)
        assert "--max-queue 3" in refused[0].exception().details()
        stage.release.set()
        served = [f for f in burst if f not in refused]
        assert all(f.result().images.shape == [1, SIZE, SIZE, 3] for f in [first, *served])
        # one call for the first, then one for the three that waited (padded to 4 rows); the cancelled one never ran
        markers = {float(burst.index(f) + 1) for f in served}
        assert len(stage.batches) == 2 and len(stage.batches[1]) == 4 and set(stage.batches[1].tolist()) == markers
    finally:
        stage.release.set()
        running.stop(grace=0)
        service.close()


def _wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_second_stage_server_on_a_port_in_use_fails_instead_of_sharing_it():
    stage = HeldDecoder()
    service = decoder_service.DecoderService(stage, "held", max_batch=1, max_queue=1)
    first = server.StageServer(decoder_service.stage_service(service, [(1, SIZE, SIZE)])).start()
    try:
        with pytest.raises((OSError, RuntimeError), match=r"127\.0\.0\.1"):
            server.StageServer(decoder_service.stage_service(service, [(1, SIZE, SIZE)]), port=first.port)
    finally:
        first.stop(None)
        service.close()
