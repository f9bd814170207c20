"""Step-level continuous batching in the denoiser: requests join and leave a running batch between chunks.

Each request's latents equal the same request run alone, whatever it shared the batch with;
requests with different step counts, guidance and samplers really share it (the service's own
counters say so); a cancelled request leaves and the others finish unchanged; the waiting
queue is bounded; priority decides who joins first. In-process servers on loopback, tiny checkpoint.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
from conftest import assert_rel_close, wait_until

from sdmesh.client import stages
from sdmesh.services.engine.stages import DenoiserStage, TextEncoderStage
from sdmesh.services.serving import denoiser_service, server

SIZE = 16  # tiny checkpoint: latents 8×8


@pytest.fixture(scope="module")
def stages_loaded(tiny_checkpoints):
    folder = tiny_checkpoints["sd2"]
    encoder, denoiser = TextEncoderStage.load(folder), DenoiserStage.load(folder)
    hidden, _, _ = encoder.encode(["a red cube", "a blue ball", "a green tree", ""])
    return folder, denoiser, np.asarray(hidden)


class Slowed:
    """The real stage, each chunk slowed by `delay` so concurrent calls arrive while a batch runs; `fault(inputs)`
    may return an exception the chunk raises instead of running (an injected device failure)."""

    def __init__(self, stage, delay: float, fault=None):
        self.stage, self.delay, self.fault = stage, delay, fault or (lambda inputs: None)

    def __getattr__(self, name):
        return getattr(self.stage, name)

    def new_batch(self, buckets):
        batch = self.stage.new_batch(buckets)
        run = batch._run

        def slowed(with_uncond, controls, inputs, *args):
            time.sleep(self.delay)
            error = self.fault(inputs)
            if error is not None:
                raise error
            return run(with_uncond, controls, inputs, *args)

        batch._run = slowed
        return batch


def start(stages_loaded, *, max_batch=4, max_queue=8, chunk=1, delay=0.0, fault=None):
    folder, stage, _ = stages_loaded
    facts = denoiser_service.denoiser_facts(stage, folder)
    service = denoiser_service.DenoiserService(
        Slowed(stage, delay, fault), facts, "tiny", chunk=chunk, max_batch=max_batch, max_queue=max_queue
    )
    running = server.StageServer(
        denoiser_service.stage_service(service, [(1, SIZE, SIZE)]), max_queue=max_queue
    ).start()
    return service, running, stages.DenoiserClient(running.address)


# a mix: different step counts, guidance (one without), rescale, η and samplers
REQUESTS = [
    dict(prompt=0, seed=1, steps=6, guidance_scale=7.5),
    dict(prompt=1, seed=2, steps=3, guidance_scale=3.0, guidance_rescale=0.5, sampler="dpm++2m"),
    dict(prompt=2, seed=3, steps=9, guidance_scale=1.0),  # no unconditional half
    dict(prompt=0, seed=4, steps=5, guidance_scale=5.0, eta=0.8),
    dict(prompt=1, seed=5, steps=4, guidance_scale=6.0, sampler="euler-ancestral"),
    dict(prompt=2, seed=6, steps=7, guidance_scale=4.0, sampler="plms"),
]


def send(client, hidden, r, **extra):
    cond = hidden[r["prompt"]][None]
    uncond = hidden[3][None] if r["guidance_scale"] > 1 else None
    options = {k: v for k, v in r.items() if k != "prompt"}
    return client.denoise(cond, uncond, height=SIZE, width=SIZE, **options, **extra)


def test_batched_requests_equal_each_request_alone_and_really_share_the_batch(stages_loaded):
    _, _, hidden = stages_loaded
    service, running, client = start(stages_loaded, max_batch=4, delay=0.05)
    try:
        alone = [send(client, hidden, r).result() for r in REQUESTS]
        assert service.batcher.stats["peak_requests"] == 1  # one at a time so far
        with futures.ThreadPoolExecutor(len(REQUESTS)) as pool:
            together = list(pool.map(lambda r: send(client, hidden, r).result(), REQUESTS))
        for a, t in zip(alone, together):
            assert_rel_close(t, a, 1e-5)
        info = client.model_info()
        # requests of different step counts, guidance and samplers ran in the same chunks, up to max_batch at once
        load = info.denoiser_load
        assert load.peak_requests >= 3 and load.shared_chunks > 0 and load.peak_slots <= 4
        assert load.running_slots == 0 and load.waiting_requests == 0
    finally:
        running.stop(grace=0)


def test_a_cancelled_request_leaves_and_the_others_finish_unchanged(stages_loaded):
    _, _, hidden = stages_loaded
    service, running, client = start(stages_loaded, max_batch=4, delay=0.05)
    try:
        long = dict(prompt=0, seed=9, steps=40, guidance_scale=7.5)
        expected = [send(client, hidden, r).result() for r in REQUESTS[:2]]
        doomed = send(client, hidden, long)
        progress = iter(doomed)
        next(progress)  # it is running
        with futures.ThreadPoolExecutor(2) as pool:
            pending = [pool.submit(lambda r=r: send(client, hidden, r).result()) for r in REQUESTS[:2]]
            time.sleep(0.2)
            doomed.cancel()
            results = [p.result(timeout=60) for p in pending]
        for got, want in zip(results, expected):
            assert_rel_close(got, want, 1e-5)
        deadline = time.monotonic() + 5
        while service.batcher.running_slots and time.monotonic() < deadline:
            time.sleep(0.01)
        assert service.batcher.running_slots == 0, "the cancelled request kept its slot"
    finally:
        running.stop(grace=0)


def test_a_burst_past_the_queue_gets_resource_exhausted_for_the_excess_only(stages_loaded):
    _, _, hidden = stages_loaded
    # one slot, two waiting: of eight calls sent at once, some run or wait and the rest are refused at once
    _service, running, client = start(stages_loaded, max_batch=1, max_queue=2, delay=0.1)
    try:
        request = dict(prompt=0, seed=1, steps=3, guidance_scale=7.5)
        expected = send(client, hidden, request).result()

        def call(_):
            try:
                return send(client, hidden, request).result()
            except grpc.RpcError as e:
                return e.code()

        with futures.ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(call, range(8)))
        served = [o for o in outcomes if isinstance(o, np.ndarray)]
        refused = [o for o in outcomes if not isinstance(o, np.ndarray)]
        assert refused and all(code == grpc.StatusCode.RESOURCE_EXHAUSTED for code in refused)
        assert 3 <= len(served) < 8  # the running one and the waiting ones all finish
        for got in served:
            np.testing.assert_array_equal(got, expected)
    finally:
        running.stop(grace=0)


def test_higher_priority_joins_first(stages_loaded):
    _, _, hidden = stages_loaded
    _service, running, client = start(stages_loaded, max_batch=1, max_queue=8, delay=0.05)
    try:
        finished = []
        first = send(client, hidden, dict(prompt=0, seed=1, steps=6, guidance_scale=7.5))
        progress = iter(first)
        next(progress)  # the device is busy with `first`; the next three wait

        def run(name, priority):
            send(client, hidden, dict(prompt=1, seed=2, steps=2, guidance_scale=7.5), priority=priority).result()
            finished.append(name)

        threads = []
        for name, priority in (("low", 0), ("also-low", 0), ("high", 5)):
            threads.append(threading.Thread(target=run, args=(name, priority)))
            threads[-1].start()
            time.sleep(0.05)  # arrival order: low, also-low, high
        list(progress)
        for t in threads:
            t.join(60)
        assert finished == ["high", "low", "also-low"]
    finally:
        running.stop(grace=0)


def test_guidance_scale_one_runs_without_the_unconditional_half(stages_loaded):
    _, _, hidden = stages_loaded
    _service, running, client = start(stages_loaded, max_batch=2)
    try:
        send(client, hidden, dict(prompt=0, seed=1, steps=2, guidance_scale=1.0)).result()
        programs = {(s.program, s.batch) for s in client.model_info().compiled_shapes}
        assert ("denoise-unguided", 1) in programs
    finally:
        running.stop(grace=0)


def test_an_unknown_sampler_is_invalid_argument_naming_the_valid_ones(stages_loaded):
    _, _, hidden = stages_loaded
    _service, running, client = start(stages_loaded)
    try:
        with pytest.raises(grpc.RpcError) as caught:
            send(client, hidden, dict(prompt=0, seed=1, steps=2, guidance_scale=7.5, sampler="heun")).result()
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "dpm++2m" in caught.value.details()
    finally:
        running.stop(grace=0)


def test_strict_shapes_refuse_an_unconfigured_size_naming_the_served_ones(stages_loaded):
    folder, stage, hidden = stages_loaded
    facts = denoiser_service.denoiser_facts(stage, folder)
    service = denoiser_service.DenoiserService(stage, facts, "tiny", sizes={(SIZE, SIZE)})
    running = server.StageServer(denoiser_service.stage_service(service, [(1, SIZE, SIZE)])).start()
    try:
        client = stages.DenoiserClient(running.address)
        with pytest.raises(grpc.RpcError) as caught:
            client.denoise(hidden[:1], seed=1, steps=1, guidance_scale=1.0, height=24, width=24).result()
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "16x16" in caught.value.details()
        assert client.denoise(
            hidden[:1], seed=1, steps=1, guidance_scale=1.0, height=SIZE, width=SIZE
        ).result().shape == (1, 4, 8, 8)
    finally:
        running.stop(grace=0)


# --- fairness between tenants, failures, draining ---------------------------------------


def test_a_tenants_single_request_is_not_starved_by_anothers_burst_and_preemption_changes_no_result(stages_loaded):
    _, _, hidden = stages_loaded
    service, running, client = start(stages_loaded, max_batch=2, max_queue=16, delay=0.05)
    try:
        burst = [dict(prompt=i % 3, seed=10 + i, steps=12, guidance_scale=7.5, sampler="dpm++2m") for i in range(6)]
        single = dict(prompt=1, seed=99, steps=4, guidance_scale=5.0)
        with futures.ThreadPoolExecutor(2) as pool:  # batches of 1 and 2 compiled before anything is timed
            list(pool.map(lambda r: send(client, hidden, r).result(), burst[:2]))
        expected = [send(client, hidden, r).result() for r in burst]
        t0 = time.perf_counter()
        expected.append(send(client, hidden, single).result())
        solo = time.perf_counter() - t0
        finished, took = [], {}

        def run(r, tenant):
            t0 = time.perf_counter()
            result = send(client, hidden, r, tenant=tenant).result()
            finished.append(tenant)
            took[tenant] = time.perf_counter() - t0
            return result

        with futures.ThreadPoolExecutor(len(burst) + 1) as pool:
            pending = [pool.submit(run, r, "burst") for r in burst]
            assert wait_until(lambda: service.batcher.running_slots == 2)  # the burst holds every slot
            mine = pool.submit(run, single, "single")
            results = [p.result(timeout=120) for p in (*pending, mine)]
        assert finished.index("single") < 3, f"the single request finished after the burst: {finished}"
        assert took["single"] < 2 * solo, f"the single request took {took['single']:.2f}s, alone {solo:.2f}s"
        assert service.batcher.stats["preempted"] >= 1
        for got, want in zip(results, expected):  # suspended and resumed requests equal themselves run alone
            assert_rel_close(got, want, 1e-5)
    finally:
        running.stop(grace=0)


def test_a_full_queue_pushes_out_the_busiest_tenants_newest_request_not_another_tenants(stages_loaded):
    _, _, hidden = stages_loaded
    _service, running, client = start(stages_loaded, max_batch=1, max_queue=3, delay=0.05)
    try:
        request = dict(prompt=0, seed=1, steps=2, guidance_scale=7.5)
        first = send(client, hidden, dict(request, steps=30), tenant="a")
        progress = iter(first)
        next(progress)  # running; now a fills the queue
        waiting = [send(client, hidden, request, tenant="a") for _ in range(3)]
        assert wait_until(lambda: _service.batcher.waiting_requests == 3)
        other = send(client, hidden, request, tenant="b")
        list(progress)
        assert other.result() is not None  # b got in
        outcomes = []
        for stream in waiting:
            try:
                stream.result()
                outcomes.append("ok")
            except grpc.RpcError as e:
                outcomes.append(e.code())
        assert outcomes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 1 and outcomes.count("ok") == 2
    finally:
        running.stop(grace=0)


OOM = RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.0GiB")


def test_a_device_oom_retries_smaller_batches_before_failing_anyone(stages_loaded):
    _, _, hidden = stages_loaded
    # the device "holds" at most 2 rows: a batch of 4 fails, and the batcher must fall back to 2
    service, running, client = start(
        stages_loaded, max_batch=4, delay=0.05, fault=lambda inputs: OOM if inputs.cond.shape[0] > 2 else None
    )
    try:
        requests = REQUESTS[:4]
        expected = [send(client, hidden, r).result() for r in requests]
        with futures.ThreadPoolExecutor(len(requests)) as pool:
            together = list(pool.map(lambda r: send(client, hidden, r).result(), requests))
        for got, want in zip(together, expected):
            assert_rel_close(got, want, 1e-5)
        assert service.batcher.stats["preempted"] >= 1
    finally:
        running.stop(grace=0)


def test_an_oom_alone_is_resource_exhausted_and_the_stage_keeps_serving(stages_loaded):
    _, _, hidden = stages_loaded
    _service, running, client = start(
        stages_loaded, max_batch=4, fault=lambda inputs: OOM if inputs.cond.shape[0] > 2 else None
    )
    try:
        with pytest.raises(grpc.RpcError) as caught:
            client.denoise(np.repeat(hidden[:1], 3, 0), seed=1, steps=2, guidance_scale=1.0).result()
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "ran out of memory" in caught.value.details() and "fewer images" in caught.value.details()
        assert client.denoise(hidden[:1], seed=1, steps=2, guidance_scale=1.0).result() is not None
    finally:
        running.stop(grace=0)


def test_a_failing_chunk_fails_only_its_own_batch(stages_loaded):
    _, _, hidden = stages_loaded
    broken = RuntimeError("injected failure")
    # one image size fails; a request of the other size running at the same time is untouched
    _service, running, client = start(
        stages_loaded, max_batch=4, delay=0.05, fault=lambda inputs: broken if inputs.cond.shape[0] == 2 else None
    )
    try:
        healthy = dict(prompt=0, seed=1, steps=8, guidance_scale=7.5)
        expected = send(client, hidden, healthy).result()
        good = send(client, hidden, healthy)
        progress = iter(good)
        next(progress)
        with pytest.raises(grpc.RpcError) as caught:  # two images of another request: the batch of 2 fails
            two = np.repeat(hidden[1:2], 2, 0)
            client.denoise(two, seed=2, steps=2, guidance_scale=1.0, height=24, width=24).result()
        assert caught.value.code() == grpc.StatusCode.INTERNAL
        list(progress)
        assert_rel_close(good.result(), expected, 1e-5)
    finally:
        running.stop(grace=0)


def test_drain_refuses_new_work_finishes_running_requests_and_ends_the_rest_unavailable(stages_loaded):
    _, _, hidden = stages_loaded
    service, running, client = start(stages_loaded, max_batch=1, delay=0.05)
    try:
        short = send(client, hidden, dict(prompt=0, seed=1, steps=20, guidance_scale=7.5))
        progress = iter(short)
        next(progress)
        waiting = send(client, hidden, dict(prompt=1, seed=2, steps=4, guidance_scale=7.5))
        assert wait_until(lambda: service.batcher.waiting_requests == 1)
        drained = futures.ThreadPoolExecutor(1).submit(service.batcher.drain, 30.0)
        with pytest.raises(grpc.RpcError) as caught:
            waiting.result()  # not started: sent away at once, to be retried elsewhere
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        list(progress)
        assert short.result() is not None  # running: finished
        with pytest.raises(grpc.RpcError) as caught:
            send(client, hidden, dict(prompt=1, seed=2, steps=2, guidance_scale=7.5)).result()
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in caught.value.details()
        assert drained.result(timeout=30) == 1
    finally:
        running.stop(grace=0)


def test_drain_past_its_deadline_ends_running_requests_unavailable(stages_loaded):
    _, _, hidden = stages_loaded
    service, running, client = start(stages_loaded, max_batch=1, delay=0.05)
    try:
        long = send(client, hidden, dict(prompt=0, seed=1, steps=200, guidance_scale=7.5))
        progress = iter(long)
        next(progress)
        assert service.batcher.drain(0.3) == 1
        with pytest.raises(grpc.RpcError) as caught:
            list(progress)
            long.result()
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        running.stop(grace=0)


def test_a_new_image_size_compiles_off_the_device_thread_without_stalling_running_requests(stages_loaded):
    _, _, hidden = stages_loaded
    _service, running, client = start(stages_loaded, max_batch=4, delay=0.02)
    try:
        request = dict(prompt=0, seed=1, steps=30, guidance_scale=7.5)
        expected = send(client, hidden, request).result()  # compiled now: batch 1 at the native size
        finished = {}

        def run(name, call):
            call()
            finished[name] = time.perf_counter()

        t0 = time.perf_counter()
        with futures.ThreadPoolExecutor(2) as pool:
            small = pool.submit(
                run, "small", lambda: finished.setdefault("result", send(client, hidden, request).result())
            )
            time.sleep(0.1)
            big = pool.submit(  # 40×40: never compiled, and a guided batch of 1 there compiles for seconds
                run, "big", lambda: client.denoise(hidden[1:2], hidden[3:4], seed=2, steps=2, guidance_scale=7.5,
                                                   height=40, width=40).result()
            )  # fmt: skip
            small.result(timeout=120)
            big.result(timeout=300)
        assert_rel_close(finished["result"], expected, 1e-5)
        small_s, big_s = finished["small"] - t0, finished["big"] - t0
        # Inline, the small request would wait out the whole compile (~10 s here, small ≈ big). Off the device
        # thread it runs on; on a 2-core CPU the compile still takes cores from it, on an accelerator it would not.
        assert small_s < big_s / 2, f"the small request ({small_s:.1f}s) waited for the compile ({big_s:.1f}s)"
    finally:
        running.stop(grace=0)
