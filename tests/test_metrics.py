"""Metrics: every service's Prometheus endpoint has every sdmesh_* metric, and each moves when the thing it counts
happens: a stage server's latency, errors by code and queue depth; the gateway's in-flight requests, images and
errors; `sdmesh top` reads them. Servers run in this process on loopback ports around fakes (no model, no JAX)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import wait_until
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from sdmesh.client import Client, GatewayError, top
from sdmesh.client.cli import main as cli_main
from sdmesh.client.stack import Stack
from sdmesh.services.inputs.errors import InvalidRequest
from sdmesh.services.serving import gateway, server
from sdmesh.services.serving.metrics import StageMetrics
from sdmesh.v1 import (
    common_pb2,
    decoder_pb2,
    decoder_pb2_grpc,
    denoiser_pb2,
    denoiser_pb2_grpc,
    text_encoder_pb2,
    text_encoder_pb2_grpc,
)
from sdmesh.v1.tensors import from_proto, to_proto

ROOT = Path(__file__).resolve().parent.parent
# One sample of each metric the issue names (a histogram shows as NAME_bucket/_count/_sum).
METRICS = (
    "sdmesh_queue_depth",
    "sdmesh_batch_occupancy",
    "sdmesh_batch_size_count",
    "sdmesh_chunk_seconds_count",
    "sdmesh_request_seconds_count",
    "sdmesh_images_served_total",
    "sdmesh_errors_total",
)


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """GET /metrics, read by prometheus_client's own parser: {(sample name, sorted labels): value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples, name: str, stage: str, **labels) -> float:
    return samples[(name, tuple(sorted({"stage": stage, **labels}.items())))]


def names(samples) -> set[str]:
    return {name for name, _ in samples}


# --- StageMetrics ---------------------------------------------------------------------------


@pytest.fixture
def exporter():
    metrics = StageMetrics("denoiser")
    port = metrics.serve_http(0, "127.0.0.1")
    yield metrics, port
    metrics.close()


def test_every_metric_is_served_with_its_stage_and_moves(exporter):
    metrics, port = exporter
    before = scrape(port)
    assert set(METRICS) <= names(before)
    assert all(dict(labels)["stage"] == "denoiser" for name, labels in before if name.startswith("sdmesh_"))
    assert value(before, "sdmesh_errors_total", "denoiser", code="INVALID_ARGUMENT") == 0  # known codes start at 0

    metrics.set_queue_depth(3)
    metrics.observe_batch(used=3, capacity=4)
    metrics.observe_chunk(0.2)
    metrics.observe_request(1.5)
    metrics.observe_request(0.01)
    metrics.images_served(3)
    metrics.error("INVALID_ARGUMENT")
    metrics.error(grpc.StatusCode.RESOURCE_EXHAUSTED)
    metrics.error("ABORTED")  # codes outside the known list appear when first seen
    after = scrape(port)
    assert value(after, "sdmesh_queue_depth", "denoiser") == 3
    assert value(after, "sdmesh_batch_occupancy", "denoiser") == 0.75
    assert (
        value(after, "sdmesh_batch_size_count", "denoiser") == 1
        and value(after, "sdmesh_batch_size_sum", "denoiser") == 3
    )
    assert value(after, "sdmesh_batch_size_bucket", "denoiser", le="2.0") == 0
    assert value(after, "sdmesh_batch_size_bucket", "denoiser", le="4.0") == 1
    assert value(after, "sdmesh_chunk_seconds_count", "denoiser") == 1
    assert value(after, "sdmesh_chunk_seconds_sum", "denoiser") == pytest.approx(0.2)
    assert value(after, "sdmesh_request_seconds_count", "denoiser") == 2
    assert value(after, "sdmesh_request_seconds_bucket", "denoiser", le="1.0") == 1
    assert value(after, "sdmesh_images_served_total", "denoiser") == 3
    assert {
        code: value(after, "sdmesh_errors_total", "denoiser", code=code)
        for code in ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "ABORTED", "INTERNAL")
    } == {"INVALID_ARGUMENT": 1, "RESOURCE_EXHAUSTED": 1, "ABORTED": 1, "INTERNAL": 0}


def test_each_instance_has_its_own_registry(exporter):
    metrics, port = exporter
    other = StageMetrics("denoiser")  # a second server in the same process (as in the tests) counts apart
    other.images_served(5)
    metrics.images_served(1)
    assert value(scrape(port), "sdmesh_images_served_total", "denoiser") == 1


def test_bad_arguments_say_what_is_wrong():
    with pytest.raises(ValueError, match="stage must be one of"):
        StageMetrics("unet")
    with pytest.raises(ValueError, match="got 5 of 4"):
        StageMetrics("decoder").observe_batch(5, 4)


def test_a_port_in_use_is_named():
    first = StageMetrics("decoder")
    port = first.serve_http(0, "127.0.0.1")
    try:
        with pytest.raises(OSError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            StageMetrics("decoder").serve_http(port, "127.0.0.1")
    finally:
        first.close()


# --- a stage server records latency, errors by code and queue depth --------------------------


class FakeDecoder(decoder_pb2_grpc.DecoderServicer):
    """Decode: latents with a NaN → InvalidRequest; a negative first value → a bug of ours;
    else blocks until released."""

    def __init__(self):
        self.entered, self.release = threading.Semaphore(0), threading.Event()

    def Decode(self, request, context):
        latents = from_proto(request.latents)
        if np.isnan(latents).any():
            raise InvalidRequest("latents contain NaN")
        if latents.flat[0] < 0:
            raise KeyError("oops")
        self.entered.release()
        self.release.wait(10)
        return decoder_pb2.DecodeResponse(images=to_proto(np.zeros((1, 2, 2, 3), np.uint8)))

    def ModelInfo(self, request, context):
        return common_pb2.ModelInfo(service="Decoder", model="fake")


def latents(fill: float) -> decoder_pb2.DecodeRequest:
    return decoder_pb2.DecodeRequest(latents=to_proto(np.full((1, 4, 1, 1), fill, np.float32)))


@pytest.fixture
def stage_server():
    fake = FakeDecoder()
    service = server.StageService(
        name="sdmesh.v1.Decoder",
        servicer=fake,
        add_to_server=decoder_pb2_grpc.add_DecoderServicer_to_server,
        device_methods=frozenset({"Decode"}),
        warm_up=lambda: None,
        max_message_bytes=0,
        metrics=StageMetrics("decoder"),
    )
    running = server.StageServer(service, max_queue=1).start()
    running.warm_up()
    port = running.metrics.serve_http(0, "127.0.0.1")
    channel = grpc.insecure_channel(running.address)
    yield fake, running, decoder_pb2_grpc.DecoderStub(channel), port
    fake.release.set()
    channel.close()
    running.stop(grace=0)


def test_a_stage_server_records_latency_errors_by_code_and_queue_depth(stage_server):
    fake, running, stub, port = stage_server
    assert running.metrics is running.service.metrics  # the servicer's own StageMetrics: one registry for both

    def errors(code: str) -> float:
        return value(scrape(port), "sdmesh_errors_total", "decoder", code=code)

    fake.release.set()
    stub.Decode(latents(1.0), timeout=10)
    stub.ModelInfo(common_pb2.ModelInfoRequest(), timeout=10)
    samples = scrape(port)
    assert value(samples, "sdmesh_request_seconds_count", "decoder") == 2  # every /sdmesh.* RPC
    assert sum(v for (name, _), v in samples.items() if name == "sdmesh_errors_total") == 0

    with pytest.raises(grpc.RpcError) as bad:
        stub.Decode(latents(float("nan")), timeout=10)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and errors("INVALID_ARGUMENT") == 1
    with pytest.raises(grpc.RpcError):
        stub.Decode(latents(-1.0), timeout=10)
    assert errors("INTERNAL") == 1

    # One call on the device, one waiting (max_queue=1): depth 2; a third is refused; one that waits past its deadline.
    fake.release.clear()
    first = stub.Decode.future(latents(1.0), timeout=10)
    assert fake.entered.acquire(timeout=5)
    waiting = stub.Decode.future(latents(1.0), timeout=0.5)
    assert wait_until(lambda: value(scrape(port), "sdmesh_queue_depth", "decoder") == 2)
    with pytest.raises(grpc.RpcError) as refused:
        stub.Decode(latents(1.0), timeout=10)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and errors("RESOURCE_EXHAUSTED") == 1
    assert waiting.exception(5).code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(lambda: errors("DEADLINE_EXCEEDED") == 1)
    assert value(scrape(port), "sdmesh_queue_depth", "decoder") == 1
    time.sleep(0.2)
    fake.release.set()
    first.result(timeout=5)
    samples = scrape(port)
    assert value(samples, "sdmesh_queue_depth", "decoder") == 0
    assert value(samples, "sdmesh_request_seconds_count", "decoder") == 7
    assert (
        value(samples, "sdmesh_request_seconds_bucket", "decoder", le="0.1") < 7
    )  # the one that held the device ≥ 0.2 s


def test_a_stage_server_without_metrics_makes_its_own_named_after_the_service():
    service = server.StageService(
        name="sdmesh.v1.TextEncoder",
        servicer=object(),
        add_to_server=lambda *_: None,
        device_methods=frozenset(),
        warm_up=lambda: None,
        max_message_bytes=0,
    )
    running = server.StageServer(service)
    try:
        assert running.metrics.stage == "text_encoder"
    finally:
        running.stop(grace=0)


# --- the gateway ------------------------------------------------------------------------------


class Encoder(text_encoder_pb2_grpc.TextEncoderServicer):
    def Encode(self, request, context):
        response = text_encoder_pb2.EncodeResponse(cond=to_proto(np.zeros((len(request.prompts), 2, 2), np.float32)))
        if request.unconditional:
            response.uncond.CopyFrom(to_proto(np.zeros((len(request.negative_prompts), 2, 2), np.float32)))
        return response


class Denoiser(denoiser_pb2_grpc.DenoiserServicer):
    def __init__(self):
        self.started, self.release = threading.Event(), threading.Event()

    def Denoise(self, request, context):
        self.started.set()
        self.release.wait(10)
        n = from_proto(request.cond).shape[0]
        yield denoiser_pb2.DenoiseEvent(
            latents=to_proto(np.zeros((n, 1, request.height // 8, request.width // 8), np.float32))
        )

    def ModelInfo(self, request, context):
        facts = common_pb2.ModelFacts(
            kind="text-to-image",
            vae_scale_factor=8,
            latent_channels=1,
            default_height=16,
            default_width=16,
            max_steps=1000,
            samplers=["ddim"],
            default_sampler="ddim",
        )
        return common_pb2.ModelInfo(service="Denoiser", model="fake", model_facts=facts)


class Decoder(decoder_pb2_grpc.DecoderServicer):
    def Decode(self, request, context):
        n, _, h, w = from_proto(request.latents).shape
        return decoder_pb2.DecodeResponse(images=to_proto(np.zeros((n, 8 * h, 8 * w, 3), np.uint8)))


def fake_stage(servicer, add) -> tuple[grpc.Server, str]:
    s = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=[server.NO_SHARED_PORT])
    add(servicer, s)
    checks = health.HealthServicer()
    checks.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checks, s)
    port = s.add_insecure_port("127.0.0.1:0")
    s.start()
    return s, f"127.0.0.1:{port}"


def test_the_gateway_records_in_flight_requests_images_and_errors():
    denoiser = Denoiser()
    stages = [
        fake_stage(Encoder(), text_encoder_pb2_grpc.add_TextEncoderServicer_to_server),
        fake_stage(denoiser, denoiser_pb2_grpc.add_DenoiserServicer_to_server),
        fake_stage(Decoder(), decoder_pb2_grpc.add_DecoderServicer_to_server),
    ]
    pools = [
        gateway.ReplicaPool(name, [address]) for name, (_, address) in zip(("encoder", "denoiser", "decoder"), stages)
    ]
    service = gateway.GatewayService(*pools, max_inflight=4, metrics=StageMetrics("gateway"))
    grpc_server, grpc_port = gateway.build_server(service, "127.0.0.1:0")
    grpc_server.start()
    port = service.metrics.serve_http(0, "127.0.0.1")
    try:
        with Client(f"127.0.0.1:{grpc_port}") as client:
            with futures.ThreadPoolExecutor(1) as pool:
                running = pool.submit(client.generate, "a cat", num_images=2, steps=2, seed=0)
                assert denoiser.started.wait(5)
                assert value(scrape(port), "sdmesh_queue_depth", "gateway") == 1
                denoiser.release.set()
                assert len(running.result(10).images) == 2
            with pytest.raises(GatewayError):
                client.generate("a cat", num_images=65)
        samples = scrape(port)
        assert set(METRICS) <= names(samples)  # batches and chunks stay at 0: the gateway has no device
        assert value(samples, "sdmesh_queue_depth", "gateway") == 0
        assert value(samples, "sdmesh_images_served_total", "gateway") == 2
        assert value(samples, "sdmesh_errors_total", "gateway", code="INVALID_ARGUMENT") == 1
        assert value(samples, "sdmesh_request_seconds_count", "gateway") == 2
    finally:
        grpc_server.stop(None).wait()
        service.metrics.close()
        for p in pools:
            p.close()
        for s, _ in stages:
            s.stop(None)


@pytest.mark.processes
def test_sdmesh_serve_gateway_serves_metrics_on_metrics_port():
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sdmesh.client.cli",
            "serve",
            "gateway",
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--encoder",
            "127.0.0.1:1",
            "--denoiser",
            "127.0.0.1:1",
            "--decoder",
            "127.0.0.1:1",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in process.stderr:
            match = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", line)
            if match:
                break
        assert match, "the gateway never said where its metrics are"
        assert value(scrape(int(match.group(1))), "sdmesh_queue_depth", "gateway") == 0
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# --- sdmesh top -------------------------------------------------------------------------------


def test_sdmesh_top_once_prints_a_row_per_stage(exporter, capsys):
    metrics, port = exporter
    metrics.set_queue_depth(2)
    metrics.observe_batch(1, 2)
    for s in (0.3, 0.3, 0.3, 4.0):
        metrics.observe_request(s)
    metrics.observe_chunk(0.04)
    metrics.images_served(7)
    metrics.error("INVALID_ARGUMENT")
    assert cli_main(["top", f"127.0.0.1:{port}", "--once"]) == 0
    header, row = capsys.readouterr().out.strip().splitlines()
    assert header.split()[:4] == ["ADDRESS", "STAGE", "QUEUE", "OCCUP"]
    cells = row.split()
    # request p50: the 2nd of 4 observations, in the (0.25, 0.5] bucket holding 3 → 0.25 + 0.25·2/3; p99 in (2.5, 5]
    # chunk p50: the one observation, halfway through its bucket (0.025, 0.05]
    assert cells == [
        f"127.0.0.1:{port}",
        "denoiser",
        "2",
        "0.50",
        "38ms",
        "417ms",
        "4.9s",
        "7",
        "-",
        "INVALID_ARGUMENT=1",
    ]


def test_top_rates_and_latencies_cover_the_last_interval(exporter):
    metrics, port = exporter
    metrics.observe_request(30.0)
    metrics.images_served(1)
    live = top.Top([f"127.0.0.1:{port}"])
    assert live.render()[0].splitlines()[1].split()[5] == "42.5s"  # the first scrape, since start: 30 s is in (25, 60]
    metrics.observe_request(0.03)
    metrics.images_served(4)
    time.sleep(0.1)
    text, failures = live.render()
    cells = text.splitlines()[1].split()
    assert (
        failures == [] and cells[3] == "-" and cells[5] == "38ms" and cells[7] == "5"
    )  # no batches: no occupancy  # p50 of the last interval: 0.03 s alone, in (0.025, 0.05]
    assert 4 / 2.0 < float(cells[8]) < 4 / 0.1  # 4 images in the ≥ 0.1 s between the scrapes


def test_sdmesh_top_names_an_unreachable_address_or_a_grpc_port(capsys):
    closed = StageMetrics("decoder")
    port = closed.serve_http(0, "127.0.0.1")
    closed.close()  # nothing listens there now
    assert cli_main(["top", f"127.0.0.1:{port}", "--once"]) == 2
    assert f"cannot reach http://127.0.0.1:{port}/metrics" in capsys.readouterr().err

    grpc_only = grpc.server(futures.ThreadPoolExecutor(max_workers=1), options=[server.NO_SHARED_PORT])
    grpc_port = grpc_only.add_insecure_port("127.0.0.1:0")
    grpc_only.start()
    try:
        assert cli_main(["top", f"127.0.0.1:{grpc_port}", "--once"]) == 2
        assert "gRPC port rather than its --metrics-port" in capsys.readouterr().err
    finally:
        grpc_only.stop(None)


def test_top_refuses_a_page_without_sdmesh_metrics():
    from prometheus_client import CollectorRegistry, Counter, start_http_server

    registry = CollectorRegistry()
    Counter("other_total", "not ours", registry=registry).inc()
    httpd, _ = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        with pytest.raises(top.ScrapeError, match="no sdmesh_\\* metrics"):
            top.scrape(f"127.0.0.1:{httpd.server_port}")
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_the_exposition_parser_agrees_with_prometheus_client(exporter):
    metrics, port = exporter
    metrics.observe_request(0.7)
    metrics.error("INVALID_ARGUMENT")
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    ours = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in top.parse_exposition(text)}
    assert ours == scrape(port)
    tricky = 'm{a="x\\"y\\\\z\\n",b="{,}"} +Inf 123\nn NaN\n# HELP m x\n'
    assert [(s.name, s.labels) for s in top.parse_exposition(tricky)] == [
        ("m", {"a": 'x"y\\z\n', "b": "{,}"}),
        ("n", {}),
    ]
    with pytest.raises(ValueError, match="line 1"):
        top.parse_exposition("<html>")


def test_histogram_quantile_interpolates_within_the_bucket():
    h = top.Histogram(((0.1, 2.0), (1.0, 6.0), (float("inf"), 8.0)))
    assert h.quantile(0.5) == pytest.approx(0.1 + 0.9 * (4 - 2) / 4)  # the 4th of 8 is the 2nd of 4 in (0.1, 1]
    assert h.quantile(0.99) == 1.0  # in +Inf: the largest finite bound
    assert top.Histogram(((1.0, 0.0), (float("inf"), 0.0))).quantile(0.5) is None
    assert h.minus(top.Histogram(((0.1, 2.0), (1.0, 2.0), (float("inf"), 2.0)))).count == 6


# --- sdmesh up, docker-compose ----------------------------------------------------------------


def test_up_gives_each_service_a_metrics_port():
    def ports(stack):
        return {c.name: int(c.argv[c.argv.index("--metrics-port") + 1]) for c in stack.children}

    numbered = Stack(["--model", "m"], denoisers=2, metrics_base_port=9200)
    assert ports(numbered) == {
        "gateway": 9200,
        "encoder": 9201,
        "denoiser-0": 9202,
        "denoiser-1": 9203,
        "decoder": 9204,
    }
    assert [c.metrics for c in numbered.children][-1] == "127.0.0.1:9200"
    free = ports(Stack(["--model", "m"], metrics_base_port=0))
    assert len(set(free.values())) == 4 and 0 not in free.values()
    assert all("--metrics-port" not in c.argv and c.metrics is None for c in Stack(["--model", "m"]).children)


def test_compose_serves_metrics_on_each_container():
    import yaml

    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    for name, service in services.items():
        command = service["command"]
        assert command[command.index("--metrics-port") + 1] == "9100" and service["expose"] == ["9100"], name
