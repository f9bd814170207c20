"""Every HTTP route that takes a body, fuzzed: generated JSON of the right and wrong shapes, and bytes that are
not JSON. The front answers each with a 2xx or a 4xx naming the problem, never a 5xx (that would be a bug of
ours), and the gateway is left with nothing in flight."""

import json

import httpx
import pytest
from conftest import wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_gateway import FakeDenoiser, Stack

from sdmesh.services.http.app import serve
from sdmesh.services.http.common import Front

FIELDS = [
    "prompt", "negative_prompt", "n", "size", "width", "height", "steps", "guidance_scale", "guidance_rescale",
    "sampler", "seed", "eta", "strength", "noise_level", "init_image", "mask", "depth_map", "priority",
    "preview_every", "response_format", "cfg_scale", "sampler_name", "scheduler", "batch_size", "n_iter",
    "denoising_strength", "init_images", "inpainting_mask_invert", "override_settings", "resize_mode",
]  # fmt: skip
ROUTES = ["/v1/images/generations", "/v1/jobs", "/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/options"]

numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, 2, 8, 32, 33, 64, 65, -1, 2**31, 2**32, 2**64]),
    st.floats(allow_nan=True, allow_infinity=True),
)
texts = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        [
            "32x32",
            "33x32",
            "0x0",
            "auto",
            "x",
            "Euler a",
            "DDIM",
            "nope",
            "url",
            "b64_json",
            "Karras",
            "data:image/png;base64,AAAA",
            "iVBORw0KGgo=",
            "%%%",
        ]
    ),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
                      max_leaves=6)  # fmt: skip
bodies = st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=8)), values, max_size=8)


@pytest.fixture(scope="module")
def front():
    stack = Stack([FakeDenoiser()])
    http = serve(Front(stack.service), "127.0.0.1", 0)
    client = httpx.Client(base_url=f"http://127.0.0.1:{http.port}", timeout=30)
    yield stack, client
    client.close()
    http.stop(2)
    stack.close()


def answered(response: httpx.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code >= 400:  # a 4xx says what is wrong, in JSON
        assert response.json()


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(route=st.sampled_from(ROUTES), body=bodies, small=st.booleans())
def test_every_json_body_gets_a_2xx_or_a_4xx(front, route, body, small):
    _, client = front
    if small:  # keep most requests cheap enough to run: a valid one then generates
        body = {"prompt": "a cat", "steps": 2, "size": "32x32", "width": 32, "height": 32, **body}
    answered(client.post(route, content=json.dumps(body, allow_nan=True), headers={"content-type": "application/json"}))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(route=st.sampled_from([*ROUTES, "/v1/images/edits"]), data=st.binary(max_size=200),
       kind=st.sampled_from(["application/json", "multipart/form-data", "text/plain", ""]))  # fmt: skip
def test_bytes_that_are_not_json_get_a_4xx(front, route, data, kind):
    _, client = front
    answered(client.post(route, content=data, headers={"content-type": kind} if kind else {}))


def test_nothing_is_left_in_flight(front):
    stack, _ = front
    wait_until(lambda: stack.service.inflight == 0, timeout=30)
