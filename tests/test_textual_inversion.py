"""Textual inversion in the text-encoder stage: an embedding's vectors stand where a prompt names it, as diffusers'
load_textual_inversion gives (fp32 parity), per prompt; prompts naming none are bitwise unchanged; files that do
not fit this model are listed with their error and refused only to the prompts that name them."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch
from conftest import assert_rel_close
from safetensors.numpy import save_file

from sdmesh.client import stages
from sdmesh.services.engine.stages import LoadOptions, RuntimeOptions, TextEncoderStage, apply_emphasis
from sdmesh.services.inputs.errors import InvalidRequest
from sdmesh.services.serving import server, text_encoder_service

D = 32  # the tiny text encoder's width


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory) -> dict:
    """An --embeddings-dir: diffusers' learned_embeds (one vector, named by its token), an A1111 file of three
    vectors (named by its stem), and an SD 2.x-sized one that fits no tiny model."""
    root = tmp_path_factory.mktemp("embeddings")
    rng = np.random.default_rng(0)
    vectors = {"<cat-toy>": rng.normal(0, 0.5, (D,)).astype(np.float32), "my-style": rng.normal(0, 0.5, (3, D))}
    vectors["my-style"] = vectors["my-style"].astype(np.float32)
    (root / "cat-toy").mkdir()
    save_file({"<cat-toy>": vectors["<cat-toy>"]}, str(root / "cat-toy" / "learned_embeds.safetensors"))
    save_file({"emb_params": vectors["my-style"]}, str(root / "my-style.safetensors"))
    save_file({"emb_params": np.zeros((2, 1024), np.float32)}, str(root / "big.safetensors"))
    return {"dir": root, "vectors": vectors}


@pytest.fixture(scope="module")
def stage(tiny_checkpoints, embeddings) -> TextEncoderStage:
    return TextEncoderStage.load(tiny_checkpoints["sd1"], load=LoadOptions(embeddings_dir=embeddings["dir"]))


def diffusers_conditioning(folder, vectors: dict, prompt: str) -> np.ndarray:
    """StableDiffusionPipeline.encode_prompt after load_textual_inversion of each {token: vectors}."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)
    for token, v in vectors.items():
        pipe.load_textual_inversion({token: torch.from_numpy(v)})
    with torch.no_grad():
        cond, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
    return cond[0].numpy()


def test_the_stage_lists_every_file_and_why_one_cannot_be_used(stage):
    found = {e.name: e for e in stage.embeddings}
    assert sorted(found) == ["<cat-toy>", "big", "my-style"]
    assert found["<cat-toy>"].vectors.shape == (1, D) and found["my-style"].vectors.shape == (3, D)
    assert found["big"].vectors is None and "1024-d" in found["big"].error


@pytest.mark.parametrize("prompt", ["a <cat-toy> photo", "a my-style photo of a cat", "my-style <cat-toy>"])
def test_named_embeddings_match_diffusers_load_textual_inversion(stage, tiny_checkpoints, embeddings, prompt):
    hidden, removed, _ = stage.encode([prompt])
    expected = diffusers_conditioning(tiny_checkpoints["sd1"], embeddings["vectors"], prompt)
    assert hidden.shape == (1, 77, D) and removed == [""]
    assert_rel_close(hidden[0], expected)  # fp32: ≤ 1e-4


def test_a_weight_on_an_embedding_weighs_its_vectors(stage):
    (weighted,), (plain,) = stage.tokenize(["a (my-style:1.2) photo"]), stage.tokenize(["a my-style photo"])
    assert list(weighted.weights[0, :6]) == pytest.approx([1, 1, 1.2, 1.2, 1.2, 1])  # BOS, a, its 3 vectors, photo
    hidden, _, _ = stage.encode(["a (my-style:1.2) photo"])
    unweighted, _, _ = stage.encode(["a my-style photo"])
    np.testing.assert_allclose(hidden[0], apply_emphasis(unweighted, weighted.weights)[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(weighted.ids, plain.ids)


def test_an_embedding_that_would_straddle_two_chunks_starts_the_next(stage):
    (tokens,) = stage.tokenize(["cat " * 74 + "my-style"])  # 74 tokens + 3 vectors > 75
    assert tokens.chunks == 2
    ((slot,),) = [tokens.embeddings]
    assert (slot.chunk, slot.offset, len(slot.vectors)) == (1, 1, 3)


def test_prompts_naming_no_embedding_are_bitwise_unchanged(stage, tiny_checkpoints):
    without = TextEncoderStage.load(tiny_checkpoints["sd1"])
    prompts = ["a red cube", "", "a (blue:1.3) ball " * 20]
    np.testing.assert_array_equal(stage.encode(prompts)[0], without.encode(prompts)[0])


def test_a_prompt_naming_an_unusable_embedding_is_refused_with_its_error(stage):
    with pytest.raises(InvalidRequest, match=r"'big'.*1024-d"):
        stage.tokenize(["a big cat"])


def test_the_service_lists_the_embeddings_and_refuses_the_wrong_base_by_name(tiny_checkpoints, embeddings):
    stage = TextEncoderStage.load(
        tiny_checkpoints["sd1"], RuntimeOptions(), LoadOptions(embeddings_dir=embeddings["dir"])
    )
    service = text_encoder_service.TextEncoderService(stage, "tiny")
    running = server.StageServer(text_encoder_service.stage_service(service, [(1, 0, 0)]), max_queue=2).start()
    running.warm_up()
    try:
        client = stages.TextEncoderClient(stages.connect(running.address))
        adapters = {a.name: a for a in client.model_info().adapters}
        assert {(a.kind, a.rank) for a in adapters.values()} == {("embedding", 1), ("embedding", 3), ("embedding", 0)}
        assert adapters["my-style"].rank == 3 and not adapters["my-style"].error and "1024-d" in adapters["big"].error
        with pytest.raises(grpc.RpcError) as caught:
            client.encode(["a big cat"], [""], unconditional=True)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (
            "big" in caught.value.details()
            and "Use an embedding trained for this model's base" in caught.value.details()
        )
        cond, _, _ = client.encode(["a my-style cat"])
        np.testing.assert_array_equal(cond, stage.encode(["a my-style cat"])[0])
    finally:
        running.stop(grace=0)
        service.close()
