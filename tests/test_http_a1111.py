"""AUTOMATIC1111's API (services/http/a1111_api.py) over fake stages, through the `webuiapi` package unchanged:
txt2img and img2img give the gateway's own images for each image's seed, A1111's sampler names map to ours, and
progress, interrupt, the listings and keys answer in A1111's shapes.

The fakes (tests/test_gateway.py) stand behind a real gateway; the front calls it in process, so an A1111 answer
can be compared pixel for pixel with `Gateway.Generate`'s for the same request and seed.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import httpx
import numpy as np
import pytest
import webuiapi
from conftest import wait_until
from PIL import Image
from test_gateway import FakeDenoiser, Stack, fake_facts, free_address

from sdmesh.services.http import a1111_api
from sdmesh.services.http.app import serve
from sdmesh.services.http.common import Front
from sdmesh.services.serving.tenants import Tenants
from sdmesh.v1 import denoiser_pb2
from sdmesh.v1.tensors import from_proto, to_proto

EVERY_SAMPLER = fake_facts(samplers=a1111_api.OUR_SAMPLERS)  # so webuiapi's default, "Euler a", is served


def jpeg(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buffer, format="JPEG")
    return buffer.getvalue()


class ImageDenoiser(FakeDenoiser):
    """The fake denoiser whose images also depend on the init image and the mask (latents = seed + cond + init
    latents where the blend mask repaints, the init latents where it keeps), with a JPEG preview every
    preview_every steps."""

    def Denoise(self, request, context):
        for event in super().Denoise(request, context):
            if event.HasField("latents") and request.HasField("init_latents"):
                out, init = from_proto(event.latents), from_proto(request.init_latents)
                blend = from_proto(request.blend_mask) if request.HasField("blend_mask") else np.ones_like(out[:, :1])
                event = denoiser_pb2.DenoiseEvent(latents=to_proto(np.where(blend > 0.5, out + init, init)))
            elif (
                event.HasField("progress")
                and request.preview_every
                and event.progress.step % request.preview_every == 0
            ):
                event.progress.preview = jpeg((200, 30, 30))
            yield event


class A1111:
    """A fake stack with the HTTP front before its gateway, and clients for it."""

    def __init__(self, denoiser: FakeDenoiser | str | None = None, *, facts=EVERY_SAMPLER, **gateway_options):
        self.denoiser = denoiser or ImageDenoiser()
        self.stack = Stack([self.denoiser], facts=facts, **gateway_options)
        self.front = Front(self.stack.service, preview_every=2)
        self.http = serve(self.front, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.http.port}"
        self.client = httpx.Client(base_url=self.url, timeout=30)

    def api(self, **options) -> webuiapi.WebUIApi:
        return webuiapi.WebUIApi(host="127.0.0.1", port=self.http.port, **options)

    def close(self):
        self.client.close()
        self.http.stop(2)
        self.stack.close()


@pytest.fixture
def make_a1111():
    made = []

    def make(*args, **kwargs):
        made.append(A1111(*args, **kwargs))
        return made[-1]

    yield make
    for a in made:
        a.close()


@pytest.fixture(scope="module")
def a1111():
    """One stack for the tests that only read from it."""
    a = A1111()
    yield a
    a.close()


def pixels(image) -> list:
    """An image's pixels (a PIL image, or PNG bytes) as nested lists, for exact comparison."""
    picture = image if isinstance(image, Image.Image) else Image.open(io.BytesIO(image))
    return np.asarray(picture.convert("RGB")).tolist()


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def picture(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array)


def init_picture(width: int = 32, height: int = 32) -> Image.Image:
    return picture(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8))


INIT = base64.b64encode(_png_bytes(init_picture())).decode()  # an init image as A1111 clients send it


def half_mask(white_left: bool = True) -> Image.Image:
    mask = np.zeros((32, 32), np.uint8)
    mask[:, :16] = 255
    return picture(mask if white_left else 255 - mask)


def gateway_images(a: A1111, prompt: str, **fields) -> list[Image.Image]:
    return a.stack.client.generate(prompt, **fields).images


# --- txt2img ------------------------------------------------------------------------------


def test_txt2img_gives_the_gateways_image_for_each_images_seed(a1111):
    result = a1111.api().txt2img(prompt="a cat", negative_prompt="dogs", seed=11, batch_size=2, n_iter=2, steps=3,
                                 cfg_scale=5, width=32, height=32, sampler_name="DDIM")  # fmt: skip

    assert result.info["all_seeds"] == [11, 12, 13, 14] and result.info["seed"] == 11
    assert result.info["sampler_name"] == "DDIM" and result.info["width"] == 32 and len(result.images) == 4
    for image, seed in zip(result.images, result.info["all_seeds"]):
        expected = gateway_images(a1111, "a cat", negative_prompt="dogs", seed=seed, steps=3, guidance_scale=5,
                                  width=32, height=32, sampler="ddim", eta=1.0)  # webuiapi sends eta 1  # fmt: skip
        assert image.size == (32, 32) and pixels(image) == pixels(expected[0])
    sent = a1111.denoiser.requests[-1]
    assert (sent.sampler, sent.num_inference_steps, sent.guidance_scale) == ("ddim", 3, 5.0)
    assert result.parameters["prompt"] == "a cat" and result.info["infotexts"][1].startswith("a cat\nNegative prompt")


def test_seed_minus_one_draws_a_seed_and_every_images_seed_remakes_it(a1111):
    api = a1111.api()
    drawn = api.txt2img(prompt="a cat", seed=-1, batch_size=2, steps=2, width=32, height=32)
    first, second = drawn.info["all_seeds"]
    assert drawn.info["seed"] == first >= 0 and second == first + 1

    again = api.txt2img(prompt="a cat", seed=second, steps=2, width=32, height=32)  # image 1 alone, from its seed

    assert pixels(again.image) == pixels(drawn.images[1]) and pixels(again.image) != pixels(drawn.images[0])


def test_send_images_false_answers_info_only(a1111):
    answer = a1111.client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "send_images": False})
    assert answer.status_code == 200 and answer.json()["images"] == []
    assert len(json.loads(answer.json()["info"])["all_seeds"]) == 1


# --- img2img ------------------------------------------------------------------------------


def test_img2img_starts_from_the_init_image(a1111):
    init = init_picture()
    result = a1111.api().img2img(images=[init], prompt="a cat", denoising_strength=0.5, seed=3, steps=4, width=32,
                                 height=32)  # fmt: skip
    assert a1111.denoiser.requests[-1].strength == pytest.approx(0.5)

    expected = gateway_images(a1111, "a cat", init_image=init, strength=0.5, seed=3, steps=4, guidance_scale=7.0,
                              sampler="euler-ancestral", eta=1.0)  # fmt: skip
    plain = gateway_images(a1111, "a cat", seed=3, steps=4, sampler="euler-ancestral")
    assert pixels(result.image) == pixels(expected[0]) != pixels(plain[0])
    assert result.info["denoising_strength"] == 0.5 and result.parameters["init_images"] is None


def test_img2img_resizes_the_init_image_to_width_and_height_as_a1111_just_resize(a1111):
    init = init_picture(64, 48)
    result = a1111.api().img2img(images=[init], prompt="x", seed=3, steps=2, width=32, height=32)

    resized = init.resize((32, 32), resample=Image.Resampling.LANCZOS)
    expected = gateway_images(a1111, "x", init_image=resized, strength=0.75, seed=3, steps=2, guidance_scale=7.0,
                              sampler="euler-ancestral", eta=1.0)  # fmt: skip
    assert result.image.size == (32, 32) and pixels(result.image) == pixels(expected[0])


@pytest.mark.parametrize("invert", [0, 1])
def test_inpainting_repaints_white_or_with_inpainting_mask_invert_black(a1111, invert):
    init = init_picture()
    result = a1111.api().img2img(images=[init], mask_image=half_mask(white_left=True), inpainting_mask_invert=invert,
                                 prompt="x", seed=5, steps=2, width=32, height=32, denoising_strength=1.0)  # fmt: skip

    blend = from_proto(a1111.denoiser.requests[-1].blend_mask)[0, 0]  # (h, w): 1 repaints
    repaint_left = not invert
    assert blend[:, :2].min() == blend[:, :2].max() == float(repaint_left)
    assert blend[:, -2:].min() == blend[:, -2:].max() == float(not repaint_left)
    ours = half_mask(white_left=repaint_left)  # the gateway's own: white repaints
    expected = gateway_images(a1111, "x", init_image=init, mask_image=ours, strength=1.0, seed=5, steps=2,
                              guidance_scale=7.0, sampler="euler-ancestral", eta=1.0)  # fmt: skip
    assert pixels(result.image) == pixels(expected[0])
    assert "mask_blur" in result.info["sdmesh_notes"][0]  # webuiapi sends mask_blur 4: not done here


def test_a_transparent_mask_repaints_where_it_is_opaque_as_a1111_reads_it():
    alpha = np.zeros((8, 8), np.uint8)
    alpha[:, :4] = 255  # A1111 (create_binary_mask): alpha > 128 repaints
    rgba = Image.fromarray(np.dstack([np.zeros((8, 8, 3), np.uint8), alpha]), mode="RGBA")
    buffer = io.BytesIO()
    rgba.save(buffer, format="PNG")

    mask = np.asarray(Image.open(io.BytesIO(a1111_api.mask_image(buffer.getvalue(), (8, 8), 0, invert=False))))

    assert mask.dtype == np.uint8 and mask.shape == (8, 8)
    assert (mask[:, :4] == 255).all() and (mask[:, 4:] == 0).all()


def test_a_transparent_init_image_is_flattened_onto_white_as_a1111s_background():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:, :4] = (10, 20, 30, 255)  # opaque left half, transparent right half
    buffer = io.BytesIO()
    Image.fromarray(rgba, mode="RGBA").save(buffer, format="PNG")

    data, size = a1111_api.init_image(buffer.getvalue(), (None, None), 0)

    flat = np.asarray(Image.open(io.BytesIO(data)))
    assert size == (8, 8) and flat.shape == (8, 8, 3)
    assert (flat[:, :4] == (10, 20, 30)).all() and (flat[:, 4:] == 255).all()


def test_several_init_images_are_one_per_image_of_the_batch(a1111):
    inits = [init_picture(), picture(255 - np.asarray(init_picture()))]
    result = a1111.api().img2img(images=inits, batch_size=2, prompt="x", seed=3, steps=2, width=32, height=32)

    for i, image in enumerate(result.images):
        expected = gateway_images(a1111, "x", init_image=inits[i], strength=0.75, seed=3 + i, steps=2,
                                  guidance_scale=7.0, sampler="euler-ancestral", eta=1.0)  # fmt: skip
        assert pixels(image) == pixels(expected[0])


def test_resize_modes_crop_or_fill_as_a1111():
    wide = np.zeros((32, 64, 3), np.uint8)
    wide[:, 16:48] = 255  # a white square in the middle of a black 64×32
    cropped = np.asarray(a1111_api.resize_image(Image.fromarray(wide), 1, 32, 32))
    assert cropped.shape == (32, 32, 3) and cropped.min() > 250  # cover, then the centre: all white

    tall = np.full((64, 32, 3), 255, np.uint8)
    filled = np.asarray(a1111_api.resize_image(Image.fromarray(tall), 2, 32, 32))
    assert filled.shape == (32, 32, 3) and filled.min() > 250  # fit, then the edge columns stretched into the bars


# --- samplers and fields ------------------------------------------------------------------


@pytest.mark.parametrize(
    "sampler_name, scheduler, ours",
    [
        ("Euler a", "automatic", "euler-ancestral"),
        ("DPM++ 2M Karras", None, "dpm++2m-karras"),
        ("DPM++ 2M", "Karras", "dpm++2m-karras"),
        ("DPM++ 2M", "Automatic", "dpm++2m-karras"),  # A1111 ≥ 1.9: its own schedule for DPM++ 2M is Karras
        ("DPM++ 2M", "Uniform", "dpm++2m"),
        ("DDIM", "Karras", "ddim"),  # A1111 gives its timestep samplers no schedule
        ("DDIM", "exponential", "ddim"),
        ("k_euler", None, "euler"),
        ("plms", "automatic", "plms"),  # ours, as they are
        ("dpm++2m", "Karras", "dpm++2m"),
        (None, None, ""),  # none: the checkpoint's own
    ],
)
def test_a1111_sampler_names_map_to_ours(a1111, sampler_name, scheduler, ours):
    body = {"prompt": "x", "steps": 2, "sampler_name": sampler_name, "scheduler": scheduler}
    answer = a1111.client.post("/sdapi/v1/txt2img", json=body)

    assert answer.status_code == 200, answer.text
    assert a1111.denoiser.requests[-1].sampler == ours
    assert json.loads(answer.json()["info"])["sdmesh_sampler"] == (ours or "ddim")


@pytest.mark.parametrize(
    "body, named",
    [
        ({"sampler_name": "Heun"}, ["'Heun'", "Euler a", "DPM++ 2M Karras", "ddim"]),
        ({"sampler_name": "Euler a", "scheduler": "Karras"}, ["Euler a", "Karras"]),
        ({"sampler_name": "Euler", "scheduler": "exponential"}, ["'exponential'", "Automatic, Uniform, Karras"]),
        ({"batch_size": 8, "n_iter": 9}, ["batch_size × n_iter is 72"]),
        ({"n_iter": 0}, ["n_iter: 0"]),
        ({"width": 33}, ["width", "multiple of 8"]),
    ],
)
def test_bad_values_are_400_in_a1111s_error_shape_naming_them(a1111, body, named):
    answer = a1111.client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2} | body)

    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] == "INVALID_ARGUMENT"
    for text in named:
        assert text in answer.json()["detail"], (text, answer.json()["detail"])


def test_a_sampler_the_model_lacks_is_400_listing_those_it_has(make_a1111):
    a = make_a1111(facts=None)  # the fake denoiser's own facts: ddim and euler
    answer = a.client.post("/sdapi/v1/txt2img", json={"prompt": "x", "sampler_name": "Euler a"})
    assert answer.status_code == 400 and "these work: Euler, DDIM, ddim, euler" in answer.json()["detail"]


@pytest.mark.parametrize(
    "path, body, field",
    [
        ("txt2img", {"steps": "many"}, "steps"),
        ("txt2img", {"batch_size": [1]}, "batch_size"),
        ("txt2img", {"cfg_scale": "high"}, "cfg_scale"),
        ("img2img", {"init_images": "not a list"}, "init_images"),
    ],
)
def test_wrong_types_are_422_naming_the_field(a1111, path, body, field):
    answer = a1111.client.post(f"/sdapi/v1/{path}", json={"prompt": "x"} | body)

    assert answer.status_code == 422, answer.text
    assert answer.json()["errors"].startswith(f"{field}:")
    assert answer.json()["detail"][0]["loc"] == ["body", field]


def test_unknown_fields_are_ignored_and_settings_not_done_are_noted(a1111):
    body = {"prompt": "x", "steps": 2, "frobnicate": {"a": 1}, "enable_hr": True, "restore_faces": True,
            "override_settings": {"sd_model_checkpoint": "other", "CLIP_stop_at_last_layers": 2}}  # fmt: skip
    answer = a1111.client.post("/sdapi/v1/txt2img", json=body)

    assert answer.status_code == 200, answer.text
    (note,) = json.loads(answer.json()["info"])["sdmesh_notes"]
    assert "enable_hr" in note and "restore_faces" in note
    assert "override_settings (CLIP_stop_at_last_layers, sd_model_checkpoint)" in note


@pytest.mark.parametrize(
    "body, message",
    [
        ({"init_images": []}, "init_images: give the image"),
        ({"init_images": ["bm90IGFuIGltYWdl"]}, "not a PNG or JPEG"),  # the gateway's own word for it
        ({"init_images": ["%%%"]}, "init_images[0]: not valid base64"),
        ({"init_images": [INIT] * 3, "batch_size": 2}, "3 images for batch_size 2"),
        ({"resize_mode": 7}, "resize_mode: 7"),
    ],
)
def test_bad_img2img_bodies_are_400(a1111, body, message):
    answer = a1111.client.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": [INIT]} | body)
    assert answer.status_code == 400, answer.text
    assert message in answer.json()["detail"]


# --- progress and interrupt ---------------------------------------------------------------


def call_in_background(call) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run():
        try:
            out["result"] = call()
        except Exception as e:  # handed to the test, which asserts on it
            out["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def test_progress_reports_the_running_call_its_steps_and_a_preview(make_a1111):
    a = make_a1111(ImageDenoiser(step_seconds=0.05))
    api = a.api()
    assert api.get_progress()["state"]["job_count"] == 0  # idle, as A1111's util_wait_for_ready reads it
    thread, out = call_in_background(lambda: api.txt2img(prompt="x", steps=20, batch_size=2, width=32, height=32))

    seen = {}

    def moving():
        seen.update(api.get_progress())
        return 0 < seen["progress"] < 1 and seen["state"]["sampling_step"] >= 4 and seen["current_image"]

    assert wait_until(moving, timeout=10), seen
    state = seen["state"]
    assert state["sampling_steps"] == 20 and state["job_count"] == 2 and state["job"] == "txt2img"
    assert seen["eta_relative"] >= 0
    preview = Image.open(io.BytesIO(base64.b64decode(seen["current_image"])))
    assert preview.format == "PNG" and np.asarray(preview)[0, 0, 0] > 150  # the denoiser's (red) JPEG, as PNG
    thread.join(15)
    assert len(out["result"].images) == 2
    assert api.get_progress()["progress"] == 0.0  # nothing runs


def test_interrupt_ends_the_running_call_at_once_and_frees_its_places(make_a1111):
    a = make_a1111(ImageDenoiser(step_seconds=0.05))
    api = a.api()
    thread, out = call_in_background(lambda: api.txt2img(prompt="x", steps=400, batch_size=2, width=32, height=32))
    assert a.denoiser.started.wait(10)
    t0 = time.monotonic()

    assert api.interrupt() == {}

    thread.join(10)
    assert not thread.is_alive() and time.monotonic() - t0 < 5
    result = out["result"]  # A1111 answers an interrupted call with what it has: here no image was finished
    assert result.images == [] and "interrupted: 0 of 2" in result.info["sdmesh_notes"][0]
    assert a.denoiser.cancelled.wait(5)
    assert wait_until(lambda: a.stack.service.inflight == 0)
    assert len(api.txt2img(prompt="x", steps=2, width=32, height=32).images) == 1  # the next call is not interrupted


def test_a_client_that_hangs_up_cancels_its_call(make_a1111):
    a = make_a1111(ImageDenoiser(step_seconds=0.05))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{a.url}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 400}, timeout=1.0)
    assert a.denoiser.cancelled.wait(5)
    assert wait_until(lambda: a.stack.service.inflight == 0)


def test_a_batch_past_the_tenants_places_waits_for_its_own_images(make_a1111, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("one-key solo inflight=1\n")
    a = make_a1111(tenants=Tenants.from_file(keys, max_inflight=16))
    answer = a.client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "batch_size": 3, "seed": 7},
                           headers={"Authorization": "Bearer one-key"})  # fmt: skip

    assert answer.status_code == 200, answer.text
    assert len(answer.json()["images"]) == 3 and json.loads(answer.json()["info"])["all_seeds"] == [7, 8, 9]
    assert a.denoiser.peak == 1  # one at a time: the tenant's one place


def test_no_serving_denoiser_is_503(make_a1111):
    a = make_a1111(free_address())
    for answer in (a.client.post("/sdapi/v1/txt2img", json={"prompt": "x"}), a.client.get("/sdapi/v1/sd-models")):
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"] == "UNAVAILABLE"


# --- listings and keys --------------------------------------------------------------------


def test_samplers_models_and_options_answer_in_a1111s_shape(make_a1111):
    a = make_a1111(facts=None)  # the fake denoiser's own facts: ddim and euler
    api = a.api()

    samplers = api.get_samplers()
    assert [s["name"] for s in samplers] == ["Euler", "DDIM"]
    assert samplers[0] == {"name": "Euler", "aliases": ["k_euler"], "options": {"sdmesh": "euler"}}
    assert [s["name"] for s in api.get_schedulers()] == ["automatic", "uniform"]  # no Karras sampler here
    (model,) = api.get_sd_models()
    assert model.keys() >= {"title", "model_name", "hash", "sha256", "filename", "config"} and model["title"] == "fake"
    assert api.get_options()["sd_model_checkpoint"] == "fake" == api.util_get_current_model()
    assert "ignored: sd_model_checkpoint" in api.set_options({"sd_model_checkpoint": "other"})["sdmesh_notes"][0]
    assert api.get_scripts() == {"txt2img": [], "img2img": []}


def test_keys_are_needed_and_webuiapi_sends_them_as_basic_auth_or_a_header(make_a1111, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("secret-key alice\n")
    a = make_a1111(tenants=Tenants.from_file(keys, max_inflight=16))
    for method, path in (("post", "txt2img"), ("post", "img2img"), ("get", "progress"), ("get", "samplers"),
                         ("get", "sd-models"), ("get", "options"), ("post", "interrupt")):  # fmt: skip
        answer = getattr(a.client, method)(f"/sdapi/v1/{path}", **({"json": {}} if method == "post" else {}))
        assert answer.status_code == 401, (path, answer.text)
        assert answer.json()["error"] == "UNAUTHENTICATED"

    with pytest.raises(RuntimeError) as refused:
        a.api(username="alice", password="wrong").txt2img(prompt="x", steps=2, width=32, height=32)
    assert refused.value.args[0] == 401
    assert (
        len(a.api(username="alice", password="secret-key").txt2img(prompt="x", steps=2, width=32, height=32).images)
        == 1
    )
    api = a.api()
    api.session.headers["Authorization"] = "Bearer secret-key"
    assert len(api.txt2img(prompt="x", steps=2, width=32, height=32).images) == 1


def test_the_openapi_document_describes_the_bodies(a1111):
    document = a1111.client.get("/openapi.json").json()
    for path in ("/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/progress", "/sdapi/v1/samplers"):
        assert path in document["paths"], path
    schemas = document["components"]["schemas"]
    assert {"TextToImageRequest", "ImageToImageRequest", "GenerationResponse", "ProgressResponse"} <= schemas.keys()
    assert "sampler_name" in schemas["TextToImageRequest"]["properties"]
