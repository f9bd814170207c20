"""Live previews: with preview_every k, denoise progress carries a small JPEG of the first image's current x̂₀ through
the decoder's fitted latent → RGB map, after each chunk that passed a multiple of k steps and never after the last;
asking for them changes no latent and no image; the gateway and the in-process pipeline send the same bytes. In-process
servers on loopback, tiny random-weight checkpoint (VAE factor 2, so 16 × 16 images have 8 × 8 latents)."""

from __future__ import annotations

import io
import types

import grpc
import numpy as np
import pytest
from PIL import Image

from sdmesh.client import Client, GenerateResult, Progress, stages
from sdmesh.services.engine import stages as engine_stages
from sdmesh.services.engine.stages import DecoderStage, DenoiserStage, TextEncoderStage
from sdmesh.services.inputs import contract
from sdmesh.services.inputs.contract import GenerationRequest, LatentPreview
from sdmesh.services.inputs.errors import InvalidRequest
from sdmesh.services.pipeline import StableDiffusion
from sdmesh.services.serving import decoder_service, denoiser_service, gateway, server, text_encoder_service, wire

SIZE = 16  # the tiny checkpoint's native size
LATENT = SIZE // 2  # its VAE factor is 2
CHUNK = 1  # a chunk per step: previews come exactly at the multiples of k


@pytest.fixture(scope="module")
def served(tiny_checkpoints):
    """The three stages behind in-process servers (the decoder warmed up, which fits the preview map), a gateway in
    front, and the in-process pipeline on the same stages."""
    folder = tiny_checkpoints["sd2"]
    encoder, denoiser, decoder = TextEncoderStage.load(folder), DenoiserStage.load(folder), DecoderStage.load(folder)
    shapes = [(1, SIZE, SIZE)]
    facts = denoiser_service.denoiser_facts(denoiser, folder)
    services = [
        text_encoder_service.stage_service(text_encoder_service.TextEncoderService(encoder, "m"), shapes),
        denoiser_service.stage_service(
            denoiser_service.DenoiserService(denoiser, facts, "m", chunk=CHUNK, max_batch=2), shapes
        ),
        decoder_service.stage_service(decoder_service.DecoderService(decoder, "m"), shapes),
    ]
    running = [server.StageServer(s).start() for s in services]
    running[0]._set(1)  # SERVING without a warm-up: compiling on first use is fine here
    running[1]._set(1)
    running[2].warm_up()  # the decoder fits its preview map here, as a served one does
    pools = [gateway.ReplicaPool(name, [s.address]) for name, s in zip(("encoder", "denoiser", "decoder"), running)]
    service = gateway.GatewayService(*pools)
    gateway_server, port = gateway.build_server(service, "127.0.0.1:0")
    gateway_server.start()
    hidden, _, _ = encoder.encode(["a red cube", ""])
    hidden = np.asarray(hidden)
    yield types.SimpleNamespace(
        folder=folder,
        pipe=StableDiffusion(encoder, denoiser, decoder),
        decoder=decoder,
        cond=hidden[:1],
        uncond=hidden[1:],
        denoiser=stages.DenoiserClient(running[1].address),
        decoder_client=stages.DecoderClient(running[2].address),
        gateway=f"127.0.0.1:{port}",
    )
    gateway_server.stop(0)
    for pool in pools:
        pool.close()
    for s in running:
        s.stop(grace=0)


def jpeg_pixels(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    assert image.format == "JPEG" and image.mode == "RGB"
    return np.asarray(image)


def denoise(served, steps=6, **options) -> tuple[list[Progress], np.ndarray]:
    stream = served.denoiser.denoise(
        served.cond, served.uncond, seed=3, steps=steps, guidance_scale=7.5, height=SIZE, width=SIZE, **options
    )
    progress = list(stream)
    return progress, stream.latents


# --- the denoiser ---------------------------------------------------------------------------------------------------


def test_preview_every_2_over_6_steps_previews_steps_2_and_4_at_latent_size(served):
    projection = served.decoder_client.model_info().latent_preview
    progress, _ = denoise(served, preview_every=2, preview_projection=projection)
    assert [p.step for p in progress] == [1, 2, 3, 4, 5, 6]
    assert [p.step for p in progress if p.preview] == [2, 4]  # not 6: the final latents follow
    for p in progress:
        if p.preview:
            assert jpeg_pixels(p.preview).shape == (LATENT, LATENT, 3)


def test_without_preview_every_no_event_carries_a_preview(served):
    progress, _ = denoise(served)
    assert [p.step for p in progress] == [1, 2, 3, 4, 5, 6] and not any(p.preview for p in progress)


def test_previews_change_no_latent(served):
    _, plain = denoise(served)
    _, previewed = denoise(served, preview_every=1)
    np.testing.assert_array_equal(previewed, plain)  # bitwise


def test_preview_every_past_the_step_count_gives_no_preview_and_no_error(served):
    progress, _ = denoise(served, steps=3, preview_every=10)
    assert len(progress) == 3 and not any(p.preview for p in progress)


def test_without_a_projection_the_denoiser_maps_the_first_three_channels(served):
    """The fallback preview is x̂₀'s channels 0, 1, 2 as R, G, B: the same x̂₀ under the fitted map looks different."""
    fitted = served.decoder_client.model_info().latent_preview

    def preview(**options):
        (only,) = [p.preview for p in denoise(served, steps=3, preview_every=2, **options)[0] if p.preview]
        return only

    fallback, mapped = preview(), preview(preview_projection=fitted)
    assert fallback != mapped
    weights = LatentPreview.fallback(4).weights
    np.testing.assert_array_equal(weights, [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]])
    np.testing.assert_array_equal(LatentPreview.fallback(2).weights, [[1, 0], [0, 1], [1, 0]])  # r mod C


def test_a_request_of_two_images_previews_its_first(served):
    latents = np.random.default_rng(0).standard_normal((2, 4, LATENT, LATENT), dtype=np.float32)
    projection = served.decoder_client.model_info().latent_preview

    def previews(rows):
        stream = served.denoiser.denoise(
            np.repeat(served.cond, rows, axis=0), np.repeat(served.uncond, rows, axis=0), latents=latents[:rows],
            steps=4, guidance_scale=7.5, preview_every=2, preview_projection=projection,
        )  # fmt: skip
        return [jpeg_pixels(p.preview).astype(int) for p in stream if p.preview]

    (two,), (one,) = previews(2), previews(1)
    assert np.abs(two - one).max() <= 2  # the same image (a batch of 2 may round its last bit differently)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("weights", [1.0] * 5, "preview_projection has 5 weights and 3 biases; this UNet needs 12 weights"),
        ("bias", [0.0], "preview_projection has 12 weights and 1 biases"),
        ("weights", [float("nan")] * 12, "preview_projection contains NaN"),
    ],
)
def test_a_malformed_projection_is_invalid_argument_saying_what_it_needs(served, field, value, message):
    projection = wire.latent_preview_to_proto(LatentPreview.fallback(4))
    del getattr(projection, field)[:]
    getattr(projection, field).extend(value)
    with pytest.raises(grpc.RpcError) as caught:
        denoise(served, steps=2, preview_every=1, preview_projection=projection)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in caught.value.details()


# --- the request contract -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [-1, 1.5, True, "5", 2**32])
def test_preview_every_must_be_a_whole_number_of_steps(served, value):
    with pytest.raises(InvalidRequest, match="preview_every must be a whole number of steps"):
        contract.validate(GenerationRequest(prompt="a cat", preview_every=value), served.pipe.facts)


def test_a_preview_is_due_after_a_chunk_that_passes_a_multiple_and_is_not_the_last():
    assert contract.preview_due(0, 5, 20, 5) and contract.preview_due(3, 7, 20, 5)
    assert not contract.preview_due(5, 9, 20, 5)  # no multiple of 5 passed
    assert not contract.preview_due(15, 20, 20, 5)  # the last step: the final latents follow
    assert not contract.preview_due(0, 5, 20, 0)  # 0: off


# --- the fitted map -------------------------------------------------------------------------------------------------


def test_the_fitted_map_predicts_the_decoded_colours_better_than_their_mean(served):
    """A weak check on random weights: on fresh latents (another seed), the map's pooled colours are closer to the
    decoded ones than predicting each colour's mean is (R² > 0)."""
    projection = served.decoder.latent_preview()
    z = engine_stages.smooth_latents(np.random.default_rng(123), (4, LATENT, LATENT, 4))
    decoded = np.asarray(served.decoder.decode(z)[0], np.float64)
    pooled = decoded.reshape(4, LATENT, 2, LATENT, 2, 3).mean(axis=(2, 4)) / 127.5 - 1.0
    predicted = z @ projection.weights.T + projection.bias
    residual = ((pooled - predicted) ** 2).sum()
    spread = ((pooled - pooled.mean(axis=(0, 1, 2))) ** 2).sum()
    assert 1 - residual / spread > 0.0


def test_the_fit_is_deterministic_and_the_decoder_reports_it(served):
    again = DecoderStage.load(served.folder).latent_preview()  # another load, fitted from scratch
    fitted = served.decoder.latent_preview()
    np.testing.assert_array_equal(again.weights, fitted.weights)
    np.testing.assert_array_equal(again.bias, fitted.bias)
    reported = served.decoder_client.model_info().latent_preview
    assert len(reported.weights) == 3 * 4 and len(reported.bias) == 3
    np.testing.assert_array_equal(np.asarray(reported.weights, np.float32).reshape(3, 4), fitted.weights)


# --- through the gateway, and in process ----------------------------------------------------------------------------


def test_the_gateway_streams_previews_and_the_same_pngs_as_without(served):
    with Client(served.gateway) as client:
        events = list(client.stream("a red cube", seed=5, steps=4, preview_every=2))
        plain = client.generate("a red cube", seed=5, steps=4)
    progress, result = events[:-1], events[-1]
    assert isinstance(result, GenerateResult)
    assert [(p.stage, p.step) for p in progress if p.preview] == [("denoise", 2)]
    assert jpeg_pixels(progress[2].preview).shape == (LATENT, LATENT, 3)
    for image, other in zip(result.images, plain.images):
        np.testing.assert_array_equal(np.asarray(image), np.asarray(other))


def test_the_pipeline_makes_the_same_previews_as_the_gateway(served):
    seen: list[tuple[int, bytes]] = []
    request = GenerationRequest(prompt="a red cube", seed=5, steps=6, preview_every=2)
    served.pipe.generate(request, chunk=CHUNK, preview=lambda step, total, jpeg: seen.append((step, jpeg)))
    with Client(served.gateway) as client:
        events = client.stream("a red cube", seed=5, steps=6, preview_every=2)
        remote = [(e.step, e.preview) for e in events if isinstance(e, Progress) and e.preview]
    assert [step for step, _ in seen] == [2, 4]
    assert seen == remote  # the same bytes: the same x̂₀ through the same fitted map
