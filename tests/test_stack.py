"""The real stack: `sdmesh up` starts encoder, two denoiser replicas, decoder and gateway as processes
on loopback ports, with the tiny checkpoint; clients in Python and Node.js generate through it.

One stack serves the tests that leave it as they found it (starting one compiles in four processes);
the test that kills a replica and then stops its stack starts a stack of its own, so the tests pass
in any order.
"""

from __future__ import annotations

import contextlib
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
from PIL import Image

from sdmesh.client import Client, GatewayError, GenerateResult, Progress

STEPS = 4
START_TIMEOUT = 240


class Up:
    """A running `sdmesh up` and what it printed."""

    def __init__(self, process: subprocess.Popen, address: str, log, log_dir, http: str = ""):
        self.process, self.address, self.log, self.log_dir = process, address, log, log_dir
        self.http = http  # the HTTP front's URL, from the `http: URL` line

    def children(self, service: str | None = None) -> list[psutil.Process]:
        kids = psutil.Process(self.process.pid).children()
        return [k for k in kids if service is None or ["serve", service] == k.cmdline()[3:5]]


pytestmark = pytest.mark.processes


@contextlib.contextmanager
def running_stack(checkpoint, tmp):
    """`sdmesh up` with two denoiser replicas until the block ends (then Ctrl-C, if it still runs)."""
    log = open(tmp / "up.err", "w+")  # noqa: SIM115 - the stack writes to it until the block ends
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sdmesh.client.cli",
            "up",
            "--model",
            str(checkpoint),
            "--port",
            "0",
            "--denoisers",
            "2",
            "--chunk-steps",
            "1",
            "--log-dir",
            str(tmp / "logs"),
            "--start-timeout",
            str(START_TIMEOUT),
        ],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    ready, _, _ = select.select([process.stdout], [], [], START_TIMEOUT)
    address = process.stdout.readline().strip() if ready else ""
    if not address:
        process.send_signal(signal.SIGINT)  # Ctrl-C, not SIGKILL: `sdmesh up` stops the services it started
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.seek(0)
        stderr = log.read()
        log.close()
        pytest.fail(f"sdmesh up printed no address; its stderr:\n{stderr}")
    http = process.stdout.readline().strip()
    assert http.startswith("http: http://"), http
    try:
        yield Up(process, address, log, tmp / "logs", http.removeprefix("http: "))
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            process.wait(30)
        log.close()


@pytest.fixture(scope="module")
def up(tiny_checkpoints, tmp_path_factory):
    with running_stack(tiny_checkpoints["sd2"], tmp_path_factory.mktemp("stack")) as stack:
        yield stack


@pytest.fixture(scope="module")
def pipeline(tiny_checkpoints):
    from sdmesh.services.pipeline import StableDiffusion

    return StableDiffusion.load(str(tiny_checkpoints["sd2"]))


def in_process(pipeline, prompt, seed, **kwargs) -> np.ndarray:
    from sdmesh.services.inputs.contract import GenerationRequest

    return pipeline.generate(GenerationRequest(prompt=prompt, seed=seed, **{"steps": STEPS, **kwargs})).images


def pixels(result: GenerateResult) -> np.ndarray:
    return np.stack([np.asarray(image) for image in result.images])


def test_an_image_through_the_gateway_equals_the_in_process_pipeline(up, pipeline):
    with Client(up.address, timeout=60) as client:
        events = list(
            client.stream(
                "an astronaut riding a horse", negative_prompt="blurry", steps=STEPS, seed=42, guidance_scale=7.5
            )
        )
    *progress, result = events
    assert [p.step for p in progress if p.stage == "denoise"] == list(range(1, STEPS + 1))  # --chunk-steps 1
    assert result.seed == 42
    reference = in_process(pipeline, "an astronaut riding a horse", 42, negative_prompt="blurry", guidance_scale=7.5)
    np.testing.assert_array_equal(pixels(result), reference)  # the hops lose nothing


def test_16_concurrent_requests_each_get_their_own_image(up, pipeline):
    requests = [(f"prompt number {i}", 1000 + i) for i in range(16)]
    with Client(up.address, timeout=120) as client, futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda r: client.generate(r[0], steps=STEPS, seed=r[1]), requests))
    for (prompt, seed), result in zip(requests, results):
        assert result.seed == seed
        # batched with the others (every stage batches): the same image within 1/255, as batching promises;
        # XLA picks other kernels at other batch sizes, so a pixel on a rounding boundary may move by one
        diff = np.abs(pixels(result).astype(int) - in_process(pipeline, prompt, seed).astype(int))
        assert diff.max() <= 1, f"{prompt!r}, seed {seed}: {diff.max()}/255"


def test_cli_generate_through_the_gateway(up, pipeline, tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "sdmesh.client.cli",
            "generate",
            "a lighthouse",
            "--server",
            up.address,
            "--steps",
            str(STEPS),
            "--seed",
            "3",
            "--output-dir",
            str(tmp_path),
            "--timeout",
            "60",
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(tmp_path / "image_0.png")] and "seed 3" in out.stderr
    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / "image_0.png"))[None], in_process(pipeline, "a lighthouse", 3)
    )


def test_bad_requests_are_invalid_argument(up):
    with Client(up.address, timeout=30) as client, pytest.raises(GatewayError) as e:
        client.generate("a cat", height=17, width=16, steps=1)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "multiple of" in e.value.message


@pytest.mark.skipif(shutil.which("npm") is None or shutil.which("node") is None, reason="needs node and npm")
def test_a_node_client_built_from_the_protos_alone_gets_pngs(up, pipeline, tmp_path):
    from pathlib import Path

    folder = Path(__file__).parent / "other_language"
    if not (folder / "node_modules" / "@grpc" / "grpc-js").is_dir():
        install = subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund"], cwd=folder, capture_output=True, text=True, timeout=300
        )
        assert install.returncode == 0, install.stderr
    run = subprocess.run(
        ["node", "generate.js", up.address, "a lighthouse", str(tmp_path), "3", str(STEPS)],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert f"denoise {STEPS}/{STEPS}" in run.stderr and "seed 3" in run.stderr
    assert run.stdout.split() == [str(tmp_path / "image_0.png")]
    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / "image_0.png"))[None], in_process(pipeline, "a lighthouse", 3)
    )


def test_a_client_that_cancels_stops_the_denoiser_work(up):
    steps = 900
    with Client(up.address, timeout=60) as client, futures.ThreadPoolExecutor(2) as pool:

        def timed(n: int, *seeds: int) -> float:
            t0 = time.monotonic()
            list(pool.map(lambda seed: client.generate("a short one", steps=n, seed=seed), seeds))
            return time.monotonic() - t0

        one_step, hundred_steps = timed(1, 2), timed(100, 2)
        per_step = (hundred_steps - one_step) / 99
        baseline = timed(1, 2, 3)
        stream = client.stream("a long one", steps=steps, seed=1)
        for event in stream:
            if isinstance(event, Progress) and event.stage == "denoise" and event.step >= 2:
                break
        stream.close()
        left = (steps - 2) * per_step  # seconds of denoising the cancel should save
        assert left > 1.0, "the long request is too short to tell a stopped denoiser from a finished one"
        # Both replicas are free again at once: neither of two short requests waits behind the cancelled one.
        assert timed(1, 2, 3) < baseline + left / 2


def test_sigterm_to_a_denoiser_replica_loses_no_request(up, pipeline):
    """It drains: what runs there finishes there, what waits there is sent back and retried on the other replica.
    (The module's last test on `up`: one denoiser is left after it.)"""
    victim = up.children("denoiser")[0]
    started = []

    def run(seed: int) -> GenerateResult:
        for event in client.stream(f"drained {seed}", steps=20, seed=seed, timeout=120):
            if isinstance(event, Progress) and event.stage == "denoise":
                started.append(seed)
            elif isinstance(event, GenerateResult):
                return event
        raise AssertionError("no result")

    with Client(up.address) as client, futures.ThreadPoolExecutor(8) as pool:
        running = [pool.submit(run, seed) for seed in range(8)]
        deadline = time.monotonic() + 60
        while len(set(started)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        victim.send_signal(signal.SIGTERM)
        results = [f.result(timeout=180) for f in running]  # every one completes: none fails, none hangs
    victim.wait(60)
    log = Path(up.log.name)
    deadline = time.monotonic() + 10
    while "exited with status 0" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "exited with status 0" in log.read_text()  # it drained and exited cleanly; `sdmesh up` said so
    for seed in (0, 7):
        np.testing.assert_array_equal(pixels(results[seed]), in_process(pipeline, f"drained {seed}", seed, steps=20))


def test_a_killed_denoiser_fails_its_calls_fast_or_retries_them_and_ctrl_c_stops_every_process(
    tiny_checkpoints, tmp_path, pipeline
):
    with running_stack(tiny_checkpoints["sd2"], tmp_path) as up:
        killing_a_denoiser_mid_run_fails_fast_or_retries(up, pipeline)
        ctrl_c_stops_every_process(up)


def killing_a_denoiser_mid_run_fails_fast_or_retries(up, pipeline):
    victim = up.children("denoiser")[0]
    started = []

    def run(seed: int):
        t0 = time.monotonic()
        try:
            for event in client.stream(f"prompt {seed}", steps=300, seed=seed, timeout=60):
                if isinstance(event, Progress) and event.stage == "denoise":
                    started.append(seed)
                elif isinstance(event, GenerateResult):
                    return event, time.monotonic() - t0
        except GatewayError as e:
            return e, time.monotonic() - t0

    with Client(up.address) as client, futures.ThreadPoolExecutor(4) as pool:
        running = [pool.submit(run, seed) for seed in range(4)]
        deadline = time.monotonic() + 60
        while not started and time.monotonic() < deadline:
            time.sleep(0.05)
        victim.kill()
        outcomes = [f.result(timeout=90) for f in running]
        for seed, (outcome, seconds) in enumerate(outcomes):
            assert seconds < 60  # nothing hangs past its deadline
            if isinstance(outcome, GatewayError):
                assert outcome.code == grpc.StatusCode.UNAVAILABLE, outcome
            else:  # retried on the other replica: still its own image
                assert outcome.seed == seed
        later = client.generate("after the crash", steps=STEPS, seed=9, timeout=60)
    np.testing.assert_array_equal(pixels(later), in_process(pipeline, "after the crash", 9))
    deadline = time.monotonic() + 5
    log = Path(up.log.name)
    while "SIGKILL" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "was killed by SIGKILL" in log.read_text()  # `sdmesh up` reported the death


def ctrl_c_stops_every_process(up):
    children = up.children()
    assert {" ".join(c.cmdline()[3:5]) for c in children} == {
        "serve encoder",
        "serve denoiser",
        "serve decoder",
        "serve gateway",
    }
    up.process.send_signal(signal.SIGINT)
    assert up.process.wait(30) == 0
    _gone, alive = psutil.wait_procs(children, timeout=5)
    assert alive == []


def test_sdmesh_up_reports_a_service_that_fails_to_start(tmp_path):
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "sdmesh.client.cli",
            "up",
            "--model",
            str(tmp_path / "no-such-model"),
            "--port",
            "0",
            "--log-dir",
            str(tmp_path / "logs"),
            "--start-timeout",
            "120",
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 1 and run.stdout == ""  # no address: the stack never served
    assert re.search(
        r"sdmesh up: (encoder|denoiser-0|decoder) \(127\.0\.0\.1:\d+, pid \d+\) exited with status \d+; its log: ",
        run.stderr,
    ), run.stderr
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
    assert leftovers == []  # the others were stopped


# --- the HTTP front, on by default -------------------------------------------------------


def test_openai_and_webuiapi_get_the_gateways_images_pixel_for_pixel(up):
    import base64
    import io

    import openai
    import webuiapi

    def decoded(b64: str) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))

    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    mask = Image.fromarray(np.tile(np.uint8([0, 255]), (32, 16)))
    with Client(up.address, timeout=60) as client:
        grpc_txt = client.generate("a red fox", steps=STEPS, seed=5, sampler="euler-ancestral", guidance_scale=6.0,
                                   width=32, height=32)  # fmt: skip
        grpc_edit = client.generate("a red fox", steps=STEPS, seed=6, init_image=init, strength=0.6)
        grpc_inpaint = client.generate("a red fox", steps=STEPS, seed=7, init_image=init, mask_image=mask,
                                       strength=0.75)  # fmt: skip

    oa = openai.OpenAI(base_url=f"{up.http}/v1", api_key="unused", max_retries=0)
    generated = oa.images.generate(prompt="a red fox", size="32x32", extra_body={
        "steps": STEPS, "seed": 5, "sampler": "euler-ancestral", "guidance_scale": 6.0})  # fmt: skip
    np.testing.assert_array_equal(decoded(generated.data[0].b64_json), pixels(grpc_txt)[0])
    buffer = io.BytesIO()
    init.save(buffer, format="PNG")
    edited = oa.images.edit(image=("in.png", buffer.getvalue(), "image/png"), prompt="a red fox",
                            extra_body={"steps": STEPS, "seed": 6, "strength": 0.6})  # fmt: skip
    np.testing.assert_array_equal(decoded(edited.data[0].b64_json), pixels(grpc_edit)[0])

    host, port = up.http.removeprefix("http://").rsplit(":", 1)
    a1111 = webuiapi.WebUIApi(host=host, port=int(port))
    txt = a1111.txt2img(prompt="a red fox", steps=STEPS, seed=5, sampler_name="Euler a", cfg_scale=6.0,
                        width=32, height=32)  # fmt: skip
    np.testing.assert_array_equal(np.asarray(txt.image.convert("RGB")), pixels(grpc_txt)[0])
    img = a1111.img2img(images=[init], prompt="a red fox", steps=STEPS, seed=7, mask_image=mask,
                        denoising_strength=0.75, width=32, height=32)  # fmt: skip
    np.testing.assert_array_equal(np.asarray(img.image.convert("RGB")), pixels(grpc_inpaint)[0])


def test_an_http_job_streams_previews_then_its_images(up):
    import base64
    import io
    import json

    import httpx

    body = {"prompt": "a red fox", "steps": 6, "seed": 9, "preview_every": 2}
    with httpx.Client(base_url=up.http, timeout=60) as http:
        job = http.post("/v1/jobs", json=body).json()
        events = []
        with http.stream("GET", f"/v1/jobs/{job['id']}/events") as stream:
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
    previews = [e for e in events[:-1] if e.get("preview")]
    assert previews, [(e["stage"], e["step"]) for e in events]
    first = Image.open(io.BytesIO(base64.b64decode(previews[0]["preview"])))
    assert first.format == "JPEG" and first.size[0] > 0
    done = events[-1]
    assert done["state"] == "succeeded" and len(done["images"]) == 1
    with Client(up.address, timeout=60) as client:
        expected = client.generate("a red fox", steps=6, seed=9)
    image = Image.open(io.BytesIO(base64.b64decode(done["images"][0]["b64_json"])))
    np.testing.assert_array_equal(np.asarray(image.convert("RGB")), pixels(expected)[0])
