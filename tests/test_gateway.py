"""The gateway against small fake stage servers (numpy, no model): chaining, validation, balancing,
health, retries, deadlines, cancellation and its in-flight bound.

The fakes compute outputs from their inputs so a test can tell which request, and which
replica, produced what. End-to-end tests with the real stages are in test_stack.py.
"""

from __future__ import annotations

import dataclasses
import io
import subprocess
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
from conftest import wait_until
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from PIL import Image

from sdmesh.client import AsyncClient, Client, GatewayError, GenerateResult, Progress
from sdmesh.services.inputs import contract
from sdmesh.services.inputs.contract import ModelFacts
from sdmesh.services.inputs.errors import InvalidRequest
from sdmesh.services.serving import gateway, wire
from sdmesh.services.serving.server import NO_SHARED_PORT
from sdmesh.v1 import (
    common_pb2,
    decoder_pb2,
    decoder_pb2_grpc,
    denoiser_pb2,
    denoiser_pb2_grpc,
    gateway_pb2,
    text_encoder_pb2,
    text_encoder_pb2_grpc,
)
from sdmesh.v1.tensors import from_proto, to_proto

SCALE = 8  # the fake VAE's factor
SAMPLE = 4  # the fake UNet's sample_size: native images are 32×32
L, D, C = 3, 4, 4  # tokens, hidden size, latent channels


def prompt_row(text: str) -> np.ndarray:
    """A fake encoding: (L, D) filled with a number derived from the text."""
    return np.full((L, D), sum(map(ord, text)) % 997, np.float32)


class FakeEncoder(text_encoder_pb2_grpc.TextEncoderServicer):
    def __init__(self):
        self.requests: list[text_encoder_pb2.EncodeRequest] = []

    def Encode(self, request, context):
        self.requests.append(request)
        response = text_encoder_pb2.EncodeResponse(cond=to_proto(np.stack([prompt_row(p) for p in request.prompts])))
        if request.unconditional:
            response.uncond.CopyFrom(to_proto(np.stack([prompt_row(p) for p in request.negative_prompts])))
        for i, p in enumerate(request.prompts):
            if len(p) > 20:
                response.truncated.add(prompt_index=i, removed_text=p[20:])
        return response

    def ModelInfo(self, request, context):
        return common_pb2.ModelInfo(service="TextEncoder", model="fake")


class FakeDenoiser(denoiser_pb2_grpc.DenoiserServicer):
    """Latents = seed + cond; one progress event per step, `step_seconds` apart."""

    def __init__(self, name: str = "denoiser", step_seconds: float = 0.0, fail: grpc.StatusCode | None = None):
        self.name, self.step_seconds, self.fail = name, step_seconds, fail
        self.requests: list[denoiser_pb2.DenoiseRequest] = []
        self.timeouts: list[float | None] = []
        self.cancelled = threading.Event()
        self.started = threading.Event()
        self.active = 0
        self.peak = 0
        self._lock = threading.Lock()

    def Denoise(self, request, context):
        self.requests.append(request)
        self.timeouts.append(context.time_remaining())
        self.started.set()
        if self.fail is not None:
            context.abort(self.fail, f"{self.name} says {self.fail.name}")
        with self._lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        try:
            cond = from_proto(request.cond)
            n, h, w = cond.shape[0], request.height // SCALE, request.width // SCALE
            for step in range(1, request.num_inference_steps + 1):
                time.sleep(self.step_seconds)
                if not context.is_active():
                    self.cancelled.set()
                    return
                yield denoiser_pb2.DenoiseEvent(
                    progress=common_pb2.Progress(stage="denoise", step=step, total_steps=request.num_inference_steps)
                )
            latents = (
                np.full((n, C, h, w), request.seed % 1000, np.float32) + cond.mean(axis=(1, 2))[:, None, None, None]
            )
            yield denoiser_pb2.DenoiseEvent(latents=to_proto(latents))
        except GeneratorExit:  # gRPC drops a cancelled call's iterator where it yielded, without resuming it
            self.cancelled.set()
            raise
        finally:
            with self._lock:
                self.active -= 1

    def ModelInfo(self, request, context):
        return common_pb2.ModelInfo(service="Denoiser", model="fake", model_facts=wire.facts_to_proto(fake_facts()))


class FakeDecoder(decoder_pb2_grpc.DecoderServicer):
    """Image pixel = latent value mod 256, upsampled by SCALE; an image's latents are its red channel, subsampled."""

    def Decode(self, request, context):
        latents = from_proto(request.latents)
        pixels = (latents[:, 0] % 256).astype(np.uint8).repeat(SCALE, 1).repeat(SCALE, 2)
        return decoder_pb2.DecodeResponse(images=to_proto(np.stack([pixels] * 3, axis=-1)))

    def EncodeImage(self, request, context):
        pixels = from_proto(request.images).astype(np.float32)  # (N, H, W, 3)
        red = pixels[:, ::SCALE, ::SCALE, 0]
        return decoder_pb2.EncodeImageResponse(latents=to_proto(np.repeat(red[:, None], C, axis=1)))

    def ModelInfo(self, request, context):
        return common_pb2.ModelInfo(service="Decoder", model="fake")


def fake_facts(**changes) -> ModelFacts:
    """The fake model's facts, as a denoiser reports them."""
    facts = ModelFacts(
        kind="text-to-image",
        vae_scale_factor=SCALE,
        latent_channels=C,
        default_size=(SAMPLE * SCALE, SAMPLE * SCALE),
        max_steps=1000,
        samplers=("ddim", "euler"),
        default_sampler="ddim",
        hidden_size=D,
        max_length=L,
        prediction_type="epsilon",
        extra_channels=0,
        class_labels_shape=None,
        max_noise_level=0,
    )
    return dataclasses.replace(facts, **changes)


def expected_pixel(seed: int, prompt: str) -> int:
    return int((seed % 1000 + prompt_row(prompt)[0, 0]) % 256)


class FakeServer:
    """One fake stage on a loopback port, with grpc.health.v1."""

    def __init__(self, servicer, add, status=health_pb2.HealthCheckResponse.SERVING):
        self.servicer = servicer
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=[NO_SHARED_PORT])
        add(servicer, self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.health.set("", status)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{self.port}"
        self.server.start()

    def stop(self):
        self.server.stop(None).wait()


class Stack:
    """Fake stages behind a real gateway, in this process."""

    def __init__(self, denoisers: list[FakeDenoiser | FakeServer | str], *, max_inflight: int = 16, **options):
        self.servers: list[FakeServer] = []
        self.encoder = self._serve(FakeEncoder(), text_encoder_pb2_grpc.add_TextEncoderServicer_to_server)
        self.decoder = self._serve(FakeDecoder(), decoder_pb2_grpc.add_DecoderServicer_to_server)
        addresses = []
        for d in denoisers:
            if isinstance(d, FakeDenoiser):
                d = self._serve(d, denoiser_pb2_grpc.add_DenoiserServicer_to_server)
            elif isinstance(d, FakeServer):
                self.servers.append(d)
            addresses.append(d if isinstance(d, str) else d.address)
        self.pools = [
            gateway.ReplicaPool("encoder", [self.encoder.address]),
            gateway.ReplicaPool("denoiser", addresses),
            gateway.ReplicaPool("decoder", [self.decoder.address]),
        ]
        self.service = gateway.GatewayService(*self.pools, max_inflight=max_inflight, **options)
        self.server, port = gateway.build_server(self.service, "127.0.0.1:0")
        self.server.start()
        self.address = f"127.0.0.1:{port}"
        self.client = Client(self.address)

    def _serve(self, servicer, add) -> FakeServer:
        server = FakeServer(servicer, add)
        self.servers.append(server)
        return server

    def close(self):
        self.client.close()
        self.server.stop(None).wait()
        for pool in self.pools:
            pool.close()
        for s in self.servers:
            s.stop()


_HELD: list = []  # bound, never listening: no other server in the session can take these ports


def free_address() -> str:
    """A loopback address where nothing listens (connections are refused) for the rest of the session."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    _HELD.append(s)
    return f"127.0.0.1:{s.getsockname()[1]}"


# --- chaining -----------------------------------------------------------------------


def test_generate_chains_the_stages_and_returns_pngs(make_stack):
    stack = make_stack()
    events = list(stack.client.stream("a cat", seed=7, steps=3, num_images=2))
    progress, result = events[:-1], events[-1]
    assert [(p.stage, p.step, p.total_steps) for p in progress] == [
        ("encode", 1, 1),
        ("denoise", 1, 3),
        ("denoise", 2, 3),
        ("denoise", 3, 3),
        ("decode", 1, 1),
    ]
    assert isinstance(result, GenerateResult) and result.seed == 7 and len(result.images) == 2
    for image in result.images:
        assert image.format == "PNG" and image.size == (SAMPLE * SCALE, SAMPLE * SCALE)
        assert np.all(np.asarray(image) == expected_pixel(7, "a cat"))


def test_requests_are_chained_as_the_pipeline_chains_them(make_stack):
    stack = make_stack()
    stack.client.generate(
        "a cat",
        negative_prompt="blurry",
        num_images=3,
        steps=2,
        guidance_scale=5.0,
        seed=11,
        guidance_rescale=0.3,
        eta=0.5,
        height=16,
        width=24,
    )
    encode = stack.encoder.servicer.requests[-1]
    assert list(encode.prompts) == ["a cat"] and list(encode.negative_prompts) == ["blurry"] and encode.unconditional
    denoise = stack.servers[2].servicer.requests[-1]
    cond, uncond = from_proto(denoise.cond), from_proto(denoise.uncond)
    assert cond.shape == uncond.shape == (3, L, D)  # each prompt row repeated num_images times
    np.testing.assert_array_equal(cond, np.stack([prompt_row("a cat")] * 3))
    np.testing.assert_array_equal(uncond, np.stack([prompt_row("blurry")] * 3))
    assert denoise.WhichOneof("init") == "seed" and denoise.seed == denoise.noise_seed == 11
    assert (denoise.num_inference_steps, denoise.height, denoise.width) == (2, 16, 24)
    assert denoise.guidance_scale == 5.0 and denoise.guidance_rescale == pytest.approx(0.3) and denoise.eta == 0.5


def test_unguided_requests_skip_the_negative_prompt(make_stack):
    stack = make_stack()
    stack.client.generate("a cat", negative_prompt="blurry", steps=1, guidance_scale=1.0, seed=0)
    encode = stack.encoder.servicer.requests[-1]
    assert not encode.unconditional and list(encode.negative_prompts) == []
    assert not stack.servers[2].servicer.requests[-1].HasField("uncond")


def test_defaults_fill_unset_fields(make_stack):
    stack = make_stack()
    list(stack.client.stub.Generate(gateway_pb2.GenerateRequest(prompt="a cat", seed=1), timeout=10))
    denoise = stack.servers[2].servicer.requests[-1]
    assert denoise.num_inference_steps == 50 and denoise.guidance_scale == 7.5
    assert (denoise.height, denoise.width) == (SAMPLE * SCALE, SAMPLE * SCALE)  # native size from the stages' ModelInfo
    assert from_proto(denoise.cond).shape[0] == 1  # num_images 0 → 1


def test_a_missing_seed_is_drawn_and_returned(make_stack):
    stack = make_stack()
    a, b = (stack.client.generate("a cat", steps=1) for _ in range(2))
    assert a.seed != b.seed
    assert stack.servers[2].servicer.requests[-1].seed == b.seed


def test_truncated_prompts_are_noted(make_stack):
    result = make_stack().client.generate("a very long prompt that the fake tokenizer cuts", steps=1, seed=0)
    assert len(result.truncation_notes) == 1 and "cuts" in result.truncation_notes[0]


def test_async_client(make_stack):
    import asyncio

    stack = make_stack()

    async def run():
        async with AsyncClient(stack.address) as client:
            events = [e async for e in client.stream("a cat", steps=2, seed=3)]
            result = await client.generate("a dog", steps=1, seed=4)
            info = await client.model_info()
            return events, result, info

    events, result, info = asyncio.run(run())
    assert isinstance(events[0], Progress) and isinstance(events[-1], GenerateResult)
    assert np.all(np.asarray(result.images[0]) == expected_pixel(4, "a dog"))
    assert info.service == "Gateway" and info.model_facts.default_height == SAMPLE * SCALE


def test_model_info_lists_replicas(make_stack):
    stack = make_stack([FakeDenoiser(), FakeDenoiser()])
    info = stack.client.model_info()
    assert list(info.gateway_stages.denoiser_replicas) == [r.address for r in stack.pools[1].replicas]
    assert (
        info.model_facts.vae_scale_factor == SCALE
        and wire.facts_from_proto(info.model_facts, source="") == fake_facts()
    )


# --- validation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number"),
        (dict(eta=float("inf")), "eta must be a finite number"),
        (dict(eta=-1.0), "eta must be a finite number from 0"),
        (dict(guidance_rescale=-0.5), "guidance_rescale must be a finite number from 0 to 1"),
        (dict(guidance_rescale=2.0), "guidance_rescale must be a finite number from 0 to 1"),
        (dict(height=12, width=32), "height must be a multiple of 8"),
        (dict(height=32, width=8192), "width must be a multiple of 8 between 8 and 4096"),
        (dict(num_inference_steps=100_000), "steps must be an integer from 1 to 1000"),
        (dict(num_images=65), "at most 64"),
        (dict(sampler="lms"), "sampler 'lms' is not one of ddim, euler"),
        (dict(negative_prompt="x" * 10_001), "at most 10000"),
        (dict(init_image=b"not an image"), "init_image"),
    ],
)
def test_malformed_requests_are_invalid_argument(make_stack, fields, message):
    stack = make_stack()
    with pytest.raises(grpc.RpcError) as e:
        list(stack.client.stub.Generate(gateway_pb2.GenerateRequest(prompt="a cat", **fields), timeout=10))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in e.value.details()
    assert stack.servers[2].servicer.requests == []  # refused before any stage ran


def test_a_stage_invalid_argument_passes_through(make_stack):
    stack = make_stack([FakeDenoiser(fail=grpc.StatusCode.INVALID_ARGUMENT)])
    with pytest.raises(GatewayError) as e:
        stack.client.generate("a cat", steps=1, seed=0)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "denoiser says INVALID_ARGUMENT" in e.value.message


# --- replicas -----------------------------------------------------------------------


def test_balancing_picks_the_least_loaded_replica():
    pool = gateway.ReplicaPool("denoiser", ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"], watch_health=False)
    a, b, c = (pool.acquire() for _ in range(3))
    assert {a, b, c} == set(pool.replicas)  # one each before any gets a second
    pool.release(b)
    assert pool.acquire() is b  # b has the fewest outstanding now
    pool.close()


def test_concurrent_requests_spread_over_replicas(make_stack):
    slow = [FakeDenoiser("a", step_seconds=0.1), FakeDenoiser("b", step_seconds=0.1)]
    stack = make_stack(slow)
    with futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda s: stack.client.generate("a cat", steps=4, seed=s), range(4)))
    assert [r.seed for r in results] == [0, 1, 2, 3]
    assert len(slow[0].requests) == len(slow[1].requests) == 2


def test_a_not_serving_replica_is_skipped(make_stack):
    sick = FakeServer(
        FakeDenoiser("sick"),
        denoiser_pb2_grpc.add_DenoiserServicer_to_server,
        status=health_pb2.HealthCheckResponse.NOT_SERVING,
    )
    well = FakeDenoiser("well")
    stack = make_stack([sick, well])
    assert wait_until(lambda: stack.pools[1].replicas[0].health == health_pb2.HealthCheckResponse.NOT_SERVING)
    for seed in range(3):
        stack.client.generate("a cat", steps=1, seed=seed)
    assert sick.servicer.requests == [] and len(well.requests) == 3
    sick.health.set("", health_pb2.HealthCheckResponse.SERVING)  # back: it gets work again
    assert wait_until(lambda: stack.pools[1].replicas[0].usable)


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED])
def test_a_refusing_replica_is_retried_on_another(make_stack, code):
    refusing = FakeDenoiser("refusing", fail=code)
    well = FakeDenoiser("well")
    stack = make_stack([refusing, well])
    results = [stack.client.generate("a cat", steps=1, seed=s) for s in range(2)]
    assert [r.seed for r in results] == [0, 1] and len(well.requests) == 2


class DiesMidway(FakeDenoiser):
    """Streams `steps` progress events, then fails UNAVAILABLE (a replica going away mid-request)."""

    def __init__(self, steps: int):
        super().__init__("dies-midway")
        self.steps = steps

    def Denoise(self, request, context):
        self.requests.append(request)
        for step in range(1, self.steps + 1):
            yield denoiser_pb2.DenoiseEvent(
                progress=common_pb2.Progress(stage="denoise", step=step, total_steps=request.num_inference_steps)
            )
        context.abort(grpc.StatusCode.UNAVAILABLE, "shutting down")


def test_a_retried_denoise_resumes_the_progress_count_where_the_client_saw_it(make_stack):
    dying, well = DiesMidway(steps=3), FakeDenoiser("well")
    stack = make_stack([dying, well])
    steps = [e.step for e in stack.client.stream("a cat", steps=5, seed=1) if getattr(e, "stage", "") == "denoise"]
    assert len(dying.requests) == 1 and len(well.requests) == 1
    assert steps == [1, 2, 3, 4, 5]  # never back to 1 on the second replica


def test_the_denoise_stream_is_read_to_its_end(make_stack):
    denoiser = FakeDenoiser()
    ended = []
    original = denoiser.Denoise

    def watched(request, context):
        yield from original(request, context)
        ended.append(context.is_active())  # the gateway still listening: the call ends OK, not cancelled

    denoiser.Denoise = watched
    stack = make_stack([denoiser])
    stack.client.generate("a cat", steps=2, seed=1)
    assert wait_until(lambda: ended) and ended == [True]


def test_every_replica_refusing_passes_the_status_on(make_stack):
    stack = make_stack(
        [
            FakeDenoiser("a", fail=grpc.StatusCode.RESOURCE_EXHAUSTED),
            FakeDenoiser("b", fail=grpc.StatusCode.RESOURCE_EXHAUSTED),
        ]
    )
    with pytest.raises(GatewayError) as e:
        stack.client.generate("a cat", steps=1, seed=0, timeout=10)
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "b says RESOURCE_EXHAUSTED" in e.value.message


def test_a_replica_that_is_down_is_skipped(make_stack):
    well = FakeDenoiser("well")
    stack = make_stack([free_address(), well])
    result = stack.client.generate("a cat", steps=1, seed=5)
    assert np.all(np.asarray(result.images[0]) == expected_pixel(5, "a cat")) and len(well.requests) == 1


def test_every_replica_down_is_unavailable(make_stack):
    stack = make_stack([free_address(), free_address()])
    with pytest.raises(GatewayError) as e:
        stack.client.generate("a cat", steps=1, seed=0, timeout=10)
    assert e.value.code == grpc.StatusCode.UNAVAILABLE and "every denoiser replica" in e.value.message


# --- deadlines, cancellation, load --------------------------------------------------


def test_the_deadline_is_propagated(make_stack):
    slow = FakeDenoiser(step_seconds=0.2)
    stack = make_stack([slow])
    t0 = time.monotonic()
    with pytest.raises(GatewayError) as e:
        stack.client.generate("a cat", steps=50, seed=0, timeout=1.0)
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - t0 < 2.0
    # the denoiser saw the client's deadline (gRPC rounds deadlines on the wire: a few ms either way)
    assert slow.timeouts[-1] is not None and slow.timeouts[-1] <= 1.05
    assert slow.cancelled.wait(1.0)  # and stopped


def test_a_client_cancel_cancels_the_denoiser(make_stack):
    slow = FakeDenoiser(step_seconds=0.05)
    stack = make_stack([slow])
    stream = stack.client.stream("a cat", steps=200, seed=0)
    for event in stream:
        if event.stage == "denoise":
            break
    stream.close()  # the client goes away mid-denoise
    assert slow.cancelled.wait(2.0)


def test_past_max_inflight_is_resource_exhausted(make_stack):
    slow = FakeDenoiser(step_seconds=0.05)
    stack = make_stack([slow], max_inflight=1)
    first = futures.ThreadPoolExecutor(1).submit(stack.client.generate, "a cat", steps=20, seed=0)
    assert slow.started.wait(5.0)
    with pytest.raises(GatewayError) as e:
        stack.client.generate("a dog", steps=1, seed=1)
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-inflight" in e.value.message
    assert first.result(timeout=10).seed == 0
    assert stack.client.generate("a dog", steps=1, seed=1).seed == 1  # and the slot is free again


def test_requests_overlap_in_the_stages(make_stack):
    slow = FakeDenoiser(step_seconds=0.05)
    stack = make_stack([slow])
    with futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda s: stack.client.generate("a cat", steps=4, seed=s), range(4)))
    assert slow.peak > 1  # the gateway had several requests in flight at once


def test_pngs_decode_to_the_decoder_pixels():
    images = np.random.default_rng(0).integers(0, 256, (2, 8, 16, 3), dtype=np.uint8)
    decoded = [np.asarray(Image.open(io.BytesIO(png))) for png in gateway.png_bytes(images)]
    np.testing.assert_array_equal(np.stack(decoded), images)


def test_a_dns_address_stands_for_every_server_behind_the_name(make_stack):
    # docker compose's `--scale denoiser=N`: one name, N records; gRPC balances over them round robin
    replica = FakeServer(FakeDenoiser(), denoiser_pb2_grpc.add_DenoiserServicer_to_server)
    stack = make_stack([f"dns:///localhost:{replica.port}"])
    stack.servers.append(replica)
    assert stack.client.generate("a cat", steps=1, seed=4, timeout=10).seed == 4
    assert len(replica.servicer.requests) == 1


def test_no_serving_replica_is_unavailable_at_once(make_stack):
    sick = FakeServer(
        FakeDenoiser("sick"),
        denoiser_pb2_grpc.add_DenoiserServicer_to_server,
        status=health_pb2.HealthCheckResponse.NOT_SERVING,
    )
    stack = make_stack([sick])
    assert wait_until(lambda: stack.pools[1].replicas[0].health == health_pb2.HealthCheckResponse.NOT_SERVING)
    with pytest.raises(GatewayError) as e:
        stack.client.generate("a cat", steps=1, seed=0, timeout=10)
    assert e.value.code == grpc.StatusCode.UNAVAILABLE and "no denoiser replica is SERVING" in e.value.message
    assert sick.servicer.requests == []


@pytest.mark.processes
def test_tls_from_the_client_library_and_the_cli(make_stack, tmp_path, capsys):
    from sdmesh.client.cli import main

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )
    stack = make_stack()
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    server, port = gateway.build_server(stack.service, "localhost:0", credentials=credentials)
    server.start()
    try:
        with Client(f"localhost:{port}", credentials=grpc.ssl_channel_credentials(cert.read_bytes())) as client:
            assert client.generate("a cat", steps=1, seed=6, timeout=10).seed == 6
        assert (
            main(
                [
                    "generate",
                    "a cat",
                    "--server",
                    f"localhost:{port}",
                    "--tls-ca",
                    str(cert),
                    "--steps",
                    "1",
                    "--seed",
                    "6",
                    "--output-dir",
                    str(tmp_path / "out"),
                    "--timeout",
                    "10",
                ]
            )
            == 0
        )
        assert capsys.readouterr().out.split() == [str(tmp_path / "out" / "image_0.png")]
        with Client(f"localhost:{port}") as plaintext, pytest.raises(GatewayError) as e:  # TLS is required
            plaintext.generate("a cat", steps=1, seed=6, timeout=5)
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(None).wait()


def test_cli_generate_with_server_writes_images_and_reports_errors(make_stack, tmp_path, capsys):
    from sdmesh.client.cli import main

    stack = make_stack()
    assert (
        main(
            [
                "generate",
                "a cat",
                "--server",
                stack.address,
                "--num-images",
                "2",
                "--steps",
                "2",
                "--seed",
                "8",
                "--resolution",
                "16x24",
                "--output-dir",
                str(tmp_path),
                "--quiet",
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    assert out.split() == [str(tmp_path / "image_0.png"), str(tmp_path / "image_1.png")] and "seed 8" in err
    assert Image.open(tmp_path / "image_1.png").size == (24, 16)

    assert main(["generate", "a cat", "--server", stack.address, "--height", "12", "--output-dir", str(tmp_path)]) == 2
    assert "INVALID_ARGUMENT: height must be a multiple of 8" in capsys.readouterr().err
    assert main(["generate", "a cat", "--server", free_address(), "--timeout", "5", "--output-dir", str(tmp_path)]) == 2
    assert "UNAVAILABLE" in capsys.readouterr().err
    np.save(tmp_path / "noise.npy", np.zeros((1, 4, 4, 4), np.float32))
    assert main(["generate", "a cat", "--server", stack.address, "--latents", str(tmp_path / "noise.npy")]) == 2
    assert "--latents works only in this process" in capsys.readouterr().err


def test_sdmesh_health_exits_0_only_when_serving(make_stack, capsys):
    from sdmesh.client.cli import main

    stack = make_stack()
    assert main(["health", stack.address]) == 0 and capsys.readouterr().out.strip() == "SERVING"
    stack.encoder.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert main(["health", stack.encoder.address]) == 1 and capsys.readouterr().out.strip() == "NOT_SERVING"
    assert main(["health", free_address(), "--timeout", "2"]) == 1 and "UNAVAILABLE" in capsys.readouterr().out


def job(request: gateway_pb2.GenerateRequest, facts: ModelFacts, **kwargs):
    return contract.validate(gateway.request_from_proto(request), facts, **kwargs)


def test_unset_fields_get_the_contracts_defaults():
    facts = fake_facts(default_size=(512, 768))
    filled = job(gateway_pb2.GenerateRequest(prompt="a cat"), facts, draw_seed=lambda: 123)
    assert (filled.num_images, filled.steps, filled.guidance_scale, filled.height, filled.width, filled.seed) == (
        1,
        50,
        7.5,
        512,
        768,
        123,
    )
    assert filled.guided and filled.sampler is None and filled.mode == "text-to-image"
    unguided = job(gateway_pb2.GenerateRequest(prompt="a cat", guidance_scale=0.0, seed=2**64 - 1), facts)
    assert (
        not unguided.guided and unguided.guidance_scale == 0.0 and unguided.seed == 2**64 - 1
    )  # an explicit 0 is kept


def test_a_model_without_a_native_size_needs_height_and_width():
    facts = fake_facts(default_size=None)
    with pytest.raises(InvalidRequest, match="give height and width"):
        job(gateway_pb2.GenerateRequest(prompt="a cat"), facts)
    assert job(gateway_pb2.GenerateRequest(prompt="a cat", height=64, width=64), facts).height == 64


def test_a_denoiser_that_reports_no_facts_is_named():
    with pytest.raises(ValueError, match="the denoiser at x reported no model facts"):
        wire.facts_from_proto(common_pb2.ModelFacts(), source="the denoiser at x")


@pytest.mark.processes
def test_gateway_health_waits_for_every_stage(tmp_path):
    """A gateway whose stages are not up reports NOT_SERVING, so health checks wait for the whole chain."""
    import socket
    import subprocess
    import sys
    import time

    from sdmesh.client.stages import health_status

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nowhere = "127.0.0.1:1"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sdmesh.client.cli",
            "serve",
            "gateway",
            "--port",
            str(port),
            "--encoder",
            nowhere,
            "--denoiser",
            nowhere,
            "--decoder",
            nowhere,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline, status = time.monotonic() + 30, None
        while time.monotonic() < deadline:
            try:
                status = health_status(f"127.0.0.1:{port}", timeout=1.0)
                break
            except grpc.RpcError:
                time.sleep(0.2)
        assert status == "NOT_SERVING"
    finally:
        proc.terminate()
        assert proc.wait(timeout=15) == 0
