"""ControlNet requests through every front, over fake stages: the gateway turns GenerateRequest.controls into the
denoiser's ControlInputs (maps at the output size, in [0, 1], the numbers as given), canny makes edge maps, and
the client's Control, the CLI's --control/--controlnet and A1111's alwayson_scripts.controlnet all arrive as the
same ControlInputs. The ControlNet model itself is tested in test_controlnet_pipeline.py.
"""

from __future__ import annotations

import base64
import io
import json
import types

import grpc
import numpy as np
import pytest
import webuiapi
from PIL import Image
from test_gateway import FakeDenoiser, fake_facts
from test_http_a1111 import A1111

from sdmesh.client import Control, GatewayError
from sdmesh.client.client import generate_request
from sdmesh.services.http import a1111_api
from sdmesh.services.inputs import contract
from sdmesh.services.inputs.contract import ControlChoice
from sdmesh.services.inputs.control import canny, control_input
from sdmesh.services.inputs.errors import InvalidRequest
from sdmesh.services.serving import gateway, wire
from sdmesh.v1 import common_pb2, gateway_pb2
from sdmesh.v1.tensors import from_proto

LOADED = ("edges", "depth")  # the fake denoiser's ControlNets
LANCZOS = Image.Resampling.LANCZOS


class ControlDenoiser(FakeDenoiser):
    """The fake denoiser, reporting ControlNets in its facts as a denoiser started with --controlnet does."""

    def __init__(self, controlnets: tuple[str, ...] = LOADED):
        super().__init__()
        self.controlnets = controlnets

    def ModelInfo(self, request, context):
        facts = fake_facts(controlnets=self.controlnets)
        return common_pb2.ModelInfo(service="Denoiser", model="fake", model_facts=wire.facts_to_proto(facts))


def gradient(height: int, width: int) -> np.ndarray:
    """A picture whose every pixel differs, so a wrong resize or crop shows."""
    y, x = np.mgrid[:height, :width]
    return np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) * 7 % 256], -1).astype(
        np.uint8
    )


def white_square(size: int = 32, lo: int = 8, hi: int = 24) -> np.ndarray:
    image = np.zeros((size, size, 3), np.uint8)
    image[lo:hi, lo:hi] = 255
    return image


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def resized(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """What the denoiser should get: the map resized with Lanczos, in [0, 1], (1, 3, H, W)."""
    image = np.asarray(Image.fromarray(array).resize((width, height), resample=LANCZOS))
    return (image.astype(np.float32) / 255.0).transpose(2, 0, 1)[None]


def maps(request) -> list[np.ndarray]:
    return [from_proto(c.image) for c in request.controls]


# --- the control map ----------------------------------------------------------------------


def test_canny_draws_a_white_squares_border_and_nothing_inside_or_outside():
    edges = canny(white_square(), 100, 200)
    assert edges.shape == (32, 32, 3) and edges.dtype == np.uint8 and set(np.unique(edges)) == {0, 255}
    assert (edges == edges[:, :, :1]).all()  # the same in every channel
    ring = np.zeros((32, 32), bool)
    ring[7:25, 7:25] = True
    ring[9:23, 9:23] = False  # within a pixel of the square's border
    on = edges[:, :, 0] > 0
    assert not on[~ring].any()
    for side in (on[7:9, 9:23], on[23:25, 9:23], on[9:23, 7:9], on[9:23, 23:25]):
        assert side.any(axis=side.shape.index(2)).all()  # every pixel along each side has its edge


def test_canny_thresholds_decide_which_edges_remain():
    faint = white_square() // 12  # a step of 21: an edge at low thresholds only
    assert canny(faint, 20, 40).any() and not canny(faint, 100, 200).any()


def test_a_control_input_is_the_map_resized_to_the_output_size_in_0_1():
    image = gradient(12, 20)
    control = control_input(ControlChoice("edges", image, 0.5, 0.1, 0.7, True), 16, 24)
    assert control.image.shape == (1, 16, 24, 3) and control.image.dtype == np.float32
    assert control.image.min() >= 0.0 and control.image.max() <= 1.0
    np.testing.assert_allclose(control.image.transpose(0, 3, 1, 2), resized(image, 16, 24))
    assert control[2:] == (0.5, 0.1, 0.7, True)
    same_size = control_input(ControlChoice("edges", image), 12, 20)
    np.testing.assert_array_equal(same_size.image[0], image / np.float32(255))


def test_with_canny_the_edges_are_taken_at_the_images_own_size_then_resized():
    control = control_input(ControlChoice("edges", white_square(), preprocessor="canny"), 16, 16)
    np.testing.assert_allclose(control.image.transpose(0, 3, 1, 2), resized(canny(white_square(), 100, 200), 16, 16))


# --- the gateway --------------------------------------------------------------------------


def test_a_control_message_becomes_the_contracts_choice_with_its_defaults():
    image = gradient(8, 8)
    choice = gateway.control_choice(gateway_pb2.Control(name="edges", image=png(image)), 0)
    assert choice.name == "edges" and (choice.scale, choice.start, choice.end, choice.guess_mode) == (1, 0, 1, False)
    assert choice.preprocessor == "none"
    assert (choice.low_threshold, choice.high_threshold) == contract.DEFAULT_CANNY_THRESHOLDS
    np.testing.assert_array_equal(choice.image, image)
    given = gateway_pb2.Control(name="edges", image=png(image), scale=0.0, end=0.5, preprocessor="canny",
                                low_threshold=10, high_threshold=20)  # fmt: skip
    assert gateway.control_choice(given, 0)[2:] == (0.0, 0.0, 0.5, False, "canny", 10.0, 20.0)


def test_controls_reach_the_denoiser_as_maps_at_the_output_size_with_their_numbers(make_stack):
    denoiser = ControlDenoiser()
    stack = make_stack([denoiser])
    first, second = gradient(12, 20), gradient(40, 40)
    stack.client.generate(
        "a cat", steps=1, seed=0, height=16, width=24,
        controls=[Control("edges", png(first), scale=0.7, start=0.1, end=0.6, guess_mode=True),
                  Control("depth", Image.fromarray(second))],
    )  # fmt: skip
    request = denoiser.requests[-1]
    assert [c.name for c in request.controls] == ["edges", "depth"]
    one, two = request.controls
    assert (one.scale, one.start, one.end, one.guess_mode) == (pytest.approx(0.7), pytest.approx(0.1),
                                                               pytest.approx(0.6), True)  # fmt: skip
    assert (two.scale, two.start, two.end, two.guess_mode) == (1.0, 0.0, 1.0, False)
    for got, image in zip(maps(request), (first, second)):
        assert got.shape == (1, 3, 16, 24) and got.min() >= 0 and got.max() <= 1
        np.testing.assert_allclose(got, resized(image, 16, 24), atol=1e-6)


def test_unset_fields_take_the_defaults_at_the_gateway(make_stack):
    denoiser = ControlDenoiser()
    stack = make_stack([denoiser])
    request = gateway_pb2.GenerateRequest(prompt="a cat", seed=1, num_inference_steps=1)
    request.controls.add(name="edges", image=png(white_square()), preprocessor="canny")
    list(stack.client.stub.Generate(request, timeout=10))
    (control,) = denoiser.requests[-1].controls
    assert (control.scale, control.start, control.end, control.guess_mode) == (1.0, 0.0, 1.0, False)
    np.testing.assert_allclose(maps(denoiser.requests[-1])[0], resized(canny(white_square(), 100, 200), 32, 32))


def test_the_gateways_model_info_lists_the_denoisers_controlnets(make_stack):
    stack = make_stack([ControlDenoiser()])
    assert list(stack.client.model_info().model_facts.controlnets) == list(LOADED)


def test_an_unknown_controlnet_is_invalid_argument_listing_the_loaded_ones(make_stack):
    stack = make_stack([ControlDenoiser()])
    with pytest.raises(GatewayError) as e:
        stack.client.generate("a cat", steps=1, controls=[Control("pose", png(gradient(8, 8)))])
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "'pose' is not loaded" in e.value.message and "edges, depth" in e.value.message


def test_without_controlnets_the_refusal_says_how_to_load_one(make_stack):
    stack = make_stack([ControlDenoiser(controlnets=())])
    with pytest.raises(GatewayError) as e:
        stack.client.generate("a cat", steps=1, controls=[Control("edges", png(gradient(8, 8)))])
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "--controlnet NAME=PATH" in e.value.message


@pytest.mark.parametrize(
    "control, message",
    [
        (gateway_pb2.Control(name="edges", image=b"not an image"), "control 0 ('edges') image"),
        (gateway_pb2.Control(name="edges"), "control 0 ('edges') image is empty"),
        (gateway_pb2.Control(name="edges", image=png(gradient(8, 8)), start=0.5, end=0.5), "must be before end"),
        (gateway_pb2.Control(name="edges", image=png(gradient(8, 8)), preprocessor="depth"), "none, canny"),
    ],
)
def test_bad_controls_are_invalid_argument_naming_the_problem(make_stack, control, message):
    stack = make_stack([ControlDenoiser()])
    request = gateway_pb2.GenerateRequest(prompt="a cat", num_inference_steps=1, controls=[control])
    with pytest.raises(grpc.RpcError) as e:
        list(stack.client.stub.Generate(request, timeout=10))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in e.value.details()


def test_an_empty_control_image_is_refused_before_anything_runs():
    with pytest.raises(InvalidRequest, match="send the control map"):
        gateway.request_from_proto(gateway_pb2.GenerateRequest(prompt="x", controls=[gateway_pb2.Control(name="a")]))


# --- the client -------------------------------------------------------------------------------


def test_the_clients_control_sends_bytes_paths_and_pil_images_alike(tmp_path):
    image = gradient(8, 8)
    (tmp_path / "map.png").write_bytes(png(image))
    controls = [Control("edges", png(image)), Control("edges", tmp_path / "map.png"),
                Control("edges", str(tmp_path / "map.png")), Control("edges", Image.fromarray(image))]  # fmt: skip
    request = generate_request("a cat", controls=controls)
    for message in request.controls:
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(message.image))), image)


def test_the_clients_control_leaves_canny_thresholds_to_the_gateway_unless_given():
    plain, tuned = generate_request(
        "a cat", controls=[Control("edges", b"png", preprocessor="canny"),
                           Control("edges", b"png", 0.5, 0.2, 0.8, True, "canny", 50, 150)],
    ).controls  # fmt: skip
    assert not plain.HasField("low_threshold") and not plain.HasField("high_threshold")
    assert (plain.scale, plain.end, plain.preprocessor) == (1.0, 1.0, "canny")
    assert (tuned.scale, tuned.start, tuned.end, tuned.guess_mode) == (
        0.5,
        pytest.approx(0.2),
        pytest.approx(0.8),
        True,
    )
    assert (tuned.low_threshold, tuned.high_threshold) == (50, 150)


def test_the_client_refuses_controls_that_are_not_control_values():
    with pytest.raises(TypeError, match=r"sdmesh\.client\.Control"):
        generate_request("a cat", controls=[("edges", b"png")])


# --- the command line ---------------------------------------------------------------------------


def parse(*argv: str):
    from sdmesh.client import cli

    return cli.build_parser().parse_args(list(argv))


def test_control_flags_parse_name_image_and_numbers():
    args = parse("generate", "x", "--control", "edges=a.png", "--control", "depth=C:/maps/d.png:0.5",
                 "--control", "edges=b.png:1.2:0.1:0.9", "--controlnet", "edges=/nets/edges",
                 "--controlnet", "depth=org/sd-controlnet-depth")  # fmt: skip
    assert [tuple(map(str, c[:2])) + tuple(c[2:]) for c in args.control] == [
        ("edges", "a.png", 1.0, 0.0, 1.0),
        ("depth", "C:/maps/d.png", 0.5, 0.0, 1.0),
        ("edges", "b.png", 1.2, 0.1, 0.9),
    ]
    assert args.controlnet == [("edges", "/nets/edges"), ("depth", "org/sd-controlnet-depth")]
    assert (args.control_preprocessor, args.canny_thresholds, args.control_guess_mode) == ("none", None, False)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--control", "edges"], "expected NAME=IMAGE"),
        (["--control", "=a.png"], "expected NAME=IMAGE"),
        (["--control", "edges=a.png:0.5:0.2"], "SCALE:START:END"),
        (["--control", "edges=a.png:-1"], "SCALE must be from 0"),
        (["--control", "edges=a.png:1:0.6:0.2"], "0 ≤ START < END ≤ 1"),
        (["--control", "edges=a.png:1:0:inf"], "finite"),
        (["--controlnet", "edges"], "expected NAME=PATH_OR_HUB_ID"),
        (["--control-preprocessor", "depth"], "invalid choice"),
        (["--canny-thresholds", "200:100"], "0 ≤ LOW ≤ HIGH ≤ 255"),
        (["--canny-thresholds", "100"], "expected LOW:HIGH"),
    ],
)
def test_bad_control_flags_are_argparse_errors_naming_the_form(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        parse("generate", "x", *argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--control-guess-mode"], "--control-guess-mode shapes the --control images: add --control"),
        (["--control-preprocessor", "canny"], "add --control"),
        (["--control", "edges=MAP", "--canny-thresholds", "1:2"], "add --control-preprocessor canny"),
        (["--control", "edges=missing.png"], "--control edges: missing.png"),
    ],
)
def test_control_flags_that_cannot_work_end_in_one_line_before_any_model_loads(tmp_path, capsys, argv, message):
    from sdmesh.client.cli import main

    (tmp_path / "map.png").write_bytes(png(gradient(8, 8)))
    argv = [a.replace("MAP", str(tmp_path / "map.png")) for a in argv]
    assert main(["generate", "x", "--model", str(tmp_path / "no-model"), "--quiet", *argv]) == 2
    assert message in capsys.readouterr().err


def test_generate_through_a_gateway_sends_the_controls(make_stack, tmp_path):
    from sdmesh.client.cli import main

    denoiser = ControlDenoiser()
    stack = make_stack([denoiser])
    (tmp_path / "photo.png").write_bytes(png(white_square()))
    flags = ["--control", f"edges={tmp_path / 'photo.png'}:0.5:0.2:0.9", "--control-preprocessor", "canny",
             "--canny-thresholds", "50:150", "--control-guess-mode"]  # fmt: skip
    out = ["--output-dir", str(tmp_path), "--quiet"]
    assert main(["generate", "a cat", "--server", stack.address, "--steps", "1", "--seed", "0", *flags, *out]) == 0
    (control,) = denoiser.requests[-1].controls
    assert control.name == "edges" and control.guess_mode
    assert (control.scale, control.start, control.end) == (0.5, pytest.approx(0.2), pytest.approx(0.9))
    np.testing.assert_allclose(maps(denoiser.requests[-1])[0], resized(canny(white_square(), 50, 150), 32, 32))


def test_generate_in_this_process_loads_the_controlnets_and_applies_the_controls(monkeypatch, tmp_path):
    from sdmesh.client.cli import main
    from sdmesh.services import pipeline

    seen: dict = {}

    class Pipe:
        def validate(self, request):
            seen["request"] = request

        def generate(self, request, **_):
            timings = dict.fromkeys(("compile", "total", "encode", "denoise", "decode"), 0.0)
            return types.SimpleNamespace(images=[white_square()], truncation_notes=[], timings=timings, seed=0)

    def load(model, **options):
        seen["controlnets"] = options["controlnets"]
        return Pipe()

    monkeypatch.setattr(pipeline.StableDiffusion, "load", staticmethod(load))
    (tmp_path / "map.png").write_bytes(png(gradient(12, 20)))
    flags = ["--controlnet", "edges=nets/edges", "--control", f"edges={tmp_path / 'map.png'}:0.8"]
    flags.append("--control-guess-mode")
    code = main(["generate", "x", "--model", "m", *flags, "--output-dir", str(tmp_path), "--quiet"])
    assert code == 0 and seen["controlnets"] == [("edges", "nets/edges")]
    (choice,) = seen["request"].controls
    assert choice[:1] + choice[2:] == ("edges", 0.8, 0.0, 1.0, True, "none", 100.0, 200.0)
    np.testing.assert_array_equal(choice.image, gradient(12, 20))


def test_serve_and_up_hand_the_controlnets_to_the_denoisers_load_options(monkeypatch):
    from sdmesh.client import stack
    from sdmesh.services.checkpoints import checkpoint
    from sdmesh.services.serving.server import load_setup

    up = parse("up", "--model", "m", "--controlnet", "edges=/nets/edges", "--controlnet", "depth=org/depth")
    flags = stack.serve_args(up)
    assert flags[flags.index("--controlnet") :][:4] == ["--controlnet", "edges=/nets/edges", "--controlnet",
                                                        "depth=org/depth"]  # fmt: skip
    served = parse("serve", "denoiser", *flags)
    monkeypatch.setattr(checkpoint, "resolve", lambda model, **_: model)
    _, _, load = load_setup(served)
    assert [(name, str(path)) for name, path in load.controlnets] == [("edges", "/nets/edges"), ("depth", "org/depth")]


# --- AUTOMATIC1111's ControlNet extension ---------------------------------------------------------

CANNY = "control_v11p_sd15_canny"


@pytest.fixture(scope="module")
def a1111():
    a = A1111(ControlDenoiser((CANNY, "depth")), facts=fake_facts(samplers=a1111_api.OUR_SAMPLERS,
                                                                  controlnets=(CANNY, "depth")))  # fmt: skip
    yield a
    a.close()


def txt2img(a, units: list, **fields) -> dict:
    body = {"prompt": "a cat", "steps": 1, "seed": 3, "width": 32, "height": 32,
            "alwayson_scripts": {"controlnet": {"args": units}}, **fields}  # fmt: skip
    answer = a.client.post("/sdapi/v1/txt2img", json=body)
    assert answer.status_code == 200, answer.text
    return answer.json()


def b64(array: np.ndarray, *, data_url: bool = False) -> str:
    text = base64.b64encode(png(array)).decode()
    return f"data:image/png;base64,{text}" if data_url else text


def test_webuiapis_controlnet_units_reach_the_denoiser(a1111):
    api = a1111.api()
    unit = webuiapi.ControlNetUnit(
        image=Image.fromarray(white_square()), module="canny", model=f"{CANNY} [d14c016b]", weight=0.6,
        guidance_start=0.1, guidance_end=0.8, control_mode=2, threshold_a=50, threshold_b=150,
        resize_mode="Just Resize",
    )  # fmt: skip
    off = webuiapi.ControlNetUnit(image=Image.fromarray(white_square()), model="depth", enabled=False)
    # alwayson_scripts given: webuiapi's default is one dict shared by every call, which the units would stay in
    result = api.txt2img(prompt="a cat", steps=1, seed=3, width=32, height=32, controlnet_units=[unit, off],
                         alwayson_scripts={})  # fmt: skip
    assert len(result.images) == 1
    (control,) = a1111.denoiser.requests[-1].controls
    assert control.name == CANNY and control.guess_mode
    assert (control.scale, control.start, control.end) == (pytest.approx(0.6), pytest.approx(0.1), pytest.approx(0.8))
    np.testing.assert_allclose(maps(a1111.denoiser.requests[-1])[0], resized(canny(white_square(), 50, 150), 32, 32))


def test_a_units_image_is_cropped_or_filled_to_the_output_size_as_its_resize_mode_says(a1111):
    picture = gradient(20, 40)
    for mode, index in (("Crop and Resize", 1), ("Resize and Fill", 2), (1, 1)):
        txt2img(a1111, [{"input_image": b64(picture, data_url=True), "model": "depth", "resize_mode": mode}])
        expected = a1111_api.resize_image(Image.fromarray(picture), index, 32, 32)
        np.testing.assert_allclose(maps(a1111.denoiser.requests[-1])[0], resized(np.asarray(expected), 32, 32))
    txt2img(a1111, [{"image": b64(picture), "model": "depth", "resize_mode": "Just Resize"}])
    np.testing.assert_allclose(maps(a1111.denoiser.requests[-1])[0], resized(picture, 32, 32), atol=1e-6)


def test_a_units_defaults_are_the_extensions(a1111):
    txt2img(a1111, [{"image": b64(white_square()), "model": CANNY, "module": "canny"}])
    (control,) = a1111.denoiser.requests[-1].controls
    assert (control.scale, control.start, control.end, control.guess_mode) == (1.0, 0.0, 1.0, False)
    # threshold -1 is canny's own 100 and 200
    np.testing.assert_allclose(maps(a1111.denoiser.requests[-1])[0], resized(canny(white_square(), 100, 200), 32, 32))


def test_img2img_units_without_an_image_use_the_init_image(a1111):
    init = gradient(32, 32)
    answer = a1111.client.post("/sdapi/v1/img2img", json={
        "prompt": "a cat", "steps": 4, "seed": 1, "init_images": [b64(init)],
        "alwayson_scripts": {"ControlNet": {"args": [{"model": "depth", "weight": 0.5}]}},
    })  # fmt: skip
    assert answer.status_code == 200, answer.text
    (control,) = a1111.denoiser.requests[-1].controls
    assert control.name == "depth" and control.scale == 0.5
    np.testing.assert_allclose(maps(a1111.denoiser.requests[-1])[0], resized(init, 32, 32), atol=1e-6)


def test_what_a_unit_asks_that_sdmesh_does_otherwise_is_noted(a1111):
    unit = {"image": b64(gradient(8, 8)), "model": "depth", "control_mode": 1}
    scripts = {"ADetailer": {"args": []}, "controlnet": {"args": [unit]}}
    notes = " ".join(json.loads(txt2img(a1111, [], alwayson_scripts=scripts)["info"])["sdmesh_notes"])
    assert "alwayson_scripts (ADetailer)" in notes and "'My prompt is more important' is done as Balanced" in notes
    assert not a1111.denoiser.requests[-1].controls[0].guess_mode


@pytest.mark.parametrize(
    "unit, status, message",
    [
        (
            {"module": "depth_midas", "model": "depth"},
            400,
            "give none (and send the map your preprocessor made) or canny",
        ),
        ({"model": "None"}, 400, f"this server has {CANNY}, depth (GET /controlnet/model_list)"),
        ({"model": "pose [0123abcd]"}, 400, f"ControlNet 'pose' is not loaded; the denoiser has: {CANNY}, depth"),
        ({"model": "depth", "control_mode": 7}, 400, "give 0 (Balanced)"),
        ({"model": "depth", "resize_mode": "Stretch"}, 400, "give Just Resize, Crop and Resize or Resize and Fill"),
        ({"model": "depth", "image": "%%%"}, 400, "args[0].image: not valid base64"),
        ({"model": "depth", "image": ""}, 400, "args[0].image: give the control image"),
        ({"model": "depth", "weight": "heavy"}, 422, "alwayson_scripts.controlnet.args.0.weight:"),
    ],
)
def test_bad_units_are_refused_naming_the_field_and_the_fix(a1111, unit, status, message):
    unit = {"image": b64(gradient(8, 8)), **unit}
    body = {"prompt": "a cat", "steps": 1, "alwayson_scripts": {"controlnet": {"args": [unit]}}}
    answer = a1111.client.post("/sdapi/v1/txt2img", json=body)
    assert answer.status_code == status, answer.text
    assert message in answer.json()["errors"]


def test_the_extensions_listings_name_the_denoisers_controlnets_and_the_preprocessors(a1111):
    api = a1111.api()
    assert api.controlnet_model_list() == [CANNY, "depth"]
    assert api.controlnet_module_list() == ["none", "canny"]
    assert api.controlnet_version() == a1111_api.CONTROLNET_API_VERSION
