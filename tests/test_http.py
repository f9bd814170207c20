"""The HTTP front (services/http) over fake stages: OpenAI's Images API through the official `openai` package,
sdmesh's jobs with progress and cancellation, keys, and every malformed request getting its 4xx.

The fakes (tests/test_gateway.py) stand behind a real gateway; the front calls it in process, so an HTTP answer
can be compared with `Gateway.Generate`'s for the same request. With the real model: tests/test_http_stack.py.
"""

import base64
import io
import json
import socket
import ssl

import grpc
import httpx
import numpy as np
import openai
import pytest
from conftest import wait_until
from PIL import Image
from test_gateway import FakeDenoiser, Stack

from sdmesh.client import Client, GatewayError
from sdmesh.services.http.app import serve
from sdmesh.services.http.common import Front
from sdmesh.services.http.jobs import Jobs
from sdmesh.services.serving.tenants import Tenants


class Front_:
    """A fake stack with the HTTP front in front of its gateway."""

    def __init__(self, denoisers=None, *, jobs_options=None, front_options=None, **gateway_options):
        self.stack = Stack(denoisers if denoisers is not None else [FakeDenoiser()], **gateway_options)
        service = self.stack.service
        self.front = Front(service, jobs=Jobs(service, **(jobs_options or {})), **(front_options or {}))
        self.http = serve(self.front, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.http.port}"
        self.client = httpx.Client(base_url=self.url, timeout=30)

    def openai(self, key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0)

    def close(self):
        self.client.close()
        self.http.stop(2)
        self.stack.close()


@pytest.fixture
def make_front():
    fronts = []

    def make(*args, **kwargs):
        fronts.append(Front_(*args, **kwargs))
        return fronts[-1]

    yield make
    for f in fronts:
        f.close()


@pytest.fixture
def front(make_front):
    return make_front()


def grpc_images(stack: Stack, prompt: str, **fields) -> list[bytes]:
    return stack.client.generate(prompt, **fields).images


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def pixels(data) -> np.ndarray:
    """An image's pixels from PNG bytes or a PIL image (the client's results)."""
    image = data if isinstance(data, Image.Image) else Image.open(io.BytesIO(data))
    return np.asarray(image.convert("RGB"))


def init_image() -> bytes:
    rng = np.random.default_rng(0)
    return png(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))


# --- OpenAI Images --------------------------------------------------------------------


def test_openai_generate_gives_the_gateways_images_for_the_same_request_and_seed(front):
    result = front.openai().images.generate(
        prompt="a cat", n=2, size="32x32", extra_body={"steps": 3, "seed": 7, "negative_prompt": "dog"}
    )

    expected = grpc_images(front.stack, "a cat", num_images=2, width=32, height=32, steps=3, seed=7,
                           negative_prompt="dog")  # fmt: skip
    assert [pixels(base64.b64decode(d.b64_json)).tolist() for d in result.data] == [
        pixels(e).tolist() for e in expected
    ]
    assert result.created > 0


def test_openai_generate_as_url_serves_the_png_for_a_while(front):
    result = front.openai().images.generate(prompt="a cat", size="32x32", response_format="url",
                                            extra_body={"steps": 2, "seed": 1})  # fmt: skip

    url = result.data[0].url
    assert url.startswith(front.url + "/v1/files/")
    served = httpx.get(url)
    assert served.status_code == 200 and served.headers["content-type"] == "image/png"
    assert pixels(served.content).tolist() == pixels(grpc_images(front.stack, "a cat", width=32, height=32,
                                                                 steps=2, seed=1)[0]).tolist()  # fmt: skip
    assert httpx.get(front.url + "/v1/files/nothing.png").status_code == 404


def test_openai_edit_without_a_mask_is_img2img(front):
    result = front.openai().images.edit(image=("in.png", init_image(), "image/png"), prompt="a cat", size="32x32",
                                        extra_body={"steps": 4, "seed": 3, "strength": 0.5})  # fmt: skip

    expected = grpc_images(front.stack, "a cat", init_image=init_image(), width=32, height=32, steps=4, seed=3,
                           strength=0.5)  # fmt: skip
    assert pixels(base64.b64decode(result.data[0].b64_json)).tolist() == pixels(expected[0]).tolist()


def test_openai_edit_repaints_where_the_mask_is_transparent(front):
    alpha = np.full((32, 32), 255, np.uint8)
    alpha[:, 16:] = 0  # OpenAI: transparent is where to edit
    mask = png(np.dstack([np.zeros((32, 32, 3), np.uint8), alpha]), mode="RGBA")

    result = front.openai().images.edit(image=("in.png", init_image(), "image/png"), mask=("m.png", mask, "image/png"),
                                        prompt="a cat", extra_body={"steps": 4, "seed": 3})  # fmt: skip

    ours = np.zeros((32, 32), np.uint8)
    ours[:, 16:] = 255  # sdmesh: white repaints
    expected = grpc_images(front.stack, "a cat", init_image=init_image(), mask_image=png(ours), steps=4, seed=3)
    assert pixels(base64.b64decode(result.data[0].b64_json)).tolist() == pixels(expected[0]).tolist()


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"prompt": "x", "size": "33x32"}, 400, "multiple of 8"),
        ({"prompt": "x", "size": "big"}, 400, "WIDTHxHEIGHT"),
        ({"prompt": "x", "n": 65}, 400, "images"),
        ({"prompt": "x", "n": 0}, 400, "n: 0 is out of range"),
        ({"prompt": "x", "steps": "many"}, 400, "steps"),
        ({"prompt": 3}, 400, "prompt"),
        ({"size": "32x32"}, 400, "prompt"),
        ({"prompt": "x", "sampler": "nope"}, 400, "sampler"),
        ({"prompt": "x", "response_format": "tiff"}, 400, "response_format"),
        ({"prompt": "x", "seed": -5}, 400, "seed"),
    ],
)
def test_bad_generations_get_400_in_openais_error_shape(front, body, status, message):
    answer = front.client.post("/v1/images/generations", json={"steps": 2, **body})

    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"


def test_the_openai_package_raises_its_own_error_types(front):
    with pytest.raises(openai.BadRequestError, match="multiple of 8"):
        front.openai().images.generate(prompt="x", size="33x32")


def test_unknown_openai_fields_are_ignored(front):
    body = {"prompt": "x", "size": "32x32", "steps": 2, "quality": "hd", "style": "vivid", "moderation": "low"}
    answer = front.client.post("/v1/images/generations", json=body)
    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize(
    "files, data, message",
    [
        ({"image": ("a.png", b"not an image", "image/png")}, {"prompt": "x"}, "init_image"),
        ({}, {"prompt": "x"}, "image"),
        ({"image": ("a.png", init_image(), "image/png"), "mask": ("m.png", b"\x89PNG junk", "image/png")},
         {"prompt": "x"}, "mask"),
    ],
)  # fmt: skip
def test_bad_edits_get_400(front, files, data, message):
    answer = front.client.post("/v1/images/edits", files=files, data={"size": "32x32", "steps": "2", **data})

    assert answer.status_code == 400, answer.text
    assert message in answer.json()["error"]["message"]


def test_a_body_over_the_limit_is_refused_before_it_is_read(make_front):
    front = make_front(front_options={"max_body_bytes": 1024})

    declared = front.client.post("/v1/images/generations", content=b"x" * 4096,
                                 headers={"content-type": "application/json"})  # fmt: skip
    assert declared.status_code == 413 and "--http-max-body" in declared.json()["error"]["message"]

    sent = []

    def chunks():  # no Content-Length: the front counts as the bytes arrive and stops reading
        for _ in range(1000):
            sent.append(1)
            yield b"x" * 1024

    streamed = front.client.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413


# --- jobs -------------------------------------------------------------------------------


def events(front, job_id: str) -> list[tuple[str, dict]]:
    out = []
    with front.client.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
        kind = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                out.append((kind, json.loads(line[6:])))
    return out


def test_a_job_answers_at_once_then_streams_progress_then_its_images(make_front):
    front = make_front([FakeDenoiser(step_seconds=0.05)])

    created = front.client.post("/v1/jobs", json={"prompt": "a cat", "steps": 6, "seed": 2, "width": 32,
                                                  "height": 32})  # fmt: skip
    assert created.status_code == 202
    job = created.json()
    assert job["state"] in ("queued", "running") and job["progress"] < 1

    seen = events(front, job["id"])
    kinds = [k for k, _ in seen]
    assert kinds[-1] == "done" and set(kinds[:-1]) == {"progress"}
    steps = [e["step"] for k, e in seen if k == "progress" and e["stage"] == "denoise"]
    assert steps == sorted(steps) and len(steps) > 0
    done = seen[-1][1]
    assert done["state"] == "succeeded" and done["progress"] == 1 and done["seed"] == 2
    expected = grpc_images(front.stack, "a cat", steps=6, seed=2, width=32, height=32)
    assert pixels(base64.b64decode(done["images"][0]["b64_json"])).tolist() == pixels(expected[0]).tolist()

    polled = front.client.get(f"/v1/jobs/{job['id']}").json()
    assert polled["state"] == "succeeded" and polled["expires_at"] > polled["finished"]


def test_cancelling_a_job_frees_its_place_and_the_denoiser_drops_it(make_front):
    denoiser = FakeDenoiser(step_seconds=0.1)
    front = make_front([denoiser], max_inflight=1)
    job = front.client.post("/v1/jobs", json={"prompt": "a cat", "steps": 200}).json()
    assert denoiser.started.wait(10)

    # the one place is taken: another request is refused 429 with Retry-After
    refused = front.client.post("/v1/images/generations", json={"prompt": "x", "steps": 2})
    assert refused.status_code == 429 and "retry-after" in refused.headers

    cancelled = front.client.delete(f"/v1/jobs/{job['id']}")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    assert denoiser.cancelled.wait(5)
    wait_until(lambda: front.stack.service.inflight == 0)
    assert front.client.post("/v1/images/generations", json={"prompt": "x", "steps": 2}).status_code == 200


def test_a_client_that_hangs_up_cancels_its_generation(make_front):
    denoiser = FakeDenoiser(step_seconds=0.1)
    front = make_front([denoiser])
    body = json.dumps({"prompt": "x", "steps": 200}).encode()
    host, port = front.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(
            b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert denoiser.started.wait(10)  # the generation is on the denoiser: now hang up
    assert denoiser.cancelled.wait(5)
    wait_until(lambda: front.stack.service.inflight == 0)


def test_a_job_past_its_time_fails_with_504(make_front):
    front = make_front([FakeDenoiser(step_seconds=0.1)], jobs_options={"timeout": 0.5})

    answer = front.client.post("/v1/images/generations", json={"prompt": "x", "steps": 100})

    assert answer.status_code == 504, answer.text


def test_unknown_jobs_are_404(front):
    answer = front.client.get("/v1/jobs/nope")
    assert answer.status_code == 404 and "no job" in answer.json()["error"]["message"]


def test_no_serving_denoiser_is_503(make_front):
    from test_gateway import free_address

    front = make_front([free_address()])
    front.stack.service._facts = front.stack.service._facts or __import__("test_gateway").fake_facts()

    answer = front.client.post("/v1/images/generations", json={"prompt": "x", "steps": 2})

    assert answer.status_code == 503, answer.text


# --- keys -------------------------------------------------------------------------------


def test_keys_are_required_on_http_and_grpc_alike(make_front, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("secret-key alice\n")
    front = make_front(tenants=Tenants.from_file(keys, max_inflight=16))

    assert front.client.get("/").status_code == 200  # the page and health stay open
    assert front.client.get("/health").status_code == 200
    for method, path in (("get", "/v1/info"), ("post", "/v1/jobs"), ("post", "/v1/images/generations"),
                         ("get", "/v1/jobs/x"), ("post", "/sdapi/v1/txt2img")):  # fmt: skip
        answer = getattr(front.client, method)(path, **({"json": {"prompt": "x"}} if method == "post" else {}))
        assert answer.status_code == 401, (path, answer.text)
        assert answer.headers["www-authenticate"] == "Bearer"
    assert front.client.get("/v1/info", headers={"Authorization": "Bearer wrong"}).status_code == 401

    with pytest.raises(openai.AuthenticationError):
        front.openai("wrong").images.generate(prompt="x", size="32x32", extra_body={"steps": 2})
    ok = front.openai("secret-key").images.generate(prompt="x", size="32x32", extra_body={"steps": 2})
    assert len(ok.data) == 1

    with pytest.raises(GatewayError) as refused:
        front.stack.client.generate("x", steps=2)
    assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
    with Client(front.stack.address, api_key="secret-key") as keyed:
        assert len(keyed.generate("x", steps=2).images) == 1


def test_a_job_is_only_its_tenants(make_front, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("key-a alice\nkey-b bob\n")
    front = make_front(tenants=Tenants.from_file(keys, max_inflight=16))
    job = front.client.post("/v1/jobs", json={"prompt": "x", "steps": 2},
                            headers={"Authorization": "Bearer key-a"}).json()  # fmt: skip

    assert front.client.get(f"/v1/jobs/{job['id']}", headers={"Authorization": "Bearer key-b"}).status_code == 404
    assert front.client.get(f"/v1/jobs/{job['id']}", headers={"X-API-Key": "key-a"}).status_code == 200


# --- the rest ---------------------------------------------------------------------------


def test_info_and_the_openapi_document(front):
    info = front.client.get("/v1/info").json()
    assert info["default_width"] == 32 and info["samplers"] == ["ddim", "euler"] and not info["api_key_required"]

    document = front.client.get("/openapi.json").json()
    for path in ("/v1/images/generations", "/v1/images/edits", "/v1/jobs", "/v1/jobs/{job_id}/events",
                 "/sdapi/v1/txt2img"):  # fmt: skip
        assert path in document["paths"], path
    assert front.client.get("/docs").status_code == 200


def test_http_and_grpc_share_the_gateways_metrics(front):
    front.client.post("/v1/images/generations", json={"prompt": "x", "steps": 2})
    front.client.post("/v1/images/generations", json={"prompt": "x", "size": "33x32"})

    from prometheus_client import generate_latest

    text = generate_latest(front.stack.service.metrics.registry).decode()
    assert 'code="INVALID_ARGUMENT"' in text


def test_openai_lists_the_served_model(front):
    models = front.openai().models.list()
    assert [m.id for m in models.data] == ["fake"]


def test_an_edit_sent_as_a_list_of_one_image_works(front):
    result = front.openai().images.edit(image=[("in.png", init_image(), "image/png")], prompt="a cat",
                                        extra_body={"steps": 2, "seed": 3})  # fmt: skip
    assert len(result.data) == 1


def test_the_front_serves_https_with_the_gateways_certificate(tmp_path):
    from sdmesh.services.serving import tls

    certificates = tls.make_local_certificates(tmp_path)
    own = tls.server_tls(certificates.server_cert, certificates.server_key)
    stack = Stack([FakeDenoiser()])
    http = serve(Front(stack.service), "127.0.0.1", 0, tls=own)
    try:
        url = f"https://127.0.0.1:{http.port}"
        trusting = ssl.create_default_context(cafile=str(certificates.ca))
        answer = httpx.post(f"{url}/v1/images/generations", json={"prompt": "x", "steps": 2}, verify=trusting,
                            timeout=30)  # fmt: skip
        assert answer.status_code == 200 and answer.json()["data"][0]["b64_json"]
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health", timeout=5)  # not trusting the CA: the handshake fails
    finally:
        http.stop(2)
        stack.close()
