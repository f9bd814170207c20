"""How a request names LoRAs, and where each part goes: the contract's rules, the prompt's <lora:…> tags, the wire,
the gateway's split (text-encoder weight to the encoder, UNet weight to the denoiser), the client, CLI and HTTP."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
from test_gateway import fake_facts

from sdmesh.client.cli import _lora
from sdmesh.services.inputs import contract
from sdmesh.services.inputs.contract import GenerationRequest, LoraChoice
from sdmesh.services.inputs.errors import InvalidRequest
from sdmesh.services.serving import wire
from sdmesh.v1 import common_pb2


def validate(**fields) -> contract.Job:
    return contract.validate(GenerationRequest(**{"prompt": "a cat", "seed": 0, **fields}), fake_facts())


# --- the contract ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tag, choice",
    [
        ("<lora:ink>", LoraChoice("ink", 1.0)),
        ("<lora:ink:0.7>", LoraChoice("ink", 0.7)),
        ("<lora:ink:0.5:1.2>", LoraChoice("ink", 0.5, 1.2)),  # A1111: text encoder, then UNet
        ("<lora:ink:te=0.2:unet=0.9>", LoraChoice("ink", 0.2, 0.9)),
        ("<LoRA:ink:-1>", LoraChoice("ink", -1.0)),  # negative weights are how slider LoRAs are used
        ("<lyco:ink:0.3>", LoraChoice("ink", 0.3)),
    ],
)
def test_a_prompts_lora_tag_means_what_it_means_in_a1111_and_leaves_the_text(tag, choice):
    job = validate(prompt=f"a cat {tag}, in the snow")
    assert job.loras == (choice,)
    assert job.prompts == ("a cat , in the snow",)


def test_tags_in_any_prompt_or_negative_apply_to_the_whole_request_once():
    job = validate(prompt=["<lora:a:0.5> x", "y <lora:b>"], negative_prompt="<lora:a:0.9> blurry")
    assert job.loras == (LoraChoice("a", 0.5), LoraChoice("b", 1.0))
    assert job.prompts == (" x", "y ") and job.negative_prompts == (" blurry", " blurry")


def test_the_request_field_wins_over_a_tag_of_the_same_name():
    job = validate(prompt="<lora:a:0.1> x", loras=[("a", 0.8), ("b", 1.0, 0.0)])
    assert job.loras == (LoraChoice("a", 0.8), LoraChoice("b", 1.0, 0.0))
    assert job.prompts == (" x",)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"loras": [("a", 1.0)] * 2}, "named twice"),
        ({"loras": [(f"l{i}", 1.0) for i in range(contract.MAX_LORAS + 1)]}, f"at most {contract.MAX_LORAS}"),
        ({"loras": [("../etc/x", 1.0)]}, "names a path"),
        ({"loras": [("", 1.0)]}, "file's stem"),
        ({"loras": [("a", float("nan"))]}, "weight"),
        ({"loras": [("a", 1e9)]}, "weight"),
        ({"loras": "a"}, r"list of \(name, weight\)"),
        ({"prompt": "<lora:a:heavy>"}, "not a number"),
        ({"prompt": "<lora:a:strength=1>"}, "unknown argument"),
    ],
)
def test_bad_lora_choices_are_refused_naming_the_fix(fields, message):
    with pytest.raises(InvalidRequest, match=message):
        validate(**fields)


def test_a_lora_choice_splits_into_the_encoders_and_the_unets_weight():
    assert (LoraChoice("a", 0.5).text_encoder_scale, LoraChoice("a", 0.5).unet_scale) == (0.5, 0.5)
    assert (LoraChoice("a", 0.5, 2.0).text_encoder_scale, LoraChoice("a", 0.5, 2.0).unet_scale) == (0.5, 2.0)


def test_the_wire_reads_an_unset_weight_as_one():
    assert wire.lora_choice(common_pb2.Lora(name="a")) == LoraChoice("a", 1.0)
    assert wire.lora_choice(common_pb2.Lora(name="a", weight=0.0)) == LoraChoice("a", 0.0)
    assert wire.lora_choice(wire.lora_to_proto(LoraChoice("a", 0.5, 0.25))) == LoraChoice("a", 0.5, 0.25)


# --- through the gateway -------------------------------------------------------------------


def test_the_gateway_sends_text_encoder_weights_to_the_encoder_and_unet_weights_to_the_denoiser(make_stack):
    stack = make_stack()
    stack.client.generate("a cat <lora:ink:0.5:0.75>", loras=[("style", 0.25), "plain"], steps=1, seed=0)
    encode = stack.encoder.servicer.requests[-1]
    assert list(encode.prompts) == ["a cat "]
    assert [(lora.name, lora.weight) for lora in encode.loras] == [("style", 0.25), ("plain", 1.0), ("ink", 0.5)]
    denoise = stack.servers[2].servicer.requests[-1]
    assert [(lora.name, lora.weight) for lora in denoise.loras] == [("style", 0.25), ("plain", 1.0), ("ink", 0.75)]
    assert wire.denoise_job_from_proto(denoise, fake_facts()).loras == (("style", 0.25), ("plain", 1.0), ("ink", 0.75))


def test_a_request_without_loras_sends_none(make_stack):
    stack = make_stack()
    stack.client.generate("a cat", steps=1, seed=0)
    assert not stack.encoder.servicer.requests[-1].loras and not stack.servers[2].servicer.requests[-1].loras


def test_a_bad_tag_is_invalid_argument_at_the_gateway(make_stack):
    from sdmesh.client import GatewayError

    with pytest.raises(GatewayError, match="not a number") as e:
        make_stack().client.generate("<lora:ink:lots>", steps=1, seed=0)
    assert e.value.code.name == "INVALID_ARGUMENT"


def test_the_gateways_model_info_lists_the_stages_adapters(make_stack):
    from test_gateway import FakeDenoiser

    class Denoiser(FakeDenoiser):
        def ModelInfo(self, request, context):
            info = super().ModelInfo(request, context)
            info.adapters.add(name="ink", kind="lora", resident=True, rank=8)
            return info

    stack = make_stack([Denoiser()])
    info = stack.client.model_info()
    assert [(a.name, a.kind, a.resident, a.rank) for a in info.adapters] == [("ink", "lora", True, 8)]


# --- the CLI and HTTP ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, parsed",
    [("ink", ("ink",)), ("ink:0.5", ("ink", 0.5)), ("ink:0.5:1", ("ink", 0.5, 1.0)), ("a:b:0.5", ("a:b", 0.5))],
)
def test_the_cli_reads_lora_flags(text, parsed):
    assert _lora(text) == parsed


def test_the_cli_refuses_a_lora_flag_without_a_name():
    with pytest.raises(argparse.ArgumentTypeError):
        _lora(":0.5")


def test_the_http_bodies_carry_loras(make_stack):
    from sdmesh.services.http.common import LoraBody, generate_request

    request = generate_request(prompt="x", loras=[LoraBody(name="ink", weight=0.5), LoraBody(name="s", unet_weight=2)])
    assert [wire.lora_choice(lora) for lora in request.loras] == [LoraChoice("ink", 0.5), LoraChoice("s", 1.0, 2.0)]
    assert np.isclose(request.loras[1].unet_weight, 2.0)
