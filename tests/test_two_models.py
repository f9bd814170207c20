"""Two tiny models behind one gateway, on real stages: the same text encoder and VAE, different UNets.

One encoder and one decoder service serve both (the gateway's routes share their pools); each model has its own
denoiser. A request naming a model gets the image that model's pipeline gives alone, and ModelInfo lists both
models with their UNets' hashes, the shared encoder under each.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from sdmesh.client import Client
from sdmesh.services.dev import reference
from sdmesh.services.engine.stages import LoadOptions
from sdmesh.services.inputs.contract import GenerationRequest
from sdmesh.services.pipeline import StableDiffusion
from sdmesh.services.serving import decoder_service, denoiser_service, gateway, server, text_encoder_service

SIZE, STEPS = 32, 3


@pytest.fixture(scope="module")
def two_models(tiny_checkpoints, tmp_path_factory):
    base = tiny_checkpoints["sd2"]
    tuned = reference.build(tmp_path_factory.mktemp("tuned") / "tuned", reference.TINY["sd2"], seed=7, perturb=0.02)
    for shared in ("text_encoder", "tokenizer", "vae"):  # a fine-tune of the base: only its UNet differs
        shutil.rmtree(tuned / shared)
        shutil.copytree(base / shared, tuned / shared)
    return {"base": base, "tuned": tuned}


def test_requests_naming_each_model_get_its_own_image_through_shared_encoder_and_decoder(two_models):
    pipes = {name: StableDiffusion.load(str(folder)) for name, folder in two_models.items()}
    shapes = [(1, SIZE, SIZE)]
    denoisers = {}
    for name, pipe in pipes.items():
        facts = denoiser_service.denoiser_facts(pipe.denoiser, two_models[name])
        files = denoiser_service.hashed_files(two_models[name], LoadOptions())
        service = denoiser_service.DenoiserService(pipe.denoiser, facts, name, hashed_files=files)
        denoisers[name] = server.StageServer(denoiser_service.stage_service(service, shapes)).start()
    base = pipes["base"]
    encoder = server.StageServer(
        text_encoder_service.stage_service(text_encoder_service.TextEncoderService(base.text_encoder, "m"), shapes)
    ).start()
    decoder = server.StageServer(
        decoder_service.stage_service(decoder_service.DecoderService(base.decoder, "m"), shapes)
    ).start()
    running = [encoder, decoder, *denoisers.values()]
    for s in running:
        s._set(1)  # SERVING without a warm-up: compiling on first use is fine here
    encoders, decoders = (
        gateway.ReplicaPool("encoder", [encoder.address]),
        gateway.ReplicaPool("decoder", [decoder.address]),
    )
    pool = {name: gateway.ReplicaPool("denoiser", [s.address]) for name, s in denoisers.items()}
    service = gateway.GatewayService(
        encoders, pool["base"], decoders, model_name="base",
        routes=[gateway.ModelRoute("tuned", encoders, pool["tuned"], decoders)],
    )  # fmt: skip
    grpc_server, port = gateway.build_server(service, "127.0.0.1:0")
    grpc_server.start()
    try:
        with Client(f"127.0.0.1:{port}") as client:
            info = client.model_info()
            results = {name: client.generate("a cat", steps=STEPS, height=SIZE, width=SIZE, seed=3, model=name,
                                             timeout=300) for name in pipes}  # fmt: skip
            default = client.generate("a cat", steps=STEPS, height=SIZE, width=SIZE, seed=3, timeout=300)
    finally:
        grpc_server.stop(0)
        for s in running:
            s.stop(grace=0)
    assert [m.name for m in info.models] == ["base", "tuned"]
    hashes = {m.name: m.hash for m in info.models}
    assert len(set(hashes.values())) == 2 and all(len(h) == 10 for h in hashes.values())
    assert all(list(m.stages.encoder_replicas) == [encoder.address] for m in info.models)  # one encoder for both
    for name, pipe in pipes.items():
        alone = pipe.generate(GenerationRequest("a cat", steps=STEPS, height=SIZE, width=SIZE, seed=3)).images
        got = np.stack([np.asarray(im) for im in results[name].images])
        assert np.abs(got.astype(int) - alone.astype(int)).max() <= 1, name
        assert (results[name].model, results[name].model_hash) == (name, hashes[name])
    assert default.model == "base"
    assert np.abs(np.asarray(results["base"].images[0]).astype(int) - np.asarray(results["tuned"].images[0])).max() > 2
