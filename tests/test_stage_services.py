"""The stage services: over gRPC each stage gives exactly what it gives in process, refuses bad input with
INVALID_ARGUMENT, refuses a full queue with RESOURCE_EXHAUSTED, serves only once warm, and stops a cancelled
denoise within one chunk. Servers run in this process on loopback ports, around a tiny random-weight checkpoint."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import types

import grpc
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import wait_until

from sdmesh.client import stages
from sdmesh.services.engine.stages import DecoderStage, DenoiserStage, TextEncoderStage
from sdmesh.services.inputs.contract import GenerationRequest
from sdmesh.services.pipeline import StableDiffusion
from sdmesh.services.serving import decoder_service, denoiser_service, server, text_encoder_service
from sdmesh.v1 import (
    decoder_pb2,
    decoder_pb2_grpc,
    denoiser_pb2,
    denoiser_pb2_grpc,
    text_encoder_pb2,
    text_encoder_pb2_grpc,
)
from sdmesh.v1.tensors import to_proto

SIZE = 16  # the tiny checkpoint's native size: UNet sample_size 8 × VAE factor 2
CHUNK = 2  # denoiser steps per compiled chunk


@pytest.fixture(scope="module")
def stack(tiny_checkpoints):
    """The three stages loaded once, each behind its own warmed-up server,
    plus the in-process pipeline on the same stages."""
    folder = tiny_checkpoints["sd2"]
    encoder, denoiser, decoder = TextEncoderStage.load(folder), DenoiserStage.load(folder), DecoderStage.load(folder)
    shapes = [(1, SIZE, SIZE)]
    services = {
        "encoder": text_encoder_service.stage_service(
            text_encoder_service.TextEncoderService(encoder, str(folder)), shapes
        ),
        "denoiser": denoiser_service.stage_service(
            denoiser_service.DenoiserService(
                denoiser, denoiser_service.denoiser_facts(denoiser, folder), str(folder), chunk=CHUNK
            ),
            shapes,
        ),
        "decoder": decoder_service.stage_service(decoder_service.DecoderService(decoder, str(folder)), shapes),
    }
    servers = {name: server.StageServer(s, max_queue=2).start() for name, s in services.items()}
    for s in servers.values():
        s.warm_up()
    yield types.SimpleNamespace(
        folder=folder,
        pipe=StableDiffusion(encoder, denoiser, decoder),
        encoder=encoder,
        denoiser=denoiser,
        decoder=decoder,
        servers=servers,
        address={name: s.address for name, s in servers.items()},
        channel={name: stages.connect(s.address) for name, s in servers.items()},
    )
    for s in servers.values():
        s.stop(grace=0)


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        result = call()
        if hasattr(result, "__iter__") and not isinstance(result, (bytes, np.ndarray)):
            list(result)
    return caught.value


def conditioning(stack, prompts=("a red cube",), negatives=("",)):
    hidden, _, _ = stack.encoder.encode(list(prompts) + list(negatives))
    hidden = np.asarray(hidden)
    return hidden[: len(prompts)], hidden[len(prompts) :]


# --- each stage over the wire equals the stage in process --------------------------------


def test_encoder_equals_the_stage_and_reports_truncation(stack):
    prompts, negatives = ["a red cube", "word " * 250], ["", "blurry"]  # 1000 tokens: 13 chunks, and 25 cut
    cond, uncond, truncations = stages.TextEncoderClient(stack.channel["encoder"]).encode(
        prompts, negatives, unconditional=True
    )
    hidden, removed, _ = stack.encoder.encode(prompts + negatives)
    np.testing.assert_array_equal(cond, np.asarray(hidden)[:2])
    np.testing.assert_array_equal(uncond, np.asarray(hidden)[2:])
    assert cond.dtype == np.float32 and cond.shape == (2, 13 * 77, stack.encoder.hidden_size)
    assert truncations == [stages.Truncation(1, removed[1], False)] and "word" in removed[1]


def test_encoder_without_unconditional_sends_no_uncond(stack):
    encoded = stages.TextEncoderClient(stack.channel["encoder"]).encode(["a red cube"])
    assert encoded.uncond is None
    np.testing.assert_array_equal(encoded.cond, np.asarray(stack.encoder.encode(["a red cube"])[0]))


def test_denoiser_from_a_seed_equals_the_stage_and_streams_progress(stack):
    cond, uncond = conditioning(stack)
    stream = stages.DenoiserClient(stack.channel["denoiser"]).denoise(
        cond, uncond, seed=7, steps=5, guidance_scale=7.5, guidance_rescale=0.3, height=SIZE, width=SIZE
    )
    assert list(stream) == [
        stages.Progress("denoise", 2, 5),
        stages.Progress("denoise", 4, 5),
        stages.Progress("denoise", 5, 5),
    ]
    f = SIZE // 2  # latent pixels per side: the VAE factor is 2
    noise = stack.denoiser.noise(7, (1, f, f, stack.denoiser.latent_channels))
    *_, (_, expected, _) = stack.denoiser.run(
        noise, jnp.asarray(cond), jnp.asarray(uncond), steps=5, guidance_scale=7.5, guidance_rescale=0.3, seed=7
    )
    np.testing.assert_array_equal(stream.latents, np.asarray(expected).transpose(0, 3, 1, 2))  # NCHW on the wire


def test_a_two_chunk_prompt_runs_through_the_denoiser_service(stack):
    cond, uncond = conditioning(stack, prompts=("a (red:1.2) cube " * 10,))  # 80 tokens: L = 154 for both
    assert cond.shape[1] == uncond.shape[1] == 154
    latents = (
        stages.DenoiserClient(stack.channel["denoiser"])
        .denoise(cond, uncond, seed=3, steps=2, guidance_scale=7.5, height=SIZE, width=SIZE)
        .result()
    )
    f = SIZE // 2
    noise = stack.denoiser.noise(3, (1, f, f, stack.denoiser.latent_channels))
    *_, (_, expected, _) = stack.denoiser.run(noise, cond, uncond, steps=2, guidance_scale=7.5, seed=3)
    np.testing.assert_array_equal(latents, np.asarray(expected).transpose(0, 3, 1, 2))


def test_denoiser_from_given_latents_uses_noise_seed_for_eta(stack):
    cond, uncond = conditioning(stack)
    latents = np.random.default_rng(0).standard_normal((1, 4, SIZE // 2, SIZE // 2), dtype=np.float32)
    got = (
        stages.DenoiserClient(stack.channel["denoiser"])
        .denoise(cond, uncond, latents=latents, steps=3, guidance_scale=5.0, eta=0.5, noise_seed=99)
        .result()
    )
    *_, (_, expected, _) = stack.denoiser.run(
        jnp.asarray(latents.transpose(0, 2, 3, 1)),
        jnp.asarray(cond),
        jnp.asarray(uncond),
        steps=3,
        guidance_scale=5.0,
        eta=0.5,
        seed=99,
    )
    np.testing.assert_array_equal(got, np.asarray(expected).transpose(0, 3, 1, 2))


def test_decoder_equals_the_stage(stack):
    latents = np.random.default_rng(1).standard_normal((1, 4, SIZE // 2, SIZE // 2), dtype=np.float32)
    images = stages.DecoderClient(stack.channel["decoder"]).decode(latents)
    expected, _ = stack.decoder.decode(jnp.asarray(latents.transpose(0, 2, 3, 1)))
    assert images.dtype == np.uint8 and images.shape == (1, SIZE, SIZE, 3)
    np.testing.assert_array_equal(images, expected)


# a long weighted prompt (several chunks) with a one-chunk negative: the negative is padded to the prompt's L
@pytest.mark.parametrize("prompt", ["a red cube", "a (red:1.2) cube, [on a table], " * 12])
def test_chaining_the_three_services_gives_the_pipelines_images(stack, prompt):
    request = GenerationRequest(
        prompt=prompt,
        negative_prompt="blurry",
        num_images=2,
        steps=3,
        guidance_scale=7.5,
        guidance_rescale=0.5,
        height=SIZE,
        width=SIZE,
        seed=11,
    )
    expected = stack.pipe.generate(request).images
    # what a gateway does: encode prompt + negative once, repeat each row num_images times,
    # denoise from the seed, decode
    cond, uncond, _ = stages.TextEncoderClient(stack.channel["encoder"]).encode(
        [prompt], ["blurry"], unconditional=True
    )
    assert cond.shape == uncond.shape and (cond.shape[1] > 77) == (prompt != "a red cube")
    cond, uncond = np.repeat(cond, 2, axis=0), np.repeat(uncond, 2, axis=0)
    latents = (
        stages.DenoiserClient(stack.channel["denoiser"])
        .denoise(cond, uncond, seed=11, steps=3, guidance_scale=7.5, guidance_rescale=0.5, height=SIZE, width=SIZE)
        .result()
    )
    images = stages.DecoderClient(stack.channel["decoder"]).decode(latents)
    np.testing.assert_array_equal(images, expected)


# --- bad input: INVALID_ARGUMENT that says what to fix; the server keeps serving ------------


def _cond(d=32, n=1, dtype=np.float32):
    return to_proto(np.zeros((n, 77, d), dtype))


def _denoise(**fields):
    request = dict(
        cond=_cond(), uncond=_cond(), seed=0, num_inference_steps=2, guidance_scale=7.5, height=SIZE, width=SIZE
    )
    request.update(fields)
    return denoiser_pb2.DenoiseRequest(**{k: v for k, v in request.items() if v is not None})


def _short_bytes():
    t = _cond()
    t.data = t.data[:-4]
    return t


BAD_REQUESTS = [
    ("encoder", text_encoder_pb2.EncodeRequest(), "at least one prompt"),
    (
        "encoder",
        text_encoder_pb2.EncodeRequest(prompts=["a", "b"], negative_prompts=["x"], unconditional=True),
        "one per prompt",
    ),
    ("denoiser", _denoise(cond=_cond(dtype=np.float16)), "expected float32"),
    ("denoiser", _denoise(cond=_short_bytes()), "bytes of data"),
    ("denoiser", _denoise(cond=_cond(d=16), uncond=None), "this UNet needs (N, L, 32)"),
    ("denoiser", _denoise(uncond=_cond(n=2)), "uncond has shape"),
    ("denoiser", _denoise(cond=_cond(n=65), uncond=None), "give 1 to 64 rows"),
    ("denoiser", _denoise(guidance_scale=float("nan")), "guidance_scale must be a finite number"),
    ("denoiser", _denoise(guidance_rescale=2.0), "guidance_rescale"),
    ("denoiser", _denoise(num_inference_steps=0), "steps must be an integer from 1 to 999"),
    ("denoiser", _denoise(sampler="lms"), "sampler 'lms' is not one of"),
    ("denoiser", _denoise(height=1 << 20), "height must be a multiple of 2 between 2 and 4096"),
    ("denoiser", _denoise(width=17), "width must be a multiple of 2"),
    ("denoiser", _denoise(seed=None), "a seed, or latents"),
    (
        "denoiser",
        _denoise(seed=None, latents=to_proto(np.zeros((1, 3, 8, 8), np.float32))),
        "latents have shape [1, 3, 8, 8]",
    ),
    ("denoiser", _denoise(seed=None, latents=to_proto(np.full((1, 4, 8, 8), np.nan, np.float32))), "NaN"),
    ("denoiser", _denoise(seed=None, latents=to_proto(np.zeros((1, 4, 8, 8), np.float32)), height=32), "disagrees"),
    ("decoder", decoder_pb2.DecodeRequest(latents=to_proto(np.zeros((4, 8, 8), np.float32))), "expected 4 dimensions"),
    ("decoder", decoder_pb2.DecodeRequest(latents=to_proto(np.zeros((1, 4, 8, 8), np.int32))), "expected float32"),
    ("decoder", decoder_pb2.DecodeRequest(latents=to_proto(np.zeros((1, 3, 8, 8), np.float32))), "(N, 4, h, w)"),
    ("decoder", decoder_pb2.DecodeRequest(), "latents is missing"),
]


@pytest.mark.parametrize("stage, request_, message", BAD_REQUESTS, ids=[m for _, _, m in BAD_REQUESTS])
def test_bad_input_is_invalid_argument_with_a_message(stack, stage, request_, message):
    call = {
        "encoder": text_encoder_pb2_grpc.TextEncoderStub(stack.channel["encoder"]).Encode,
        "denoiser": denoiser_pb2_grpc.DenoiserStub(stack.channel["denoiser"]).Denoise,
        "decoder": decoder_pb2_grpc.DecoderStub(stack.channel["decoder"]).Decode,
    }[stage]
    error = rpc_error(lambda: call(request_, timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert message in error.details()
    assert stages.health_status(stack.channel[stage]) == "SERVING"


def test_the_server_keeps_serving_after_bad_input(stack):
    channel = stack.channel["decoder"]
    assert (
        rpc_error(lambda: stages.DecoderClient(channel).decode(np.zeros((1, 3, 8, 8), np.float32))).code()
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    assert stages.DecoderClient(channel).decode(np.zeros((1, 4, 8, 8), np.float32)).shape == (1, SIZE, SIZE, 3)


def test_a_message_past_the_configured_size_is_refused_not_crashed_on(stack):
    # configured for 1x16x16, the decoder takes messages up to a few MiB; these latents are 16 MiB
    error = rpc_error(
        lambda: stages.DecoderClient(stack.channel["decoder"]).decode(np.zeros((1, 4, 1024, 1024), np.float32))
    )
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stages.health_status(stack.channel["decoder"]) == "SERVING"


# --- start-up, ModelInfo ------------------------------------------------------------------


def test_health_says_serving_only_after_warm_up_and_model_info_lists_compiled_shapes(stack):
    service = decoder_service.DecoderService(stack.decoder, "tiny")
    running = server.StageServer(decoder_service.stage_service(service, [(2, SIZE, SIZE)])).start()
    try:
        channel = stages.connect(running.address)
        assert stages.health_status(channel) == "NOT_SERVING"
        assert stages.health_status(channel, "sdmesh.v1.Decoder") == "NOT_SERVING"
        assert list(stages.DecoderClient(channel).model_info().compiled_shapes) == []
        running.warm_up()
        stages.wait_for_serving(running.address, timeout=5, service="sdmesh.v1.Decoder")
        info = stages.DecoderClient(channel).model_info()
        assert [(s.program, s.batch, s.height, s.width) for s in info.compiled_shapes] == [("decode", 2, SIZE, SIZE)]
        assert (
            info.service == "Decoder"
            and info.model_facts.vae_scale_factor == 2
            and info.mesh["data"] == len(info.devices)
        )
    finally:
        running.stop(grace=0)


def test_denoiser_model_info_has_what_a_gateway_needs(stack):
    info = stages.DenoiserClient(stack.channel["denoiser"]).model_info()
    assert ("denoise", 1, SIZE, SIZE) in [(s.program, s.batch, s.height, s.width) for s in info.compiled_shapes]
    f = info.model_facts
    assert (
        f.kind,
        f.latent_channels,
        f.vae_scale_factor,
        f.hidden_size,
        f.max_length,
        f.prediction_type,
        f.max_steps,
        f.default_height,
        f.default_width,
        info.batching.chunk_steps,
    ) == ("text-to-image", 4, 2, 32, 77, "v_prediction", 999, SIZE, SIZE, CHUNK)
    assert "dpm++2m" in f.samplers and f.default_sampler in f.samplers
    assert stages.TextEncoderClient(stack.channel["encoder"]).model_info().model_facts.max_length == 77


def test_every_service_answers_reflection(stack):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    for name, service in (
        ("encoder", "sdmesh.v1.TextEncoder"),
        ("denoiser", "sdmesh.v1.Denoiser"),
        ("decoder", "sdmesh.v1.Decoder"),
    ):
        names = ProtoReflectionDescriptorDatabase(stack.channel[name]).get_services()
        assert service in names and "grpc.health.v1.Health" in names


# --- the queue and the status of our own bugs, with a decoder stage we control --------------


class ControlledDecoder:
    """Looks like a DecoderStage; decode blocks until released, or raises what it is told to."""

    scale_factor = 2
    vae = types.SimpleNamespace(config=types.SimpleNamespace(latent_channels=4, scaling_factor=0.18215))
    options = types.SimpleNamespace(weights_dtype="float32", activations_dtype="float32")

    def __init__(self, fail: Exception | None = None):
        self.fail, self.entered, self.release = fail, threading.Semaphore(0), threading.Event()

    def decode(self, latents):
        self.entered.release()
        if self.fail is not None:
            raise self.fail
        self.release.wait(10)
        return np.zeros((latents.shape[0], 2 * latents.shape[1], 2 * latents.shape[2], 3), np.uint8), 0.0


def controlled_server(stage, max_queue):
    service = decoder_service.DecoderService(stage, "controlled")
    running = server.StageServer(decoder_service.stage_service(service, [(1, SIZE, SIZE)]), max_queue=max_queue).start()
    return running, decoder_pb2_grpc.DecoderStub(stages.connect(running.address))


def test_a_full_queue_answers_resource_exhausted_at_once():
    stage = ControlledDecoder()
    running, stub = controlled_server(stage, max_queue=1)
    request = decoder_pb2.DecodeRequest(latents=to_proto(np.zeros((1, 4, 8, 8), np.float32)))
    try:
        first = stub.Decode.future(request, timeout=10)
        assert stage.entered.acquire(timeout=5)  # running on the "device"
        second = stub.Decode.future(request, timeout=10)  # waits: the queue holds one
        deadline = time.monotonic() + 5
        while running.queue.admitted < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        t0 = time.monotonic()
        error = rpc_error(lambda: stub.Decode(request, timeout=10))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-queue" in error.details()
        assert time.monotonic() - t0 < 1.0  # refused at once, not after waiting
        stage.release.set()
        assert first.result().images.shape == [1, SIZE, SIZE, 3] and second.result().images.shape == [1, SIZE, SIZE, 3]
    finally:
        stage.release.set()
        running.stop(grace=0)


def test_our_own_bugs_are_internal_not_invalid_argument():
    running, stub = controlled_server(ControlledDecoder(fail=KeyError("oops")), max_queue=1)
    try:
        error = rpc_error(
            lambda: stub.Decode(
                decoder_pb2.DecodeRequest(latents=to_proto(np.zeros((1, 4, 8, 8), np.float32))), timeout=10
            )
        )
        assert error.code() == grpc.StatusCode.INTERNAL and "bug in sdmesh" in error.details()
    finally:
        running.stop(grace=0)


# --- cancellation ---------------------------------------------------------------------------


class CountingDenoiser:
    """The real DenoiserStage, with each chunk slowed to 50 ms and counted,
    noting whether the client had cancelled by then."""

    def __init__(self, stage, cancelled: threading.Event):
        self.stage, self.cancelled, self.starts = stage, cancelled, []

    def __getattr__(self, name):
        return getattr(self.stage, name)

    def new_batch(self, buckets):
        batch = self.stage.new_batch(buckets)
        run = batch._run

        def slowed(*args):
            self.starts.append(self.cancelled.is_set())
            time.sleep(0.05)
            return run(*args)

        batch._run = slowed
        return batch


@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_a_cancelled_or_expired_denoise_stops_within_one_chunk(stack, how):
    cancelled = threading.Event()
    counting = CountingDenoiser(stack.denoiser, cancelled)
    service = denoiser_service.DenoiserService(
        counting, denoiser_service.denoiser_facts(stack.denoiser, stack.folder), "tiny", chunk=1
    )
    running = server.StageServer(denoiser_service.stage_service(service, [(1, SIZE, SIZE)]), max_queue=1).start()
    try:
        client = stages.DenoiserClient(running.address)
        cond, uncond = conditioning(stack)
        timeout = 0.5 if how == "deadline" else None
        stream = client.denoise(
            cond, uncond, seed=0, steps=50, guidance_scale=7.5, height=SIZE, width=SIZE, timeout=timeout
        )
        if how == "deadline":
            threading.Timer(timeout, cancelled.set).start()
            assert rpc_error(lambda: stream).code() == grpc.StatusCode.DEADLINE_EXCEEDED
        else:
            assert next(iter(stream)) == stages.Progress("denoise", 1, 50)
            cancelled.set()
            stream.cancel()
        assert wait_until(lambda: service.batcher.running_slots == 0, 5), (
            "the denoiser kept running after the call ended"
        )
        assert sum(counting.starts) <= 1, f"{sum(counting.starts)} chunks started after the call ended"
        assert len(counting.starts) < 20
        # the device is free again: the next call runs to the end
        assert client.denoise(
            cond, uncond, seed=0, steps=2, guidance_scale=7.5, height=SIZE, width=SIZE
        ).result().shape == (1, 4, 8, 8)
    finally:
        running.stop(grace=0)


# --- the command ----------------------------------------------------------------------------


@pytest.mark.processes
@pytest.mark.parametrize(
    "mesh_flags, mesh",
    [
        ([], None),  # no mesh: reports every device JAX sees as the data axis
        (
            ["--ici-data-parallelism", "2", "--ici-tensor-parallelism", "-1"],
            {"data": 2, "fsdp": 1, "tensor": 4},
        ),  # 8 host devices
    ],
)
def test_sdmesh_serve_starts_warms_up_serves_and_stops_on_sigterm(tiny_checkpoints, tmp_path, mesh_flags, mesh):
    command = [
        sys.executable,
        "-m",
        "sdmesh.client.cli",
        "serve",
        "decoder",
        "--model",
        str(tiny_checkpoints["sd2"]),
        "--port",
        "0",
        "--shapes",
        f"1x{SIZE}x{SIZE}",
        "--jax-cache-dir",
        str(tmp_path / "jax"),
        *mesh_flags,
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    if mesh_flags:
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    try:
        address = None
        for line in process.stderr:
            match = re.search(r"SERVING on (\S+)", line)
            if match:
                address = match.group(1)
                break
        assert address, "the server never said it was serving"
        stages.wait_for_serving(address, timeout=10)
        info = stages.DecoderClient(address).model_info(timeout=10)
        # the configured shape, and the batch sizes concurrent calls are padded to (--max-batch 8 by default)
        assert [(s.batch, s.height, s.width) for s in info.compiled_shapes] == [(b, SIZE, SIZE) for b in (1, 2, 4, 8)]
        assert dict(info.mesh) == (mesh or {"data": len(info.devices)})
        images = stages.DecoderClient(address).decode(np.zeros((1, 4, SIZE // 2, SIZE // 2), np.float32), timeout=10)
        assert images.shape == (1, SIZE, SIZE, 3)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
